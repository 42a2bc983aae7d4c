//! Remote workers: the `Workers` service of `proto/worker.proto` and the pool
//! that places actions on them.
//!
//! Placement follows yadcc: a worker's effective capacity is the smaller of
//! its slots and its idle CPUs; a lease goes to the worker with the lowest
//! running/effective ratio that matches the action's platform, and never to
//! a full one — when every worker is full, actions wait in the queue. A worker
//! that misses heartbeats loses its leases, which are requeued (a bounded
//! number of times, then the action fails with UNAVAILABLE).
//!
//! Slots and idle CPUs are the worker's claims; what it has shown counts too.
//! Like TCP's slow start, a newly registered worker is trusted with
//! [`INITIAL_CAPACITY`] leases at once, and each action it completes with a
//! result raises that by one (doubling per round), up to its slots (at most
//! [`MAX_SLOTS`]). A worker that registers with a huge capacity and sits on
//! its leases holds only a few actions until they expire.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::worker::complete_request::Outcome;
use casbuild_proto::worker::lease_update::Update;
use casbuild_proto::worker::workers_server::Workers;
use casbuild_proto::worker::{
    CompleteRequest, CompleteResponse, HeartbeatRequest, HeartbeatResponse, Lease, LeaseUpdate, LeasesRequest,
    LeaveRequest, LeaveResponse, RanRequest, RanResponse, RegisterRequest, RegisterResponse,
};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Request, Response, Status};

use crate::scheduler::{ActionError, ActionExecutor, ActionRequest, Executed, Started};

/// How often workers heartbeat, and how long leases last without one.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The interval workers are told to heartbeat at.
    pub heartbeat_interval: Duration,
    /// Heartbeats a worker may miss before it loses its leases.
    pub missed_heartbeats: u32,
    /// Times an action is requeued after its worker vanished.
    pub max_attempts: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { heartbeat_interval: Duration::from_secs(3), missed_heartbeats: 3, max_attempts: 3 }
    }
}

type ActionOutcome = Result<Executed, ActionError>;

/// An action waiting for, or running on, a worker.
struct Pending {
    /// Identifies the request across queue and leases, for cancellation.
    ticket: u64,
    priority: i32,
    instance: String,
    action: Digest,
    platform: Vec<(String, String)>,
    /// The encoded Action and Command, sent with the lease when small.
    encoded: Option<(Bytes, Bytes)>,
    /// The trace context the worker's run continues.
    traceparent: String,
    /// When it was first queued.
    queued: Instant,
    attempts: u32,
    started: Started,
    done: oneshot::Sender<ActionOutcome>,
}

/// The most bytes of Action and Command a lease carries (a lease stream
/// message must stay far below the 4 MiB a client decodes by default).
const MAX_ENCODED_IN_LEASE: usize = 256 << 10;

/// Leases a newly registered worker may hold at once.
pub const INITIAL_CAPACITY: u32 = 4;

/// The most slots a worker may claim.
pub const MAX_SLOTS: u32 = 1024;

struct Worker {
    /// The secret of the process that registered this id.
    session: String,
    platform: Vec<(String, String)>,
    /// `platform` as a metric label ([`platform_label`]), made once.
    label: String,
    slots: u32,
    free_cpus: u32,
    /// Leases it may hold at once by what it has shown (slow start).
    proven: u32,
    running: Vec<String>,
    /// Those of `running` whose command has ended (the worker said so) and
    /// whose outputs are on their way: they hold no slot.
    finishing: Vec<String>,
    last_heartbeat: Instant,
    leases: Option<mpsc::Sender<Result<LeaseUpdate, Status>>>,
}

impl Worker {
    fn effective(&self) -> u32 {
        self.slots.min(self.free_cpus.max(1)).min(self.proven)
    }

    /// Whether it offers every property of `platform`.
    fn offers(&self, platform: &[(String, String)]) -> bool {
        platform.iter().all(|p| self.platform.contains(p))
    }

    /// Leases whose command still runs.
    fn busy(&self) -> u32 {
        self.running.len().saturating_sub(self.finishing.len()) as u32
    }

    /// Whether it may take another lease for `platform`: a free slot, and
    /// no more than twice its capacity held in all (a worker that says
    /// every command ended at once cannot take the whole queue).
    fn can_take(&self, platform: &[(String, String)]) -> bool {
        let effective = self.effective();
        self.leases.is_some()
            && self.busy() < effective
            && (self.running.len() as u32) < effective.saturating_mul(2)
            && self.offers(platform)
    }

    /// Forgets lease `lease_id` (completed or withdrawn).
    fn release(&mut self, lease_id: &str) {
        self.running.retain(|l| l != lease_id);
        self.finishing.retain(|l| l != lease_id);
    }
}

