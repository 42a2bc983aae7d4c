//! `casbuild worker`: pulls leases from a coordinator and runs them through
//! the sandbox over this host's /cas mount. The lease loop is
//! `casbuild_exec::worker`; this is its wiring.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use casbuild_cas::store::{RemoteStore, RemoteStoreOptions};
use casbuild_exec::runner::{Runner, RunnerConfig};
use casbuild_exec::worker::{RegisterError, Session};
use casbuild_mount::PrefetchLimits;
use casbuild_proto::worker::PlatformProperty;

use crate::cmd::coordinator::shutdown_signal;
use crate::cmd::mount::{mount_cas, open_cache, retrying};
use crate::cmd::sandbox_args::SandboxArgs;
use crate::config::{default_data_dir, parse_size, secret};

#[derive(clap::Args)]
pub struct Args {
    /// TOML file whose keys are any of these flags (`cache_size = "20GiB"`) [default:
    /// $XDG_CONFIG_HOME/casbuild/worker.toml, else /etc/casbuild/worker.toml]. Example: docs/config/worker.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The coordinator, as grpc://HOST:PORT (grpcs:// for TLS).
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    coordinator: String,
    /// Where to mount the CAS.
    #[arg(long, default_value = "/cas")]
    mount: PathBuf,
    /// Actions run at once [default: the number of CPUs].
    #[arg(long)]
    slots: Option<u32>,
    /// Scratch space for actions [default: $XDG_CACHE_HOME/casbuild/worker-scratch].
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Local blob cache [default: $XDG_CACHE_HOME/casbuild/worker-cache].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Byte budget of the local blob cache.
    #[arg(long, value_parser = parse_size, default_value = "20GiB")]
    cache_size: u64,
    /// Most bytes of inputs prefetched for one action: those the last run of the same command opened on this
    /// worker (its access profile, kept in the cache directory); 0 turns prefetching off.
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    prefetch_bytes: u64,
    /// Inputs of one action prefetched at once.
    #[arg(long, default_value_t = 16)]
    prefetch_concurrency: usize,
    /// The secret the coordinator asks workers for.
    #[arg(long, env = "CASBUILD_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// A file whose first line is the worker token (keeps it out of `ps`).
    #[arg(long)]
    worker_token_file: Option<PathBuf>,
    #[command(flatten)]
    auth: crate::cmd::client_args::ClientAuth,
    /// This worker's id, also reported in results [default: HOSTNAME-PID].
    #[arg(long)]
    name: Option<String>,
    /// NAME=VALUE platform property this worker offers; repeatable.
    #[arg(long = "platform")]
    platform: Vec<String>,
    /// A compiler this worker runs for `casbuild cc` (offered as its
    /// identity, the casbuild-compiler property); repeatable.
    #[arg(long = "compiler")]
    compilers: Vec<PathBuf>,
    /// Serve Prometheus metrics (/metrics), liveness (/healthz) and readiness (/readyz) over HTTP on this
    /// address (no authentication: keep it on loopback or a management network).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let id = args.name.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{host}-{}", std::process::id())
    });
    let slots = args.slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
    // A scratch directory casbuild may not clear is refused before anything starts.
    let scratch = args.scratch.clone().unwrap_or_else(|| default_data_dir().join("worker-scratch"));
    let cache_dir = args.cache_dir.clone().unwrap_or_else(|| default_data_dir().join("worker-cache"));
    let _claims =
        crate::claims::claim("worker", &[("mount", &args.mount), ("scratch", &scratch), ("cache", &cache_dir)])?;
    casbuild_exec::scratch::prepare_root(&scratch).map_err(anyhow::Error::msg)?;
    let platform = args
        .platform
        .iter()
        .map(|p| match p.split_once('=') {
            Some((name, value)) => Ok(PlatformProperty { name: name.into(), value: value.into() }),
            None => bail!("--platform {p:?} must look like NAME=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut platform = platform;
    for compiler in &args.compilers {
        let found = casbuild_cc::find_on_path(&compiler.to_string_lossy(), None)
            .with_context(|| format!("--compiler {}: not found on PATH", compiler.display()))?;
        let identity = casbuild_cc::compiler_identity(&found, &crate::cmd::cc::compiler_memo_dir())
            .with_context(|| format!("--compiler {}", compiler.display()))?;
        println!("compiler {}: {}={identity}", compiler.display(), casbuild_cc::COMPILER_PROPERTY);
        platform.push(PlatformProperty { name: casbuild_cc::COMPILER_PROPERTY.into(), value: identity });
    }
    // The worker token is the worker's API key: one credential for the
    // Workers service and the CAS alike.
    let token = secret(args.worker_token.clone(), args.worker_token_file.as_deref())?;
    let connect = match token {
        Some(token) => {
            anyhow::ensure!(
                args.auth.api_key.is_none() && args.auth.api_key_file.is_none(),
                "give a worker token or an API key, not both"
            );
            args.auth.options_with_key(Some(token))?
        }
        None => args.auth.options()?,
    };
    let remote = RemoteStore::connect(&args.coordinator, RemoteStoreOptions { connect, ..Default::default() }).await?;
    // Ready once its sandbox passed the self-test and it registered.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let registered = ready.clone();
    let readiness: crate::cmd::ops::Readiness = Arc::new(move || {
        let ready = registered.load(std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            if ready {
                Ok(())
            } else {
                Err("starting: self-test and registration".into())
            }
        })
    });
    crate::cmd::ops::serve_if(args.metrics_listen, readiness, None).await?;
    let timeout = Duration::from_secs(60);
    let local = open_cache(&cache_dir, args.cache_size).await?;
    let cas = retrying(remote.clone());
    let mount = mount_cas(&args.mount, local, cas.clone(), "", timeout, args.sandbox.mount_options());
    let mount = Arc::new(mount.await?);
    let mut config = RunnerConfig::new(scratch, std::env::current_exe().context("finding casbuild itself")?);
    config.worker_name = id.clone();
    if args.prefetch_bytes > 0 {
        // Beside the blob store's own directories (cas/, tmp/).
        config.profiles = Some(cache_dir.join("profiles"));
        config.prefetch =
            PrefetchLimits { max_bytes: args.prefetch_bytes, concurrency: args.prefetch_concurrency.max(1) };
    }
    args.sandbox.apply(&mut config, u64::from(slots))?;
    let runner = Arc::new(Runner::new(config, mount.clone(), cas)?);
    // A worker whose sandbox cannot run would fail every action it takes.
    if let Err(why) = runner.self_test("").await {
        bail!("the sandbox self-test (running `true` the way every action runs) failed, so this worker does not register: {why}");
    }
    let session = match Session::register(remote.channel(), id.clone(), platform, slots).await {
        Ok(session) => session,
        Err(e @ RegisterError::Refused(_)) => bail!("{e}"),
        Err(RegisterError::Failed(why)) => bail!("registering with {}: {why}", args.coordinator),
    };
    let signal = shutdown_signal()?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    println!("casbuild worker {id} serving {} with {slots} slots, /cas at {}", args.coordinator, args.mount.display());
    if let Some(config) = &args.config {
        println!("settings from {}", config.display());
    }
    session.serve(runner.clone(), signal).await;
    runner.close().await;
    tokio::task::spawn_blocking(move || mount.shutdown()).await?.context("unmounting /cas")?;
    // Scratch directories still being deleted in the background.
    casbuild_exec::scratch::flush();
    tracing::info!("casbuild worker {id} stopped");
    Ok(())
}
