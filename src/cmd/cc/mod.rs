//! `casbuild cc COMPILER ARGS...` and `casbuild daemon`: their flags and
//! wiring. The wrapper and the daemon are the `casbuild-cc` crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use casbuild_cc::daemon::DaemonConfig;
use casbuild_cc::find_on_path;
use casbuild_cc::wrapper::{daemon_control, wrap, Control, Target};
pub use casbuild_cc::MASQUERADE;

use crate::config::default_data_dir;

/// Where compiler identities are remembered.
pub fn compiler_memo_dir() -> PathBuf {
    default_data_dir().join("compilers")
}

#[derive(clap::Args)]
pub struct Args {
    /// The cluster, as grpc://HOST:PORT.
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// REAPI instance name.
    #[arg(long, env = "CASBUILD_INSTANCE", default_value = "")]
    instance: String,
    /// Create gcc, g++, cc and c++ links to casbuild in DIR: put DIR first on
    /// PATH and every compile goes through casbuild.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    install_links: Option<PathBuf>,
    /// Print the daemon's statistics: requests, hits, remote runs, fallbacks.
    #[arg(long, conflicts_with = "command")]
    show_stats: bool,
    /// Reset the daemon's statistics (after printing them with --show-stats).
    #[arg(long, conflicts_with = "command")]
    zero_stats: bool,
    /// Stop the daemon for this remote.
    #[arg(long, conflicts_with = "command")]
    stop_daemon: bool,
    /// The compiler and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMPILER ARGS")]
    command: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.install_links {
        return install_links(dir);
    }
    if args.show_stats || args.zero_stats || args.stop_daemon {
        let control =
            Control { show_stats: args.show_stats, zero_stats: args.zero_stats, stop_daemon: args.stop_daemon };
        return daemon_control(&args.remote, &args.instance, control).await;
    }
    let Some((compiler, rest)) = args.command.split_first() else {
        anyhow::bail!("give the compiler and its arguments, e.g. `casbuild cc gcc -c hello.c -o hello.o`");
    };
    let memo_dir = compiler_memo_dir();
    let target = Target { remote: &args.remote, instance: &args.instance, memo_dir: &memo_dir };
    let code = wrap(compiler, rest, &target, None).await;
    std::process::exit(code)
}

/// Runs as `gcc` (or another masquerade name) from an `--install-links` directory.
pub fn masquerade(name: &str, args: Vec<String>) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("casbuild cc: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let skip = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| which_dir(&p))
        .or_else(|| std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)));
    let remote = std::env::var("CASBUILD_REMOTE").unwrap_or_else(|_| "grpc://127.0.0.1:8980".into());
    let instance = std::env::var("CASBUILD_INSTANCE").unwrap_or_default();
    let memo_dir = compiler_memo_dir();
    let target = Target { remote: &remote, instance: &instance, memo_dir: &memo_dir };
    let code = runtime.block_on(wrap(name, &args, &target, skip.as_deref()));
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}

/// The directory `argv0` was run from, when it names one (directly or via PATH).
fn which_dir(argv0: &Path) -> Option<PathBuf> {
    if argv0.components().count() > 1 {
        return argv0.parent().and_then(|p| p.canonicalize().ok());
    }
    let name = argv0.to_str()?;
    find_on_path(name, None).and_then(|p| p.parent().and_then(|d| d.canonicalize().ok()))
}

fn install_links(dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding casbuild itself")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in MASQUERADE {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).with_context(|| format!("creating {}", link.display()))?;
    }
    println!("{}: {} -> {}; put it first on PATH", dir.display(), MASQUERADE.join(", "), exe.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct DaemonArgs {
    /// TOML file whose keys are any of these flags (`idle = "10m"`) [default:
    /// $XDG_CONFIG_HOME/casbuild/daemon.toml, else /etc/casbuild/daemon.toml]. Example: docs/config/daemon.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The cluster, as grpc://HOST:PORT (grpcs:// for TLS).
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    instance: String,
    /// The unix socket to serve [default: the one `casbuild cc` uses for this remote].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Local fallback compiles allowed at once [default: the number of CPUs].
    #[arg(long)]
    local_jobs: Option<usize>,
    /// Exit after this long without requests, like 10m or 90s.
    #[arg(long, value_parser = crate::config::parse_duration, default_value = "10m")]
    idle: std::time::Duration,
    /// Serve Prometheus metrics (/metrics: the `casbuild cc --show-stats` counters), /healthz and /readyz over
    /// HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// TLS and API key; `casbuild cc` passes them on through the environment (CASBUILD_API_KEY, ...).
    #[command(flatten)]
    auth: crate::cmd::client_args::ClientAuth,
}

/// `casbuild daemon`.
pub async fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let connect = args.auth.options()?;
    if let Some(config) = &args.config {
        tracing::info!("settings from {}", config.display());
    }
    let ready: crate::cmd::ops::Readiness = Arc::new(|| Box::pin(async { Ok(()) }));
    crate::cmd::ops::serve_if(args.metrics_listen, ready, None).await?;
    let DaemonArgs { remote, instance, socket, local_jobs, idle, .. } = args;
    casbuild_cc::daemon::run(DaemonConfig { remote, instance, socket, local_jobs, idle, connect }).await
}