#[derive(Default)]
struct Pool {
    workers: HashMap<String, Worker>,
    /// Ordered by priority (lower first), then arrival.
    queue: VecDeque<Pending>,
    next_ticket: u64,
    /// Lease id → the action and the worker running it.
    leased: HashMap<String, (Pending, String)>,
    /// The platform labels of the queue gauge published last.
    published: std::collections::HashSet<String>,
}

/// One worker as a status page shows it.
#[derive(Clone, Debug)]
pub struct WorkerView {
    /// Its id.
    pub name: String,
    /// The slots it registered with.
    pub slots: u32,
    /// The leases it may hold now (free CPUs and slow start included).
    pub usable: u32,
    /// The actions it runs, with their instances.
    pub running: Vec<(String, Digest)>,
    /// What it offers.
    pub platform: Vec<(String, String)>,
    /// Time since its last heartbeat.
    pub since_heartbeat: Duration,
    /// Whether its lease stream is open.
    pub connected: bool,
}

/// Sets the pool's gauges: workers connected, their slots, the leases
/// they hold (actions running on them), and the actions waiting, by the
/// platform of the workers that could run them (`none`: no registered
/// worker offers what they ask for). Labels name registered workers'
/// platforms only, never what a client asked for, so clients cannot grow
/// the label set.
fn publish(pool: &mut Pool) {
    metrics::gauge!("casbuild_workers_connected").set(pool.workers.len() as f64);
    metrics::gauge!("casbuild_worker_slots").set(pool.workers.values().map(|w| f64::from(w.slots)).sum::<f64>());
    metrics::gauge!("casbuild_worker_leases").set(pool.leased.len() as f64);
    let mut offered: Vec<&Worker> = pool.workers.values().collect();
    offered.sort_by(|a, b| a.label.cmp(&b.label));
    offered.dedup_by(|a, b| a.label == b.label);
    let mut asked: HashMap<&[(String, String)], usize> = HashMap::new();
    for pending in &pool.queue {
        *asked.entry(pending.platform.as_slice()).or_default() += 1;
    }
    let mut waiting: HashMap<String, usize> = HashMap::new();
    for (platform, count) in asked {
        let serves = offered.iter().find(|w| w.offers(platform));
        *waiting.entry(serves.map_or_else(|| "none".to_owned(), |w| w.label.clone())).or_default() += count;
    }
    for gone in pool.published.iter().filter(|label| !waiting.contains_key(*label)) {
        metrics::gauge!("casbuild_worker_queue", "platform" => gone.clone()).set(0.0);
    }
    for (label, count) in &waiting {
        metrics::gauge!("casbuild_worker_queue", "platform" => label.clone()).set(*count as f64);
    }
    pool.published = waiting.into_keys().collect();
}

/// A worker platform as a metric label: its properties, sorted, as
/// `name=value` joined by commas (`any` for a worker that offers none).
fn platform_label(platform: &[(String, String)]) -> String {
    let mut properties: Vec<String> = platform.iter().map(|(k, v)| format!("{k}={v}")).collect();
    properties.sort();
    if properties.is_empty() {
        return "any".to_owned();
    }
    properties.join(",")
}

/// The remote worker pool; an [`ActionExecutor`] for the scheduler and the
/// `Workers` gRPC service for workers.
pub struct WorkerPool {
    config: PoolConfig,
    pool: Mutex<Pool>,
}

