pub async fn run(_c: Command) -> anyhow::Result<()> {
    Ok(())
}
#[derive(clap::Subcommand)]
pub enum Command {
    Cas,
}
