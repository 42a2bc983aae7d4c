//! `casbuild worker`: pulls leases from a coordinator and runs them through
//! the sandbox over this host's /cas mount.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{RemoteChannel, RemoteStore, RemoteStoreOptions};
use casbuild_exec::runner::{ExecError, Runner, RunnerConfig};
use casbuild_proto::worker::complete_request::Outcome;
use casbuild_proto::worker::lease_update::Update;
use casbuild_proto::worker::workers_client::WorkersClient;
use casbuild_proto::worker::{
    BlobDigest, CompleteRequest, HeartbeatRequest, Lease, LeaseError, LeaseUpdate, LeasesRequest, PlatformProperty,
    RegisterRequest,
};
use prost::Message;
use tokio::task::AbortHandle;
use tonic::Code;

use crate::cmd::coordinator::shutdown_signal;
use crate::cmd::mount::mount_cas;
use crate::cmd::sandbox_args::SandboxArgs;
use crate::config::{default_data_dir, parse_size, secret};

#[derive(clap::Args)]
pub struct Args {
    /// The coordinator, as grpc://HOST:PORT (grpcs:// for TLS).
    #[arg(long, env = "CASBUILD_COORDINATOR", default_value = "grpc://127.0.0.1:8980")]
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
    #[command(flatten)]
    sandbox: SandboxArgs,
}

type Client = WorkersClient<RemoteChannel>;

/// Leases being run, by id, so that a cancellation can stop one.
type Active = Arc<Mutex<HashMap<String, AbortHandle>>>;

/// Bookkeeping when a lease's task ends, whether it finished or was aborted.
struct LeaseDone {
    running: Arc<AtomicU32>,
    active: Active,
    lease_id: String,
}

impl Drop for LeaseDone {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.active.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.lease_id);
    }
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
        let found = crate::cmd::cc::find_on_path(&compiler.to_string_lossy(), None)
            .with_context(|| format!("--compiler {}: not found on PATH", compiler.display()))?;
        let identity =
            crate::cmd::cc::compiler_identity(&found).with_context(|| format!("--compiler {}", compiler.display()))?;
        println!("compiler {}: {}={identity}", compiler.display(), crate::cmd::cc::COMPILER_PROPERTY);
        platform.push(PlatformProperty { name: crate::cmd::cc::COMPILER_PROPERTY.into(), value: identity });
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
    let remote = RemoteStore::connect(&args.coordinator, RemoteStoreOptions { connect, ..Default::default() })
        .await
        .with_context(|| format!("connecting to {}", args.coordinator))?;
    let mut client: Client = WorkersClient::new(remote.channel());
    // This process's secret: the coordinator gives the id (and its leases)
    // to no one else while this session lives.
    let session = uuid::Uuid::new_v4().simple().to_string();
    let register = RegisterRequest {
        worker_id: id.clone(),
        platform,
        slots,
        version: env!("CARGO_PKG_VERSION").into(),
        session: session.clone(),
    };
    let interval = match client.register(register.clone()).await {
        Ok(response) => Duration::from_millis(response.into_inner().heartbeat_interval_ms.max(10) as u64),
        Err(status) if status.code() == Code::Unauthenticated => {
            bail!("the coordinator refused this worker: {}", status.message())
        }
        Err(status) => bail!("registering with {}: {}", args.coordinator, status.message()),
    };

    let timeout = Duration::from_secs(60);
    let mount =
        mount_cas(&args.mount, &cache_dir, args.cache_size, remote.clone(), timeout, args.sandbox.mount_options());
    let mount = Arc::new(mount.await?);
    let mut config = RunnerConfig::new(scratch, std::env::current_exe().context("finding casbuild itself")?);
    config.worker_name = id.clone();
    args.sandbox.apply(&mut config, u64::from(slots))?;
    let runner = Arc::new(Runner::new(config, mount.clone(), remote)?);
    let signal = shutdown_signal()?;
    println!("casbuild worker {id} serving {} with {slots} slots, /cas at {}", args.coordinator, args.mount.display());

    let running = Arc::new(AtomicU32::new(0));
    let active: Active = Arc::new(Mutex::new(HashMap::new()));
    let heartbeats = tokio::spawn(heartbeat_loop(client.clone(), register.clone(), interval, running.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(signal);
    'serve: loop {
        let leases = LeasesRequest { worker_id: id.clone(), session: session.clone() };
        let mut stream = match client.leases(leases).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                tracing::warn!("opening the lease stream: {}; retrying", status.message());
                tokio::select! {
                    () = tokio::time::sleep(interval) => { let _ = client.register(register.clone()).await; continue 'serve }
                    () = &mut signal => break 'serve,
                }
            }
        };
        loop {
            tokio::select! {
                update = stream.message() => match update {
                    Ok(Some(LeaseUpdate { update: Some(Update::Lease(lease)) })) => {
                        let (runner, client, id, session) = (runner.clone(), client.clone(), id.clone(), session.clone());
                        let lease_id = lease.lease_id.clone();
                        let on_exit = LeaseDone { running: running.clone(), active: active.clone(), lease_id: lease_id.clone() };
                        running.fetch_add(1, Ordering::Relaxed);
                        // Insert under the lock, so the task cannot remove itself first.
                        let mut table = active.lock().unwrap_or_else(|e| e.into_inner());
                        let handle = tasks.spawn(async move {
                            let _on_exit = on_exit;
                            run_lease(&runner, client, &id, &session, lease).await;
                        });
                        table.insert(lease_id, handle);
                    }
                    Ok(Some(LeaseUpdate { update: Some(Update::CancelLeaseId(lease_id)) })) => {
                        // Dropping the run kills its sandbox and releases its input root.
                        if let Some(handle) = active.lock().unwrap_or_else(|e| e.into_inner()).get(&lease_id) {
                            handle.abort();
                        }
                    }
                    Ok(Some(LeaseUpdate { update: None })) => {}
                    // The coordinator went away or dropped us: register again.
                    Ok(None) | Err(_) => {
                        tokio::time::sleep(interval).await;
                        let _ = client.register(register.clone()).await;
                        continue 'serve;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = &mut signal => break 'serve,
            }
        }
    }
    // Drain: no new leases (the stream is closed), finish the running ones.
    eprintln!("casbuild worker {id}: draining {} running actions", running.load(Ordering::Relaxed));
    while tasks.join_next().await.is_some() {}
    heartbeats.abort();
    drop(runner);
    tokio::task::spawn_blocking(move || mount.shutdown()).await?.context("unmounting /cas")?;
    // Scratch directories still being deleted in the background.
    casbuild_exec::scratch::flush();
    eprintln!("casbuild worker {id} stopped");
    Ok(())
}

/// Reports load every `interval`; re-registers if the coordinator forgot us.
async fn heartbeat_loop(mut client: Client, register: RegisterRequest, interval: Duration, running: Arc<AtomicU32>) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    loop {
        tokio::time::sleep(interval).await;
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(0.0);
        let ours = running.load(Ordering::Relaxed);
        // Idle CPUs, not counting what our own actions keep busy.
        let others = (load - ours as f64).max(0.0);
        let free_cpus = (cpus - others).round().max(1.0) as u32;
        let beat = HeartbeatRequest {
            worker_id: register.worker_id.clone(),
            session: register.session.clone(),
            running: ours,
            slots: register.slots,
            load_15s: load,
            free_cpus,
        };
        if let Err(status) = client.heartbeat(beat).await {
            if status.code() == Code::NotFound {
                let _ = client.register(register.clone()).await;
            }
        }
    }
}