impl WorkerPool {
    /// A pool with no workers yet; starts its heartbeat reaper.
    pub fn new(config: PoolConfig) -> Arc<Self> {
        let pool = Arc::new(WorkerPool { config, pool: Mutex::new(Pool::default()) });
        let weak = Arc::downgrade(&pool);
        let every = pool.config.heartbeat_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                pool.reap();
            }
        });
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands queued actions to workers with free capacity, least loaded first.
    /// `lease_time` is how long a lease lasts without heartbeats.
    fn dispatch(pool: &mut Pool, lease_time: Duration) {
        let mut index = 0;
        while index < pool.queue.len() {
            let platform = &pool.queue[index].platform;
            let best = pool
                .workers
                .iter()
                .filter(|(_, w)| w.can_take(platform))
                .min_by(|(_, a), (_, b)| {
                    let ratio = |w: &Worker| w.busy() as f64 / w.effective() as f64;
                    ratio(a).total_cmp(&ratio(b))
                })
                .map(|(id, _)| id.clone());
            let Some(worker_id) = best else {
                index += 1;
                continue;
            };
            let pending = pool.queue.remove(index).expect("index is in range");
            let lease_id = uuid::Uuid::new_v4().to_string();
            let mut lease = Lease {
                lease_id: lease_id.clone(),
                instance_name: pending.instance.clone(),
                digest_function: pending.action.function.to_proto() as i32,
                action_digest: Some(pending.action.to_proto()),
                deadline_unix_ms: (SystemTime::now() + lease_time)
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
                traceparent: pending.traceparent.clone(),
                ..Default::default()
            };
            if let Some((action, command)) =
                pending.encoded.as_ref().filter(|(a, c)| a.len() + c.len() <= MAX_ENCODED_IN_LEASE)
            {
                lease.action = action.to_vec();
                lease.command = command.to_vec();
            }
            let worker = pool.workers.get_mut(&worker_id).expect("chosen from the map");
            let update = LeaseUpdate { update: Some(Update::Lease(lease)) };
            let sent = worker.leases.as_ref().is_some_and(|tx| tx.try_send(Ok(update)).is_ok());
            if sent {
                let waited = pending.queued.elapsed().as_secs_f64();
                let label = worker.label.clone();
                metrics::histogram!("casbuild_worker_queue_wait_seconds", "platform" => label).record(waited);
                pending.started.on(&worker_id);
                worker.running.push(lease_id.clone());
                pool.leased.insert(lease_id, (pending, worker_id));
            } else {
                // The stream is gone or full: stop sending there, keep the action.
                worker.leases = None;
                pool.queue.insert(index, pending);
            }
        }
        publish(pool);
    }

    /// Removes workers whose heartbeats stopped and requeues their leases.
    fn reap(&self) {
        let limit = self.lease_time();
        let mut pool = self.lock();
        let dead: Vec<String> =
            pool.workers.iter().filter(|(_, w)| w.last_heartbeat.elapsed() > limit).map(|(id, _)| id.clone()).collect();
        for id in dead {
            tracing::warn!("worker {id} missed its heartbeats; requeueing its leases");
            self.forget_worker(&mut pool, &id);
        }
        Self::dispatch(&mut pool, self.lease_time());
    }

    fn forget_worker(&self, pool: &mut Pool, id: &str) {
        let Some(worker) = pool.workers.remove(id) else { return };
        publish(pool);
        for lease in worker.running {
            if let Some((mut pending, _)) = pool.leased.remove(&lease) {
                pending.attempts += 1;
                if pending.attempts > self.config.max_attempts {
                    let message = format!(
                        "action {} was lost with {} workers in a row; giving up",
                        pending.action, pending.attempts
                    );
                    let _ = pending.done.send(Err(ActionError::Unavailable(message)));
                } else {
                    Self::enqueue(&mut pool.queue, pending, true);
                }
            }
        }
    }

    /// Puts `pending` after every queued action of higher or equal priority
    /// (before equal ones when `first`: a requeued action keeps its turn).
    fn enqueue(queue: &mut VecDeque<Pending>, pending: Pending, first: bool) {
        let at = queue
            .iter()
            .position(|p| if first { p.priority >= pending.priority } else { p.priority > pending.priority })
            .unwrap_or(queue.len());
        queue.insert(at, pending);
    }

    /// Withdraws a request whose caller gave up: from the queue, or from its
    /// worker, which is told to stop running it.
    fn withdraw(&self, ticket: u64) {
        let mut pool = self.lock();
        if let Some(at) = pool.queue.iter().position(|p| p.ticket == ticket) {
            pool.queue.remove(at);
            return;
        }
        let Some(lease_id) = pool.leased.iter().find(|(_, (p, _))| p.ticket == ticket).map(|(id, _)| id.clone()) else {
            return;
        };
        let Some((_, worker_id)) = pool.leased.remove(&lease_id) else { return };
        if let Some(worker) = pool.workers.get_mut(&worker_id) {
            worker.release(&lease_id);
            if let Some(tx) = &worker.leases {
                let _ = tx.try_send(Ok(LeaseUpdate { update: Some(Update::CancelLeaseId(lease_id)) }));
            }
        }
        Self::dispatch(&mut pool, self.lease_time());
    }

    /// How long a worker keeps its leases without heartbeats.
    fn lease_time(&self) -> Duration {
        self.config.heartbeat_interval * self.config.missed_heartbeats
    }

    /// Workers known right now, for tests and status pages.
    pub fn worker_count(&self) -> usize {
        self.lock().workers.len()
    }

    /// The workers known right now, by name, and the actions waiting for one.
    pub fn snapshot(&self) -> (Vec<WorkerView>, usize) {
        let pool = self.lock();
        let mut workers: Vec<WorkerView> = pool
            .workers
            .iter()
            .map(|(name, worker)| WorkerView {
                name: name.clone(),
                slots: worker.slots,
                usable: worker.effective(),
                running: worker
                    .running
                    .iter()
                    .filter_map(|lease| pool.leased.get(lease))
                    .map(|(pending, _)| (pending.instance.clone(), pending.action))
                    .collect(),
                platform: worker.platform.clone(),
                since_heartbeat: worker.last_heartbeat.elapsed(),
                connected: worker.leases.is_some(),
            })
            .collect();
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        (workers, pool.queue.len())
    }
}

