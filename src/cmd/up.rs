//! `casbuild up`: a coordinator and one local worker in one process, on an
//! embedded store — remote execution for one machine with no configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use casbuild_cas::storage::{Storage, StorageConfig};
use casbuild_cas::store::CasInstances;
use casbuild_coordinator::status_page::{self, StatusPage};
use casbuild_coordinator::{
    ActionError, ActionExecutor, ActionRequest, Executed, ExecutionConfig, Scheduler, ServerConfig,
};
use casbuild_exec::runner::{Runner, RunnerConfig};

use crate::cmd::coordinator::shutdown_signal;
use crate::cmd::mount::mount_cas;
use crate::cmd::sandbox_args::SandboxArgs;
use crate::config::{default_data_dir, parse_size};

#[derive(clap::Args)]
pub struct Args {
    /// TOML file whose keys are any of these flags (`max_disk = "20GiB"`) [default:
    /// $XDG_CONFIG_HOME/casbuild/up.toml, else /etc/casbuild/up.toml]. Example: docs/config/up.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve on (port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8980")]
    listen: SocketAddr,
    /// Directory for the store, the worker's cache, its mount and scratch space
    /// [default: $XDG_CACHE_HOME/casbuild].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Disk budget of the store; least recently used blobs are evicted beyond it.
    #[arg(long, value_parser = parse_size, default_value = "20GiB")]
    max_disk: u64,
    /// Actions run at once [default: the number of CPUs].
    #[arg(long)]
    slots: Option<usize>,
    /// Listen beyond loopback although `up` has no authentication: anyone who reaches the port may then
    /// write the cache and run commands as this machine's sandbox users.
    #[arg(long)]
    insecure: bool,
    /// Serve Prometheus metrics (/metrics), liveness (/healthz) and readiness (/readyz) over HTTP on this
    /// address (no authentication: keep it on loopback).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// The worker inside `casbuild up`: runs actions through the sandbox over its
/// /cas mount of the coordinator's store, called by the scheduler in-process.
#[derive(Default)]
struct LocalWorker {
    runner: tokio::sync::OnceCell<Runner>,
}

#[tonic::async_trait]
impl ActionExecutor for LocalWorker {
    async fn execute(&self, request: ActionRequest) -> Result<Executed, ActionError> {
        let runner = self.runner.get().ok_or_else(|| ActionError::Unavailable("the worker is starting".into()))?;
        request.started.on(runner.worker_name());
        // The scheduler's slot is free for the next action once the command
        // has ended; this action's outputs are uploaded meanwhile.
        let ran = request.ran.clone();
        let execution =
            runner.execute_known_then(&request.instance, &request.action, request.encoded, &move || ran.on()).await?;
        Ok(Executed {
            result: execution.result,
            message: execution.message,
            timed_out: execution.report.timed_out,
            do_not_cache: execution.do_not_cache,
        })
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback() || args.insecure,
        "casbuild up has no authentication: listening on {} would let anyone who reaches it write the cache and \
         run commands here; listen on loopback, run `casbuild coordinator` with an [auth] table for a shared \
         cluster, or give --insecure to accept that",
        args.listen
    );
    let dir = args.dir.unwrap_or_else(default_data_dir);
    let _claims = crate::claims::claim(
        "up",
        &[("store", &dir.join("store")), ("mount", &dir.join("cas")), ("scratch", &dir.join("scratch"))],
    )?;
    // A scratch directory casbuild may not clear is refused before anything starts.
    casbuild_exec::scratch::prepare_root(&dir.join("scratch")).map_err(anyhow::Error::msg)?;
    if args.metrics_listen.is_some() {
        // Before the storage opens: it reports what it holds as it does.
        crate::cmd::ops::install_recorder()?;
    }
    let mut storage_config = StorageConfig::new(dir.join("store"));
    storage_config.max_disk = args.max_disk;
    let config = storage_config.clone();
    let storage = Arc::new(
        tokio::task::spawn_blocking(move || Storage::open(&config))
            .await?
            .with_context(|| format!("opening storage in {}", storage_config.dir.display()))?,
    );
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("grpc://{addr}");
    let slots = args.slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let worker = Arc::new(LocalWorker::default());
    let scheduler = Scheduler::new(storage.clone(), worker.clone(), slots);
    let page = StatusPage { storage: storage.clone(), scheduler: scheduler.clone(), workers: None, role: "up" };
    let ready = crate::cmd::ops::storage_ready(storage.clone());
    crate::cmd::ops::serve_if(args.metrics_listen, ready, Some(status_page::router(page))).await?;
    let stopping = Arc::new(tokio::sync::Notify::new());
    let stop = stopping.clone();
    let server = tokio::spawn(casbuild_coordinator::serve_with_execution(
        listener,
        storage.clone(),
        ServerConfig::default(),
        Some(ExecutionConfig { scheduler, workers: None }),
        async move { stop.notified().await },
    ));

    // The worker half reads and writes the coordinator's own store: its /cas
    // mount opens the store's files, so each blob is on disk once, under
    // one budget, and no blob crosses a socket.
    let mountpoint = dir.join("cas");
    let timeout = Duration::from_secs(60);
    let local = storage.disk().clone();
    let cas: Arc<dyn CasInstances> = storage.clone();
    let mount = Arc::new(mount_cas(&mountpoint, local, cas.clone(), "", timeout, args.sandbox.mount_options()).await?);
    let helper = std::env::current_exe().context("finding casbuild itself")?;
    let mut config = RunnerConfig::new(dir.join("scratch"), helper);
    args.sandbox.apply(&mut config, slots as u64)?;
    let runner = Runner::new(config, mount.clone(), cas)?;
    // The scheduler may hand out actions only once this passes.
    if let Err(why) = runner.self_test("").await {
        anyhow::bail!("the sandbox self-test (running `true` the way every action runs) failed: {why}");
    }
    let _ = worker.runner.set(runner);

    let shutdown = shutdown_signal()?;
    println!("casbuild up listening on {url}");
    println!("store: {}; worker: {slots} slots, /cas at {}", dir.join("store").display(), mountpoint.display());
    if let Some(config) = &args.config {
        println!("settings from {}", config.display());
    }
    println!("for Bazel, add to .bazelrc:");
    println!("  build --remote_executor={url}");
    println!("  build --remote_timeout=3600");
    println!("for casbuild cc, graph, cas and mount: export CASBUILD_REMOTE={url}");
    shutdown.await;
    stopping.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    if let Some(runner) = worker.runner.get() {
        runner.close().await;
    }
    tokio::task::spawn_blocking(move || mount.shutdown()).await?.context("unmounting /cas")?;
    // Scratch directories still being deleted in the background.
    casbuild_exec::scratch::flush();
    tracing::info!("casbuild up stopped");
    Ok(())
}