/// Runs one lease and reports it.
async fn run_lease(runner: &Runner, mut client: Client, id: &str, session: &str, lease: Lease) {
    let action = lease.action_digest.as_ref().and_then(|d| {
        let function = DigestFunction::resolve(lease.digest_function, &d.hash).ok()?;
        Digest::from_hex(function, &d.hash, d.size_bytes).ok()
    });
    let error = |code: Code, message: String, missing: Vec<BlobDigest>| {
        Outcome::Error(LeaseError { code: code as i32, message, missing })
    };
    let mut request = CompleteRequest {
        worker_id: id.to_owned(),
        lease_id: lease.lease_id.clone(),
        session: session.to_owned(),
        ..Default::default()
    };
    request.outcome = Some(match action {
        None => error(Code::InvalidArgument, "the lease has no valid action digest".into(), vec![]),
        Some(action) => match runner.execute_in(&lease.instance_name, &action).await {
            Ok(execution) => {
                request.message = execution.message;
                request.timed_out = execution.report.timed_out;
                request.do_not_cache = execution.do_not_cache;
                Outcome::ActionResult(execution.result.encode_to_vec())
            }
            Err(ExecError::MissingBlobs(missing)) => {
                let digests = missing
                    .iter()
                    .map(|d| BlobDigest { hash: d.hash_hex(), size_bytes: d.size_bytes as i64 })
                    .collect();
                error(Code::FailedPrecondition, "inputs are missing from the CAS".into(), digests)
            }
            Err(ExecError::Invalid(message)) => error(Code::InvalidArgument, message, vec![]),
            Err(ExecError::Infrastructure(message)) => error(Code::Unavailable, message, vec![]),
        },
    });
    if let Err(status) = client.complete(request).await {
        tracing::warn!("reporting lease {}: {}", lease.lease_id, status.message());
    }
}
