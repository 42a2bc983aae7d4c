//! `casbuild`: the one binary. Parses arguments, wires the library crates
//! together and presents errors; the work itself lives in the crates.

mod claims;
mod cmd;
mod config;
mod config_file;
mod telemetry;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// A content-addressed build filesystem and remote executor (REAPI v2).
#[derive(Parser)]
#[command(name = "casbuild", version, about)]
struct Cli {
    /// Log lines on stderr as text, or as one JSON object per line. Which events: CASBUILD_LOG or RUST_LOG
    /// (e.g. `debug`, `casbuild_coordinator=debug`) [default: info for up, coordinator and worker; warn
    /// otherwise].
    #[arg(long, global = true, value_enum, default_value = "text", env = "CASBUILD_LOG_FORMAT")]
    log_format: LogFormat,
    /// Export traces (spans per request, action and run) over OTLP/gRPC to this collector, like
    /// http://127.0.0.1:4317; a client's W3C traceparent is continued through the coordinator to the worker.
    #[arg(long, global = true, env = "CASBUILD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator and a local worker together: remote execution on this machine.
    Up(cmd::up::Args),
    /// Pull actions from a coordinator and run them sandboxed over this host's /cas mount.
    Worker(cmd::worker::Args),
    /// Run the REAPI server (CAS, ByteStream, action cache) on local storage.
    Coordinator(cmd::coordinator::Args),
    /// Run one action sandboxed on this host: a stored Action, or a command over a directory.
    Exec(cmd::exec::Args),
    /// Compile on the cluster: `make CC="casbuild cc gcc"`; anything but a compile runs locally.
    Cc(cmd::cc::Args),
    /// The per-host daemon behind `casbuild cc` (started by it on demand).
    Daemon(cmd::cc::DaemonArgs),
    /// Whole build graphs: check one, or run one on the cluster.
    #[command(subcommand)]
    Graph(cmd::graph::Command),
    /// Mount a remote CAS as a lazily fetched, read-only filesystem.
    Mount(cmd::mount::Args),
    /// Upload, download and list blobs and trees in a remote CAS.
    #[command(subcommand)]
    Cas(cmd::cas::Command),
    /// API keys for a coordinator's [auth] table.
    #[command(subcommand)]
    Auth(cmd::auth::Command),
    /// Measure casbuild against baselines taken in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
}

fn main() -> std::process::ExitCode {
    // The sandbox helper runs before anything else starts threads.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == casbuild_exec::sandbox::HELPER_ARG) {
        return casbuild_exec::sandbox::helper_main(&args[2..]);
    }
    // Run as gcc, g++, cc or c++ from an `--install-links` directory.
    let name = args.first().map(std::path::Path::new).and_then(|p| p.file_name()).and_then(|n| n.to_str());
    if let Some(name) = name.filter(|n| cmd::cc::MASQUERADE.contains(n)) {
        let rest = args[1..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
        return cmd::cc::masquerade(name, rest);
    }
    // The serving roles read their config file (flags over file over defaults).
    let cli = match config_file::matches(Cli::command(), args).and_then(|m| Ok(Cli::from_arg_matches(&m)?)) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("casbuild: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("casbuild: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let role = match &cli.command {
        Command::Up(_) => Some("up"),
        Command::Coordinator(_) => Some("coordinator"),
        Command::Worker(_) => Some("worker"),
        _ => None,
    };
    // The exporter's gRPC client needs the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        telemetry::init(
            cli.log_format,
            if role.is_some() { "info" } else { "warn" },
            cli.otlp_endpoint.as_deref(),
            role,
        )
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("casbuild: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Coordinator(args) => cmd::coordinator::run(args).await,
            Command::Up(args) => cmd::up::run(args).await,
            Command::Auth(command) => cmd::auth::run(command),
            Command::Worker(args) => cmd::worker::run(args).await,
            Command::Mount(args) => cmd::mount::run(args).await,
            Command::Exec(args) => cmd::exec::run(args).await,
            Command::Graph(command) => cmd::graph::run(command).await,
            Command::Cc(args) => cmd::cc::run(args).await,
            Command::Daemon(args) => cmd::cc::daemon(args).await,
            Command::Cas(command) => cmd::cas::run(command).await,
            Command::Bench(command) => cmd::bench::run(command).await,
        }
    });
    // Spans still buffered go out before the process ends.
    {
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("casbuild: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