#[tonic::async_trait]
impl ActionExecutor for WorkerPool {
    async fn execute(&self, request: ActionRequest) -> Result<Executed, ActionError> {
        let (done, outcome) = oneshot::channel();
        let ticket = {
            let mut pool = self.lock();
            // With workers registered but none offering the platform, waiting
            // would be forever; with none registered yet, they may be starting.
            let offered = pool.workers.values().any(|w| request.platform.iter().all(|p| w.platform.contains(p)));
            if !pool.workers.is_empty() && !offered {
                let wanted: Vec<String> = request.platform.iter().map(|(k, v)| format!("{k}={v}")).collect();
                return Err(ActionError::Unavailable(format!(
                    "no worker offers the platform this action needs: {}",
                    wanted.join(", ")
                )));
            }
            pool.next_ticket += 1;
            let ticket = pool.next_ticket;
            let pending = Pending {
                ticket,
                priority: request.priority,
                instance: request.instance,
                action: request.action,
                platform: request.platform,
                encoded: request.encoded,
                traceparent: request.traceparent,
                queued: Instant::now(),
                attempts: 0,
                started: request.started,
                done,
            };
            Self::enqueue(&mut pool.queue, pending, false);
            Self::dispatch(&mut pool, self.lease_time());
            ticket
        };
        // If this future is dropped (the operation was cancelled), withdraw it.
        let mut guard = Withdraw { pool: self, ticket, armed: true };
        let result = outcome
            .await
            .unwrap_or_else(|_| Err(ActionError::Unavailable("the coordinator dropped the action".into())));
        guard.armed = false;
        result
    }
}

/// Withdraws a request from the pool when its caller stops waiting.
struct Withdraw<'a> {
    pool: &'a WorkerPool,
    ticket: u64,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.withdraw(self.ticket);
        }
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<LeaseUpdate, Status>> + Send>>;

/// The gRPC face of the pool.
#[derive(Clone)]
pub struct WorkersService {
    pool: Arc<WorkerPool>,
}

impl WorkersService {
    /// Serves `pool` to workers.
    pub fn new(pool: Arc<WorkerPool>) -> Self {
        WorkersService { pool }
    }
}

/// The registered worker `id`, if `session` is the one that registered it.
fn session_worker<'a>(pool: &'a mut Pool, id: &str, session: &str) -> Result<&'a mut Worker, Status> {
    match pool.workers.get_mut(id) {
        None => Err(Status::not_found(format!("worker {id} is not registered"))),
        Some(worker) if worker.session != session => {
            Err(Status::permission_denied(format!("worker {id} is registered by another session")))
        }
        Some(worker) => Ok(worker),
    }
}

/// Whether lease `lease_id` is held by worker `worker_id` in session
/// `session`: NOT_FOUND if nobody holds it, PERMISSION_DENIED if another
/// worker or session does.
fn check_lease(pool: &Pool, lease_id: &str, worker_id: &str, session: &str) -> Result<(), Status> {
    let Some((_, owner)) = pool.leased.get(lease_id) else {
        return Err(Status::not_found(format!("lease {lease_id} is not held (expired?)")));
    };
    let owns = owner == worker_id && pool.workers.get(owner).is_some_and(|w| w.session == session);
    if !owns {
        return Err(Status::permission_denied("the lease belongs to another worker session"));
    }
    Ok(())
}

fn missing_digests(function: DigestFunction, missing: &[casbuild_proto::reapi::Digest]) -> Vec<Digest> {
    missing.iter().filter_map(|d| Digest::from_proto(function, d).ok()).collect()
}

