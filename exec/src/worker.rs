//! The worker's side of the Workers protocol (`proto/worker.proto`): register
//! with a session secret of this process's own, heartbeat the host's load,
//! take leases from the stream, run each through a [`Runner`], report it,
//! stop a lease the coordinator cancels, and on shutdown take no new leases
//! but finish the running ones.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::RemoteChannel;
use casbuild_proto::worker::complete_request::Outcome;
use casbuild_proto::worker::lease_update::Update;
use casbuild_proto::worker::workers_client::WorkersClient;
use casbuild_proto::worker::{
    CompleteRequest, HeartbeatRequest, Lease, LeaseError, LeaseUpdate, LeasesRequest, LeaveRequest, PlatformProperty,
    RanRequest, RegisterRequest,
};
use tokio::task::AbortHandle;
use tonic::Code;

use crate::runner::{ActionError, Runner};

type Client = WorkersClient<RemoteChannel>;

/// Why a worker could not join a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The coordinator does not accept this worker's credentials.
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    /// Anything else (unreachable, a bad request).
    #[error("registering: {0}")]
    Failed(String),
}

/// A worker registered with a coordinator, ready to serve leases.
pub struct Session {
    client: Client,
    register: RegisterRequest,
    interval: Duration,
}

impl Session {
    /// Registers as `worker_id`, offering `platform` and `slots`, under a
    /// session secret this process picks: the coordinator gives the id (and
    /// its leases) to no one else while this session lives.
    pub async fn register(
        channel: RemoteChannel,
        worker_id: String,
        platform: Vec<PlatformProperty>,
        slots: u32,
    ) -> Result<Session, RegisterError> {
        let mut client = WorkersClient::new(channel);
        let register = RegisterRequest {
            worker_id,
            platform,
            slots,
            version: env!("CARGO_PKG_VERSION").into(),
            session: uuid::Uuid::new_v4().simple().to_string(),
        };
        let interval = match client.register(register.clone()).await {
            Ok(response) => Duration::from_millis(response.into_inner().heartbeat_interval_ms.max(10) as u64),
            Err(status) if status.code() == Code::Unauthenticated => {
                return Err(RegisterError::Refused(status.message().to_owned()))
            }
            Err(status) => return Err(RegisterError::Failed(status.message().to_owned())),
        };
        Ok(Session { client, register, interval })
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.register.worker_id
    }

    /// Serves leases with `runner` until `stop` resolves, then takes no new
    /// ones and returns once the running ones have been reported. A broken
    /// lease stream is reopened (registering again) every heartbeat interval.
    pub async fn serve(self, runner: Arc<Runner>, stop: impl Future<Output = ()>) {
        let Session { mut client, register, interval } = self;
        let (id, session) = (register.worker_id.clone(), register.session.clone());
        let running = Arc::new(AtomicU32::new(0));
        let active: Active = Arc::new(Mutex::new(HashMap::new()));
        let heartbeats = tokio::spawn(heartbeat_loop(client.clone(), register.clone(), interval, running.clone()));
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        'serve: loop {
            let leases = LeasesRequest { worker_id: id.clone(), session: session.clone() };
            let mut stream = match client.leases(leases).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    tracing::warn!("opening the lease stream: {}; retrying", status.message());
                    tokio::select! {
                        () = tokio::time::sleep(interval) => { let _ = client.register(register.clone()).await; continue 'serve }
                        () = &mut stop => break 'serve,
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
                    () = &mut stop => break 'serve,
                }
            }
        }
        // Drain: no new leases (the stream is closed), finish the running ones.
        tracing::info!("worker {id}: draining {} running actions", running.load(Ordering::Relaxed));
        while tasks.join_next().await.is_some() {}
        heartbeats.abort();
        // The id is free for the next process at once, not after the lease timeout.
        let leave = LeaveRequest { worker_id: id.clone(), session };
        if let Err(status) = tokio::time::timeout(Duration::from_secs(5), client.leave(leave))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within 5 s")))
        {
            tracing::warn!("worker {id}: leaving: {}", status.message());
        }
    }
}

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

/// Tells the coordinator, without waiting for its answer, that the lease's
/// command has ended: its slot may take the next lease while the outputs
/// are uploaded. A lost message only delays that until Complete.
fn ran(client: &Client, id: &str, session: &str, lease_id: &str) -> impl Fn() + Send + Sync {
    let request = RanRequest { worker_id: id.to_owned(), session: session.to_owned(), lease_id: lease_id.to_owned() };
    let client = client.clone();
    move || {
        let (mut client, request) = (client.clone(), request.clone());
        tokio::spawn(async move {
            if let Err(status) = client.ran(request).await {
                tracing::debug!("telling the coordinator a command ended: {}", status.message());
            }
        });
    }
}

/// The Action and Command the lease carries, if it carries them (taken out
/// of it, not copied).
fn encoded(lease: &mut Lease) -> Option<(Bytes, Bytes)> {
    let (action, command) = (std::mem::take(&mut lease.action), std::mem::take(&mut lease.command));
    (!action.is_empty() && !command.is_empty()).then(|| (Bytes::from(action), Bytes::from(command)))
}

/// Runs one lease and reports it.
async fn run_lease(runner: &Runner, mut client: Client, id: &str, session: &str, mut lease: Lease) {
    let action = lease.action_digest.as_ref().and_then(|d| {
        let function = DigestFunction::resolve(lease.digest_function, &d.hash).ok()?;
        Digest::from_hex(function, &d.hash, d.size_bytes).ok()
    });
    let error = |e: ActionError| {
        let missing = match &e {
            ActionError::MissingBlobs(missing) => missing.iter().map(Digest::to_proto).collect(),
            _ => Vec::new(),
        };
        Outcome::Error(LeaseError { code: e.code() as i32, message: e.message(), missing })
    };
    let mut request = CompleteRequest {
        worker_id: id.to_owned(),
        lease_id: lease.lease_id.clone(),
        session: session.to_owned(),
        ..Default::default()
    };
    let known = encoded(&mut lease);
    // The run continues the trace of the coordinator's span for the action.
    let span = tracing::info_span!("lease", lease = %lease.lease_id);
    casbuild_proto::trace::continue_trace(&span, &lease.traceparent);
    request.outcome = Some(match action {
        None => error(ActionError::Invalid("the lease has no valid action digest".into())),
        Some(action) => match runner
            .execute_known_then(&lease.instance_name, &action, known, &ran(&client, id, session, &lease.lease_id))
            .instrument(span)
            .await
        {
            Ok(execution) => {
                request.message = execution.message;
                request.timed_out = execution.report.timed_out;
                request.do_not_cache = execution.do_not_cache;
                Outcome::ActionResult(execution.result)
            }
            Err(e) => error(e),
        },
    });
    if let Err(status) = client.complete(request).await {
        tracing::warn!("reporting lease {}: {}", lease.lease_id, status.message());
    }
}
