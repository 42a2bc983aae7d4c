//! `casbuild auth`: make API keys for a coordinator's `[auth]` table.

/// Subcommands of `casbuild auth`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Print a new random API key, and the [[auth.keys]] entry that grants it roles (the config file holds
    /// only the key's hash).
    NewKey {
        /// Who will hold the key (shown in logs and in PERMISSION_DENIED messages).
        #[arg(long)]
        name: String,
        /// A role to grant: cache-read, cache-write, execute, worker or admin; repeatable.
        #[arg(long = "role", required = true, value_parser = ["cache-read", "cache-write", "execute", "worker", "admin"])]
        roles: Vec<String>,
        /// An instance the roles hold on; repeatable [default: every instance].
        #[arg(long = "instance")]
        instances: Vec<String>,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::NewKey { name, roles, instances } => {
            let (key, hash) = casbuild_coordinator::auth::new_key();
            let quoted = |items: &[String]| items.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
            eprintln!("the key (give it to its holder; it is not stored anywhere):");
            println!("{key}");
            eprintln!("\nthe entry for the coordinator's config file (then send it SIGHUP):");
            eprintln!("[[auth.keys]]\nname = {name:?}\nblake3 = \"{hash}\"\nroles = [{}]", quoted(&roles));
            if !instances.is_empty() {
                eprintln!("instances = [{}]", quoted(&instances));
            }
            Ok(())
        }
    }
}