#[tonic::async_trait]
impl Workers for WorkersService {
    type LeasesStream = LeaseStream;

    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        crate::auth::require_everywhere(&request, crate::auth::Permission::Work)?;
        let request = request.into_inner();
        if request.worker_id.is_empty() || request.slots == 0 {
            return Err(Status::invalid_argument("a worker needs an id and at least one slot"));
        }
        if !(16..=256).contains(&request.session.len()) {
            return Err(Status::invalid_argument("a worker's session secret must have 16 to 256 characters"));
        }
        let mut pool = self.pool.lock();
        let platform: Vec<(String, String)> = request.platform.into_iter().map(|p| (p.name, p.value)).collect();
        if let Some(worker) = pool.workers.get_mut(&request.worker_id) {
            if worker.session == request.session {
                // The same process again (its lease stream broke): it keeps its leases.
                worker.platform = platform;
                worker.slots = request.slots.min(MAX_SLOTS);
                worker.last_heartbeat = Instant::now();
                return Ok(Response::new(RegisterResponse {
                    heartbeat_interval_ms: self.pool.config.heartbeat_interval.as_millis() as u32,
                }));
            }
            if worker.last_heartbeat.elapsed() <= self.pool.lease_time() {
                return Err(Status::already_exists(format!(
                    "worker id {} is in use by a live worker; give this one another --name",
                    request.worker_id
                )));
            }
        }
        // A restarted worker (its old session went quiet): its old leases are lost.
        self.pool.forget_worker(&mut pool, &request.worker_id);
        pool.workers.insert(
            request.worker_id.clone(),
            Worker {
                session: request.session,
                label: platform_label(&platform),
                platform,
                slots: request.slots.min(MAX_SLOTS),
                free_cpus: request.slots,
                proven: INITIAL_CAPACITY,
                running: Vec::new(),
                finishing: Vec::new(),
                last_heartbeat: Instant::now(),
                leases: None,
            },
        );
        publish(&mut pool);
        tracing::info!("worker {} registered with {} slots", request.worker_id, request.slots);
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_ms: self.pool.config.heartbeat_interval.as_millis() as u32,
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        crate::auth::require_everywhere(&request, crate::auth::Permission::Work)?;
        let request = request.into_inner();
        let mut pool = self.pool.lock();
        let worker = session_worker(&mut pool, &request.worker_id, &request.session)?;
        worker.last_heartbeat = Instant::now();
        worker.free_cpus = request.free_cpus;
        if request.slots > 0 {
            worker.slots = request.slots.min(MAX_SLOTS);
        }
        WorkerPool::dispatch(&mut pool, self.pool.lease_time());
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn leases(&self, request: Request<LeasesRequest>) -> Result<Response<Self::LeasesStream>, Status> {
        crate::auth::require_everywhere(&request, crate::auth::Permission::Work)?;
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        {
            let mut pool = self.pool.lock();
            let worker = session_worker(&mut pool, &request.worker_id, &request.session)?;
            worker.leases = Some(tx);
            WorkerPool::dispatch(&mut pool, self.pool.lease_time());
        }
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        crate::auth::require_everywhere(&request, crate::auth::Permission::Work)?;
        let request = request.into_inner();
        let mut pool = self.pool.lock();
        session_worker(&mut pool, &request.worker_id, &request.session)?;
        self.pool.forget_worker(&mut pool, &request.worker_id);
        WorkerPool::dispatch(&mut pool, self.pool.lease_time());
        tracing::info!("worker {} left", request.worker_id);
        Ok(Response::new(LeaveResponse {}))
    }

    async fn ran(&self, request: Request<RanRequest>) -> Result<Response<RanResponse>, Status> {
        crate::auth::require_everywhere(&request, crate::auth::Permission::Work)?;
        let request = request.into_inner();
        let mut pool = self.pool.lock();
        check_lease(&pool, &request.lease_id, &request.worker_id, &request.session)?;
        let worker = session_worker(&mut pool, &request.worker_id, &request.session)?;
        if !worker.finishing.contains(&request.lease_id) {
            worker.finishing.push(request.lease_id);
        }
        worker.last_heartbeat = Instant::now();
        WorkerPool::dispatch(&mut pool, self.pool.lease_time());
        Ok(Response::new(RanResponse {}))
    }

    async fn complete(&self, request: Request<CompleteRequest>) -> Result<Response<CompleteResponse>, Status> {
        crate::auth::require_everywhere(&request, crate::auth::Permission::Work)?;
        let request = request.into_inner();
        let mut pool = self.pool.lock();
        check_lease(&pool, &request.lease_id, &request.worker_id, &request.session)?;
        let (pending, owner) = pool.leased.remove(&request.lease_id).expect("checked above");
        let delivered = matches!(request.outcome, Some(Outcome::ActionResult(_)));
        if let Some(worker) = pool.workers.get_mut(&owner) {
            worker.release(&request.lease_id);
            worker.last_heartbeat = Instant::now();
            if delivered {
                worker.proven = (worker.proven + 1).min(MAX_SLOTS);
            }
        }
        let function = pending.action.function;
        let outcome = match request.outcome {
            Some(Outcome::ActionResult(result)) => Ok(Executed {
                result,
                message: request.message,
                timed_out: request.timed_out,
                do_not_cache: request.do_not_cache,
            }),
            Some(Outcome::Error(error)) => Err(ActionError::from_code(
                Code::from(error.code),
                error.message,
                missing_digests(function, &error.missing),
            )),
            None => Err(ActionError::Unavailable("the worker reported no outcome".into())),
        };
        let _ = pending.done.send(outcome);
        WorkerPool::dispatch(&mut pool, self.pool.lease_time());
        Ok(Response::new(CompleteResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casbuild_proto::reapi::ActionResult;
    use futures::{FutureExt, StreamExt};

    fn action(i: u32) -> ActionRequest {
        ActionRequest {
            instance: String::new(),
            action: DigestFunction::Sha256.digest_of(format!("action {i}").as_bytes()),
            platform: vec![],
            priority: 0,
            started: Started::ignored(),
            ran: crate::scheduler::Ran::ignored(),
            encoded: None,
            traceparent: String::new(),
        }
    }

    /// A call as the authentication layer hands it on.
    fn worker_request<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(crate::auth::Principal::trusted());
        request
    }

    /// The session secret of test worker `id`.
    fn session(id: &str) -> String {
        format!("session-of-worker-{id}")
    }

    async fn join(service: &WorkersService, id: &str, slots: u32) -> LeaseStream {
        let register = RegisterRequest { worker_id: id.into(), slots, session: session(id), ..Default::default() };
        service.register(worker_request(register)).await.unwrap();
        let leases = LeasesRequest { worker_id: id.into(), session: session(id) };
        service.leases(worker_request(leases)).await.unwrap().into_inner()
    }

    async fn heartbeat(service: &WorkersService, id: &str, slots: u32, free_cpus: u32) {
        let beat =
            HeartbeatRequest { worker_id: id.into(), slots, free_cpus, session: session(id), ..Default::default() };
        service.heartbeat(worker_request(beat)).await.unwrap();
    }

    /// Executes actions 0..n on `pool`, each in a task of its own.
    fn submit(pool: &Arc<WorkerPool>, n: u32) -> Vec<tokio::task::JoinHandle<Result<Executed, ActionError>>> {
        (0..n)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.execute(action(i)).await })
            })
            .collect()
    }

    /// Leases a stream has received so far (without waiting for more).
    fn drain(stream: &mut LeaseStream) -> usize {
        let mut n = 0;
        while let Some(Some(Ok(_))) = stream.next().now_or_never() {
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn placement_follows_idle_cpus_and_never_overloads_a_worker() {
        let pool = WorkerPool::new(PoolConfig { heartbeat_interval: Duration::from_secs(60), ..Default::default() });
        let service = WorkersService::new(pool.clone());
        let mut roomy = join(&service, "roomy", 4).await;
        let mut busy = join(&service, "busy", 4).await;
        // Same slots, but the busy host has one idle CPU: its effective capacity is 1.
        heartbeat(&service, "roomy", 4, 4).await;
        heartbeat(&service, "busy", 4, 1).await;
        let waiting = submit(&pool, 6);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (on_roomy, on_busy) = (drain(&mut roomy), drain(&mut busy));
        assert_eq!((on_roomy, on_busy), (4, 1), "filled up to effective capacity, the sixth waits");
        assert_eq!(pool.lock().queue.len(), 1);
        // The busy host frees up: the queued action goes there.
        heartbeat(&service, "busy", 4, 4).await;
        assert_eq!(drain(&mut busy), 1);
        assert!(pool.lock().queue.is_empty());
        for task in waiting {
            task.abort();
        }
    }

    /// The lease ids among the updates waiting on `stream`.
    fn drain_leases(stream: &mut LeaseStream) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(Some(Ok(update))) = stream.next().now_or_never() {
            if let Some(Update::Lease(lease)) = update.update {
                ids.push(lease.lease_id);
            }
        }
        ids
    }

    #[tokio::test]
    async fn a_worker_is_trusted_with_more_leases_only_as_it_delivers() {
        let pool = WorkerPool::new(PoolConfig { heartbeat_interval: Duration::from_secs(60), ..Default::default() });
        let service = WorkersService::new(pool.clone());
        // It claims far more than anyone may; the claim is capped, and at
        // first it gets a few leases, however many it claims.
        let mut stream = join(&service, "big", 1_000_000).await;
        heartbeat(&service, "big", 1_000_000, 1_000_000).await;
        assert_eq!(pool.lock().workers["big"].slots, MAX_SLOTS);
        let waiting = submit(&pool, 20);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = drain_leases(&mut stream);
        assert_eq!(first.len(), INITIAL_CAPACITY as usize);
        // Each delivered result makes room for two more: the one it freed, and one more of trust.
        let done = CompleteRequest {
            worker_id: "big".into(),
            session: session("big"),
            lease_id: first[0].clone(),
            outcome: Some(Outcome::ActionResult(ActionResult::default())),
            ..Default::default()
        };
        service.complete(worker_request(done)).await.unwrap();
        assert_eq!(drain_leases(&mut stream).len(), 2);
        // An error outcome frees its slot but earns no trust.
        let failed = CompleteRequest {
            worker_id: "big".into(),
            session: session("big"),
            lease_id: first[1].clone(),
            outcome: Some(Outcome::Error(casbuild_proto::worker::LeaseError {
                code: Code::Unavailable as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        service.complete(worker_request(failed)).await.unwrap();
        assert_eq!(drain_leases(&mut stream).len(), 1);
        for task in waiting {
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_lease_carries_the_action_and_command_unless_they_are_large() {
        let pool = WorkerPool::new(PoolConfig { heartbeat_interval: Duration::from_secs(60), ..Default::default() });
        let service = WorkersService::new(pool.clone());
        let mut stream = join(&service, "w", 2).await;
        let small = (Bytes::from_static(b"an action"), Bytes::from_static(b"a command"));
        let large = (Bytes::from_static(b"an action"), Bytes::from(vec![b'c'; MAX_ENCODED_IN_LEASE]));
        let waiting: Vec<_> = [small.clone(), large]
            .into_iter()
            .enumerate()
            .map(|(i, encoded)| {
                let pool = pool.clone();
                let request = ActionRequest { encoded: Some(encoded), ..action(i as u32) };
                tokio::spawn(async move { pool.execute(request).await })
            })
            .collect();
        let mut carried = Vec::new();
        for _ in 0..2 {
            let Some(Update::Lease(lease)) = stream.next().await.unwrap().unwrap().update else { panic!("a lease") };
            carried.push((lease.action, lease.command));
        }
        carried.sort();
        assert_eq!(carried[0], (vec![], vec![]), "over the bound: the worker fetches them");
        assert_eq!(carried[1], (small.0.to_vec(), small.1.to_vec()));
        for task in waiting {
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_lease_whose_command_ended_frees_its_slot_within_twice_the_capacity() {
        let pool = WorkerPool::new(PoolConfig { heartbeat_interval: Duration::from_secs(60), ..Default::default() });
        let service = WorkersService::new(pool.clone());
        let mut stream = join(&service, "w", 1).await;
        heartbeat(&service, "w", 1, 1).await;
        let waiting = submit(&pool, 4);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = drain_leases(&mut stream);
        assert_eq!(first.len(), 1, "one slot");
        let ran =
            |lease_id: &str, session: String| RanRequest { worker_id: "w".into(), session, lease_id: lease_id.into() };
        let forged = service.ran(worker_request(ran(&first[0], "an-attackers-session".into()))).await.unwrap_err();
        assert_eq!(forged.code(), Code::PermissionDenied);
        let unknown = service.ran(worker_request(ran("no-such-lease", session("w")))).await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
        assert!(drain_leases(&mut stream).is_empty(), "refused calls free nothing");

        service.ran(worker_request(ran(&first[0], session("w")))).await.unwrap();
        let second = drain_leases(&mut stream);
        assert_eq!(second.len(), 1, "the slot takes the next lease while the first uploads");
        // Saying the second ended too frees nothing: twice the capacity is held.
        service.ran(worker_request(ran(&second[0], session("w")))).await.unwrap();
        service.ran(worker_request(ran(&second[0], session("w")))).await.unwrap();
        assert!(drain_leases(&mut stream).is_empty(), "at most twice the capacity");
        let done = CompleteRequest {
            worker_id: "w".into(),
            lease_id: first[0].clone(),
            outcome: Some(Outcome::ActionResult(ActionResult::default())),
            session: session("w"),
            ..Default::default()
        };
        service.complete(worker_request(done)).await.unwrap();
        assert_eq!(drain_leases(&mut stream).len(), 1, "a completed lease makes room for one more");
        for task in waiting {
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_lease_is_only_completed_by_its_worker_and_refuses_unknown_ids() {
        let pool = WorkerPool::new(PoolConfig::default());
        let service = WorkersService::new(pool.clone());
        let mut stream = join(&service, "w", 1).await;
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.execute(action(1)).await }
        });
        let lease = match stream.next().await.unwrap().unwrap().update {
            Some(Update::Lease(lease)) => lease,
            other => panic!("expected a lease, got {other:?}"),
        };
        let complete = |worker: &str, lease_id: &str| CompleteRequest {
            worker_id: worker.into(),
            lease_id: lease_id.into(),
            outcome: Some(Outcome::ActionResult(ActionResult { exit_code: 3, ..Default::default() })),
            session: session(worker),
            ..Default::default()
        };
        let err = service.complete(worker_request(complete("other", &lease.lease_id))).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        // Another process claiming the id of a live worker gets neither the id nor its lease.
        let hijack = RegisterRequest {
            worker_id: "w".into(),
            slots: 64,
            session: "an-attackers-session".into(),
            ..Default::default()
        };
        let err = service.register(worker_request(hijack)).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
        let mut forged = complete("w", &lease.lease_id);
        forged.session = "an-attackers-session".into();
        let err = service.complete(worker_request(forged)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let beat =
            HeartbeatRequest { worker_id: "w".into(), session: "an-attackers-session".into(), ..Default::default() };
        assert_eq!(service.heartbeat(worker_request(beat)).await.unwrap_err().code(), Code::PermissionDenied);
        // The worker itself registering again (a broken stream) keeps its lease.
        let again = RegisterRequest { worker_id: "w".into(), slots: 1, session: session("w"), ..Default::default() };
        service.register(worker_request(again)).await.unwrap();
        let err = service.complete(worker_request(complete("w", "no-such-lease"))).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        service.complete(worker_request(complete("w", &lease.lease_id))).await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap().result.exit_code, 3);
    }

    #[tokio::test]
    async fn only_a_workers_own_session_can_end_it_and_its_leases_are_requeued() {
        let pool = WorkerPool::new(PoolConfig { heartbeat_interval: Duration::from_secs(60), ..Default::default() });
        let service = WorkersService::new(pool.clone());
        let mut leaving = join(&service, "leaving", 1).await;
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.execute(action(1)).await }
        });
        assert_eq!(drain_leases_after(&mut leaving).await, 1);
        let leave = |session: &str| LeaveRequest { worker_id: "leaving".into(), session: session.into() };
        let err = service.leave(worker_request(leave("an-attackers-session"))).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "nobody else ends a worker's session");
        assert!(pool.lock().workers.contains_key("leaving"));

        service.leave(worker_request(leave(&session("leaving")))).await.unwrap();
        assert!(!pool.lock().workers.contains_key("leaving"), "gone at once, not after the lease timeout");
        // Its lease went back to the queue, and the next worker gets it.
        let mut next = join(&service, "next", 1).await;
        assert_eq!(drain_leases_after(&mut next).await, 1);
        // The id is free for a new process straight away.
        let restarted = RegisterRequest {
            worker_id: "leaving".into(),
            slots: 1,
            session: "a-new-process-session".into(),
            ..Default::default()
        };
        service.register(worker_request(restarted)).await.unwrap();
        waiting.abort();
    }

    /// Waits briefly for dispatch, then counts the leases on `stream`.
    async fn drain_leases_after(stream: &mut LeaseStream) -> usize {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain_leases(stream).len()
    }

    #[tokio::test]
    async fn an_action_lost_with_too_many_workers_fails_unavailable() {
        let config =
            PoolConfig { heartbeat_interval: Duration::from_millis(20), missed_heartbeats: 1, max_attempts: 1 };
        let pool = WorkerPool::new(config);
        let service = WorkersService::new(pool.clone());
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.execute(action(7)).await }
        });
        // Two workers in turn take the lease and vanish without a heartbeat.
        let settled = |workers: usize, queued: usize| {
            let pool = pool.clone();
            async move {
                while pool.worker_count() != workers || pool.lock().queue.len() != queued {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), settled(0, 1)).await.unwrap();
        let mut first = join(&service, "first", 1).await;
        assert!(matches!(first.next().await, Some(Ok(LeaseUpdate { update: Some(Update::Lease(_)) }))));
        tokio::time::timeout(Duration::from_secs(10), settled(0, 1)).await.expect("requeued once");
        let mut second = join(&service, "second", 1).await;
        assert!(matches!(second.next().await, Some(Ok(LeaseUpdate { update: Some(Update::Lease(_)) }))));
        let outcome = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        match outcome {
            Err(ActionError::Unavailable(message)) => assert!(message.contains("giving up"), "{message}"),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
        assert_eq!(pool.worker_count(), 0);
    }

    #[tokio::test]
    async fn a_platform_no_registered_worker_offers_fails_at_once() {
        let pool = WorkerPool::new(PoolConfig::default());
        let service = WorkersService::new(pool.clone());
        let _stream = join(&service, "plain", 2).await;
        let mut wanted = action(1);
        wanted.platform = vec![("casbuild-compiler".into(), "abc".into())];
        let outcome = tokio::time::timeout(Duration::from_secs(5), pool.execute(wanted)).await.expect("at once");
        match outcome {
            Err(ActionError::Unavailable(message)) => {
                assert!(message.contains("no worker offers") && message.contains("casbuild-compiler=abc"), "{message}")
            }
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
}
