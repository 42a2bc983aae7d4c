//! The scheduler: turns Execute requests into jobs, runs each distinct
//! action once however many clients ask for it, and publishes every job's
//! progress as a stream of [`JobState`]s (the Execution service turns them
//! into `google.longrunning.Operation`s at the wire).
//!
//! A job: look up the action cache (unless told to skip it), check that every
//! input blob is in the CAS (else FAILED_PRECONDITION with the missing
//! digests, which Bazel answers by uploading them and retrying), wait for a
//! free slot, run on an [`ActionExecutor`], write the action cache for
//! successful cacheable results, publish the ExecuteResponse.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use casbuild_cas::digest::Digest;
use casbuild_cas::error::Invalid;
use casbuild_cas::storage::Storage;
use casbuild_cas::tree::{child_digest, missing_in_tree, MissingError};

use crate::action_cache::Unusable;
use casbuild_proto::reapi::{Action, ActionResult, Command, ExecuteResponse};
use prost::Message;
use tokio::sync::watch;
use tonic::Code;
use tracing::Instrument;

use crate::gate::PriorityGate;
use crate::status::{precondition_missing, rpc_ok};

/// How many finished operations are kept for lookups by name, for how
/// long, and how many bytes of final state they may hold; the oldest go
/// first when a bound is reached.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// At most this long after finishing.
    pub time: Duration,
    /// At most this many finished jobs.
    pub count: usize,
    /// At most this many bytes of final operations (results, inline logs).
    pub bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { time: Duration::from_secs(600), count: 100_000, bytes: 256 << 20 }
    }
}

/// A finished job's operation names, kept for the retention time or until
/// the bounds push them out.
struct Retained {
    finished: Instant,
    names: Vec<String>,
    bytes: usize,
}

/// What an executor reports for an action it ran.
#[derive(Clone, Debug)]
pub struct Executed {
    /// The result (exit code, outputs, logs) — whatever the exit code.
    pub result: ActionResult,
    /// A human-readable note for the client (why it failed, what it missed).
    pub message: String,
    /// Whether the action's timeout killed it.
    pub timed_out: bool,
    /// Whether the Action asked not to be cached.
    pub do_not_cache: bool,
}

pub use casbuild_cas::error::ActionError;

/// One action to run, as the scheduler hands it to an executor.
#[derive(Clone, Debug)]
pub struct ActionRequest {
    /// The REAPI instance.
    pub instance: String,
    /// The Action's digest.
    pub action: Digest,
    /// Platform properties the host must have (from the Action).
    pub platform: Vec<(String, String)>,
    /// ExecutionPolicy.priority: lower runs sooner; 0 is the default.
    pub priority: i32,
    /// Told the host's name when a host starts running the action.
    pub started: Started,
    /// Called by an executor when the action's command has ended, before
    /// its outputs are uploaded and checked: the action's slot goes to the
    /// next queued action then (the executor need not call it; its slot is
    /// free at the latest when it returns).
    pub ran: Ran,
    /// The Action and Command as stored, read while checking the inputs
    /// (empty when not read), so that the host need not fetch them again.
    pub encoded: Option<(Bytes, Bytes)>,
    /// The W3C trace context of the action's span (empty without tracing),
    /// for the host's span of the run.
    pub traceparent: String,
}

/// The executor's signal that a host took the action: the operation moves
/// from QUEUED to EXECUTING, naming the worker (REAPI's
/// `partial_execution_metadata`).
#[derive(Clone)]
pub struct Started(Arc<dyn Fn(&str) + Send + Sync>);

impl Started {
    /// Calls `f` with the worker's name.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Started(Arc::new(f))
    }

    /// A signal nobody listens to.
    pub fn ignored() -> Self {
        Started::new(|_| {})
    }

    /// Reports that `worker` started the action.
    pub fn on(&self, worker: &str) {
        (self.0)(worker)
    }
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Started")
    }
}

/// The executor's signal that an action's command has ended ([`ActionRequest::ran`]).
#[derive(Clone)]
pub struct Ran(Arc<dyn Fn() + Send + Sync>);

impl Ran {
    /// Calls `f` when told.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Ran(Arc::new(f))
    }

    /// A signal nobody listens to.
    pub fn ignored() -> Self {
        Ran::new(|| {})
    }

    /// Reports that the action's command has ended.
    pub fn on(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ran")
    }
}

/// Runs actions: the local worker of `casbuild up`, or the remote worker pool.
/// Dropping the future cancels the action.
#[tonic::async_trait]
pub trait ActionExecutor: Send + Sync + 'static {
    /// Runs `request.action` on a host with the requested platform.
    async fn execute(&self, request: ActionRequest) -> Result<Executed, ActionError>;
}

/// Where a job is in its life.
#[derive(Clone, Debug)]
pub enum Stage {
    /// Waiting for its inputs to be checked or for a free slot.
    Queued,
    /// A host runs it.
    Executing {
        /// The host's (worker's) name.
        worker: String,
        /// When the host took it.
        since: SystemTime,
    },
    /// Finished, with a result or an error status.
    Completed(Arc<ExecuteResponse>),
}

/// A job as the scheduler publishes it to the requesters waiting for it.
#[derive(Clone, Debug)]
pub struct JobState {
    /// The action the job runs.
    pub action: Digest,
    /// When the job was created.
    pub queued: SystemTime,
    /// Its stage.
    pub stage: Stage,
}

impl JobState {
    /// A job that finished as soon as it was asked for (a cache hit, an error).
    pub fn completed(action: Digest, response: ExecuteResponse) -> Self {
        JobState { action, queued: SystemTime::now(), stage: Stage::Completed(Arc::new(response)) }
    }

    /// The final response, once the job has finished.
    pub fn response(&self) -> Option<&Arc<ExecuteResponse>> {
        match &self.stage {
            Stage::Completed(response) => Some(response),
            _ => None,
        }
    }

    /// Whether the job has finished.
    pub fn is_done(&self) -> bool {
        self.response().is_some()
    }
}

struct Job {
    name: String,
    key: (String, Digest),
    priority: i32,
    state: watch::Sender<JobState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// The operation names of the requesters waiting for this job: each
    /// Execute of the same action joins the job under a name of its own.
    holders: Mutex<std::collections::HashSet<String>>,
}

#[derive(Default)]
struct Jobs {
    running: HashMap<(String, Digest), Arc<Job>>,
    /// Every requester's operation name, to its job.
    by_name: HashMap<String, Arc<Job>>,
    /// Requesters that cancelled a job others still wait for: their
    /// state, done with CANCELLED, kept as long as finished ones are.
    /// Each with the job's instance.
    detached: HashMap<String, (String, JobState)>,
    /// Finished jobs (and detached requesters) in the order they finished.
    retained: VecDeque<Retained>,
    retained_bytes: usize,
    retention: Retention,
}

impl Jobs {
    /// Forgets finished operations past their time, and the oldest while
    /// more than the bounds are kept (the newest always stays).
    fn prune(&mut self, now: Instant) {
        while let Some(oldest) = self.retained.front() {
            let over = self.retained.len() > self.retention.count || self.retained_bytes > self.retention.bytes;
            let expired = now.saturating_duration_since(oldest.finished) >= self.retention.time;
            let pushed_out = over && self.retained.len() > 1;
            if !(expired || pushed_out) {
                break;
            }
            let oldest = self.retained.pop_front().expect("a front entry");
            self.retained_bytes -= oldest.bytes;
            for name in &oldest.names {
                self.by_name.remove(name);
                self.detached.remove(name);
            }
        }
    }
}

/// One requester's operation, as listings show it.
#[derive(Clone, Debug)]
pub struct OperationEntry {
    /// The operation's name (`operations/UUID`).
    pub name: String,
    /// The instance its action runs on.
    pub instance: String,
    /// Its job's state.
    pub state: JobState,
}

/// A requester's view of a job: its own operation name and the updates.
pub struct Submitted {
    /// The operation name this requester knows the job by.
    pub name: String,
    /// Every change of the job's state.
    pub updates: watch::Receiver<JobState>,
}

/// Schedules Execute requests onto an executor with a fixed number of slots.
pub struct Scheduler {
    storage: Arc<Storage>,
    executor: Arc<dyn ActionExecutor>,
    /// Admits jobs to the executor by priority.
    slots: Arc<PriorityGate>,
    jobs: Mutex<Jobs>,
}

/// How an action ended, as a metric label: `success` (exit code 0),
/// `failure` (the command failed), `timeout`, `cancelled`, or `error` (it
/// could not run).
pub(crate) fn outcome(response: &ExecuteResponse) -> &'static str {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    match (code, &response.result) {
        (0, Some(result)) if result.exit_code == 0 => "success",
        (0, Some(_)) => "failure",
        (c, _) if c == Code::DeadlineExceeded as i32 => "timeout",
        (c, _) if c == Code::Cancelled as i32 => "cancelled",
        _ => "error",
    }
}

/// A new operation name: `operations/UUID`.
pub fn new_operation_name() -> String {
    format!("operations/{}", uuid::Uuid::new_v4())
}

fn error_response(code: Code, message: String) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(casbuild_proto::rpc::Status { code: code as i32, message, details: vec![] }),
        ..Default::default()
    }
}

impl Scheduler {
    /// A scheduler running at most `slots` actions at once on `executor`.
    pub fn new(storage: Arc<Storage>, executor: Arc<dyn ActionExecutor>, slots: usize) -> Arc<Self> {
        Arc::new(Scheduler { storage, executor, slots: PriorityGate::new(slots), jobs: Mutex::new(Jobs::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (or joins) the job for `action`; the caller gets an operation
    /// name of its own and the job's updates. A new job's span is a child of
    /// the caller's (the request's, which continues the client's trace).
    pub fn submit(self: &Arc<Self>, instance: &str, action: Digest, priority: i32) -> Submitted {
        self.submit_as(instance, action, priority, new_operation_name())
    }

    /// Joins the job running `action` in `instance` under a new operation
    /// name, if there is one.
    pub fn join(&self, instance: &str, action: Digest) -> Option<Submitted> {
        let mut jobs = self.lock();
        let job = jobs.running.get(&(instance.to_owned(), action)).cloned()?;
        let name = new_operation_name();
        Some(Self::join_job(&mut jobs, &job, name))
    }

    fn join_job(jobs: &mut Jobs, job: &Arc<Job>, name: String) -> Submitted {
        job.holders.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone());
        jobs.by_name.insert(name.clone(), job.clone());
        Submitted { name, updates: job.state.subscribe() }
    }

    /// [`Scheduler::submit`] under operation name `name` (one the cluster
    /// already knows, such as an adopted lease's).
    pub fn submit_as(self: &Arc<Self>, instance: &str, action: Digest, priority: i32, name: String) -> Submitted {
        let key = (instance.to_owned(), action);
        let mut jobs = self.lock();
        jobs.prune(Instant::now());
        if let Some(job) = jobs.running.get(&key).cloned() {
            return Self::join_job(&mut jobs, &job, name);
        }
        let queued = JobState { action, queued: SystemTime::now(), stage: Stage::Queued };
        let (state, receiver) = watch::channel(queued);
        let holders = Mutex::new([name.clone()].into_iter().collect());
        let job =
            Arc::new(Job { name: name.clone(), key: key.clone(), priority, state, task: Mutex::new(None), holders });
        jobs.running.insert(key, job.clone());
        jobs.by_name.insert(name.clone(), job.clone());
        drop(jobs);
        let scheduler = self.clone();
        let runner = job.clone();
        let span = tracing::info_span!("action", action = %action, instance = %instance, operation = %name);
        let handle = tokio::spawn(
            async move {
                tracing::debug!("queued");
                let response = scheduler.run(&runner).await;
                scheduler.finish(&runner, response);
            }
            .instrument(span),
        );
        *job.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.abort_handle());
        Submitted { name, updates: receiver }
    }

    /// The instance of an operation and its updates, if it is known.
    pub fn watch(&self, name: &str) -> Option<(String, watch::Receiver<JobState>)> {
        let jobs = self.lock();
        if let Some((instance, state)) = jobs.detached.get(name) {
            // Done for this requester: a channel holding its final state.
            return Some((instance.clone(), watch::channel(state.clone()).1));
        }
        jobs.by_name.get(name).map(|job| (job.key.0.clone(), job.state.subscribe()))
    }

    /// Cancels a requester's operation. A job nobody else waits for is
    /// stopped (its command killed) and finishes with CANCELLED; a job that
    /// other requesters share goes on for them, and only the canceller is
    /// detached (its operation reads CANCELLED), unless `for_everyone` (an
    /// admin's cancel) stops it for all. Returns false for unknown names.
    pub fn cancel(self: &Arc<Self>, name: &str, for_everyone: bool) -> bool {
        let mut jobs = self.lock();
        if jobs.detached.contains_key(name) {
            return true;
        }
        let Some(job) = jobs.by_name.get(name).cloned() else { return false };
        if job.state.borrow().is_done() {
            return true;
        }
        let others = {
            let mut holders = job.holders.lock().unwrap_or_else(|e| e.into_inner());
            holders.remove(name);
            !holders.is_empty() && !for_everyone
        };
        if others {
            let response =
                error_response(Code::Cancelled, "the operation was cancelled (others still wait for it)".into());
            let bytes = response.encoded_len();
            let state = JobState { stage: Stage::Completed(Arc::new(response)), ..job.state.borrow().clone() };
            jobs.detached.insert(name.to_owned(), (job.key.0.clone(), state));
            jobs.by_name.remove(name);
            drop(jobs);
            self.retain(vec![name.to_owned()], bytes);
            return true;
        }
        drop(jobs);
        if let Some(task) = job.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        self.finish(&job, error_response(Code::Cancelled, "the operation was cancelled".into()));
        true
    }

    /// Every operation known now (queued, running, or finished within the
    /// retention bounds), each requester's name once, in name order.
    pub fn operations(&self) -> Vec<OperationEntry> {
        let jobs = self.lock();
        let joined = jobs.by_name.iter().map(|(name, job)| OperationEntry {
            name: name.clone(),
            instance: job.key.0.clone(),
            state: job.state.borrow().clone(),
        });
        let detached = jobs.detached.iter().map(|(name, (instance, state))| OperationEntry {
            name: name.clone(),
            instance: instance.clone(),
            state: state.clone(),
        });
        let mut all: Vec<OperationEntry> = joined.chain(detached).collect();
        drop(jobs);
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Bounds what finished operations are kept (`[limits]` in the config file).
    pub fn set_retention(&self, retention: Retention) {
        let mut jobs = self.lock();
        jobs.retention = retention;
        jobs.prune(Instant::now());
    }

    /// Keeps finished operation names for lookups, within the retention bounds.
    fn retain(&self, names: Vec<String>, bytes: usize) {
        let mut jobs = self.lock();
        jobs.retained_bytes += bytes;
        jobs.retained.push_back(Retained { finished: Instant::now(), names, bytes });
        jobs.prune(Instant::now());
    }

    fn finish(self: &Arc<Self>, job: &Arc<Job>, mut response: ExecuteResponse) {
        let outcome = outcome(&response);
        metrics::counter!("casbuild_actions_finished_total", "outcome" => outcome).increment(1);
        let exit_code = response.result.as_ref().map(|r| r.exit_code);
        match response.status.as_ref().filter(|s| s.code != 0) {
            None => tracing::info!(outcome, exit_code, "finished"),
            Some(status) => tracing::info!(outcome, code = status.code, message = %status.message, "finished"),
        }
        {
            let mut jobs = self.lock();
            if jobs.running.get(&job.key).is_some_and(|j| Arc::ptr_eq(j, job)) {
                jobs.running.remove(&job.key);
            }
        }
        let bytes = response.encoded_len();
        job.state.send_if_modified(|state| {
            if state.is_done() {
                return false;
            }
            if let Some(metadata) = response.result.as_mut().and_then(|r| r.execution_metadata.as_mut()) {
                metadata.queued_timestamp =
                    metadata.queued_timestamp.take().or(casbuild_proto::timestamp(state.queued));
            }
            state.stage = Stage::Completed(Arc::new(std::mem::take(&mut response)));
            true
        });
        let mut names: Vec<String> = job.holders.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        names.push(job.name.clone());
        self.retain(names, bytes);
    }

    async fn run(&self, job: &Arc<Job>) -> ExecuteResponse {
        let (instance, action) = (&job.key.0, &job.key.1);
        let (platform, encoded) = match self.missing_inputs(instance, action).await {
            Ok(checked) if !checked.missing.is_empty() => {
                return ExecuteResponse { status: Some(precondition_missing(&checked.missing)), ..Default::default() };
            }
            Ok(checked) => (checked.platform, checked.encoded),
            Err(response) => return response,
        };
        let waiting = Instant::now();
        metrics::gauge!("casbuild_actions_queued").increment(1.0);
        // Held until the command has ended (`ran`) or the executor returns.
        let slot = Arc::new(Mutex::new(Some(self.slots.acquire(job.priority).await)));
        let ran = {
            let slot = slot.clone();
            Ran::new(move || drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take()))
        };
        metrics::gauge!("casbuild_actions_queued").decrement(1.0);
        metrics::histogram!("casbuild_queue_wait_seconds").record(waiting.elapsed().as_secs_f64());
        let state = job.clone();
        let started = Started::new(move |worker| {
            state.state.send_if_modified(|state| {
                if state.is_done() {
                    return false;
                }
                state.stage = Stage::Executing { worker: worker.to_owned(), since: SystemTime::now() };
                true
            });
        });
        let request = ActionRequest {
            instance: instance.clone(),
            action: *action,
            platform,
            priority: job.priority,
            started,
            ran,
            encoded,
            traceparent: casbuild_proto::trace::traceparent(&tracing::Span::current()),
        };
        tracing::debug!(queued_ms = waiting.elapsed().as_millis() as u64, "executing");
        let executing = Instant::now();
        let executed = self.executor.execute(request).await;
        // The slot is free once the executor is done, whether or not it said `ran`.
        drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        metrics::histogram!("casbuild_action_execution_seconds").record(executing.elapsed().as_secs_f64());
        match executed {
            Ok(executed) => {
                // A worker's result is checked like a client's before anyone sees it.
                let cas = self.storage.cas(instance);
                match crate::action_cache::check_result(cas.as_ref(), action.function, &executed.result).await {
                    Ok(()) => {}
                    Err(Unusable::Invalid(problem)) => {
                        let message = format!("the worker returned an unusable result for {action}: {problem}");
                        tracing::warn!("{message}");
                        return error_response(Code::Internal, message);
                    }
                    Err(Unusable::Store(e)) => {
                        return error_response(Code::Unavailable, format!("checking the result of {action}: {e}"));
                    }
                    Err(Unusable::Missing(missing)) => {
                        let message = format!(
                            "the worker's result for {action} references {} blob(s) it did not upload: {}",
                            missing.len(),
                            crate::status::some_digests(&missing)
                        );
                        tracing::warn!("{message}");
                        return error_response(Code::Internal, message);
                    }
                }
                let cacheable = executed.result.exit_code == 0 && !executed.do_not_cache && !executed.timed_out;
                if cacheable {
                    if let Err(e) = self.storage.action_cache().update(instance, action, &executed.result).await {
                        tracing::warn!("caching the result of {action}: {e}");
                    }
                }
                let status = if executed.timed_out {
                    casbuild_proto::rpc::Status {
                        code: Code::DeadlineExceeded as i32,
                        message: executed.message.clone(),
                        details: vec![],
                    }
                } else {
                    rpc_ok()
                };
                ExecuteResponse {
                    result: Some(executed.result),
                    status: Some(status),
                    message: executed.message,
                    ..Default::default()
                }
            }
            Err(ActionError::MissingBlobs(missing)) => {
                ExecuteResponse { status: Some(precondition_missing(&missing)), ..Default::default() }
            }
            Err(ActionError::Invalid(message)) => error_response(Code::InvalidArgument, message),
            Err(ActionError::Unavailable(message)) => error_response(Code::Unavailable, message),
        }
    }

    /// The Action, Command, Directories and files of `action` that the CAS
    /// lacks, the platform the Action asks for, and the encoded Action and
    /// Command. A malformed action comes back as a finished error response.
    async fn missing_inputs(&self, instance: &str, action: &Digest) -> Result<Checked, ExecuteResponse> {
        let cas = self.storage.cas(instance);
        let function = action.function;
        let invalid = |m: String| error_response(Code::InvalidArgument, m);
        let invalid_in = |e: Invalid| error_response(e.code(), e.context("Action").0);
        let read = |digest: Digest| {
            let cas = cas.clone();
            async move {
                match cas.read_all(&digest).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(error_response(Code::Internal, format!("reading {digest}: {e}"))),
                }
            }
        };
        let Some(action_bytes) = read(*action).await? else {
            return Ok(Checked { missing: vec![*action], platform: Vec::new(), encoded: None });
        };
        let action_proto = Action::decode(action_bytes.clone())
            .map_err(|e| invalid(format!("Action {action} does not decode: {e}")))?;
        let command =
            child_digest(function, "command_digest", action_proto.command_digest.as_ref()).map_err(invalid_in)?;
        let root =
            child_digest(function, "input_root_digest", action_proto.input_root_digest.as_ref()).map_err(invalid_in)?;
        let platform: Vec<(String, String)> = action_proto
            .platform
            .iter()
            .flat_map(|p| p.properties.iter().map(|q| (q.name.clone(), q.value.clone())))
            .collect();
        let mut missing = Vec::new();
        let mut encoded = None;
        match read(command).await? {
            Some(bytes) => {
                Command::decode(bytes.clone())
                    .map_err(|e| invalid(format!("Command {command} does not decode: {e}")))?;
                encoded = Some((action_bytes, bytes));
            }
            None => missing.push(command),
        }
        match missing_in_tree(cas.as_ref(), &root).await {
            Ok(absent) => missing.extend(absent),
            Err(MissingError::Tree(e)) => return Err(invalid(e.to_string())),
            Err(MissingError::Store(e)) => return Err(error_response(Code::Internal, e.to_string())),
        }
        Ok(Checked { missing, platform, encoded })
    }
}

/// What checking an action's inputs found.
struct Checked {
    missing: Vec<Digest>,
    platform: Vec<(String, String)>,
    /// The encoded Action and Command.
    encoded: Option<(Bytes, Bytes)>,
}

#[cfg(test)]
mod tests {
    use casbuild_cas::digest::DigestFunction;
    use casbuild_cas::storage::StorageConfig;

    use super::*;

    /// Never reached: the actions below are not in the CAS, so each ends in
    /// FAILED_PRECONDITION before it would run.
    struct Unreachable;

    #[tonic::async_trait]
    impl ActionExecutor for Unreachable {
        async fn execute(&self, _request: ActionRequest) -> Result<Executed, ActionError> {
            unreachable!("an action without its Action blob was run")
        }
    }

    async fn finish_one(scheduler: &Arc<Scheduler>, n: u32) -> String {
        let action = DigestFunction::Blake3.digest_of(format!("action {n}").as_bytes());
        let mut submitted = scheduler.submit("", action, 0);
        while !submitted.updates.borrow_and_update().is_done() {
            submitted.updates.changed().await.unwrap();
        }
        submitted.name
    }

    #[tokio::test]
    async fn finished_operations_are_kept_within_count_and_byte_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(&StorageConfig::new(dir.path().to_path_buf())).unwrap());
        let scheduler = Scheduler::new(storage, Arc::new(Unreachable), 4);
        scheduler.set_retention(Retention { count: 3, ..Retention::default() });
        let mut names = Vec::new();
        for n in 0..10 {
            names.push(finish_one(&scheduler, n).await);
        }
        let kept: Vec<bool> = names.iter().map(|name| scheduler.watch(name).is_some()).collect();
        assert_eq!(kept, [false, false, false, false, false, false, false, true, true, true]);

        // A byte bound below one operation's size keeps only the newest.
        scheduler.set_retention(Retention { bytes: 1, ..Retention::default() });
        let last = finish_one(&scheduler, 10).await;
        assert!(scheduler.watch(&last).is_some());
        assert!(names.iter().all(|name| scheduler.watch(name).is_none()));
        let kept = {
            let jobs = scheduler.lock();
            (jobs.retained.len(), jobs.by_name.len())
        };
        assert_eq!(kept, (1, 1));

        // Past their time they go too, at the next submission.
        scheduler.set_retention(Retention { time: Duration::ZERO, ..Retention::default() });
        finish_one(&scheduler, 11).await;
        assert!(scheduler.watch(&last).is_none());
    }

    /// Counts the actions it runs; each waits until `release` is notified.
    struct Counting {
        runs: std::sync::atomic::AtomicU32,
        release: tokio::sync::Notify,
    }

    #[tonic::async_trait]
    impl ActionExecutor for Counting {
        async fn execute(&self, request: ActionRequest) -> Result<Executed, ActionError> {
            request.started.on("host-1");
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.release.notified().await;
            let result =
                ActionResult { exit_code: 7, execution_metadata: Some(Default::default()), ..Default::default() };
            Ok(Executed { result, message: String::new(), timed_out: false, do_not_cache: true })
        }
    }

    #[tokio::test]
    async fn identical_actions_in_flight_run_once_and_each_requester_gets_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(&StorageConfig::new(dir.path().to_path_buf())).unwrap());
        let f = DigestFunction::Sha256;
        let command = Command { arguments: vec!["true".into()], ..Default::default() }.encode_to_vec();
        let command_digest = f.digest_of(&command);
        let action = Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(f.empty().to_proto()),
            ..Default::default()
        }
        .encode_to_vec();
        let action_digest = f.digest_of(&action);
        let cas = storage.cas("");
        cas.write(&command_digest, command.into()).await.unwrap();
        cas.write(&action_digest, action.into()).await.unwrap();
        let executor = Arc::new(Counting { runs: Default::default(), release: tokio::sync::Notify::new() });
        let scheduler = Scheduler::new(storage, executor.clone(), 4);

        let submitted: Vec<Submitted> = (0..10).map(|_| scheduler.submit("", action_digest, 0)).collect();
        let names: std::collections::HashSet<&String> = submitted.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), 10, "each requester has an operation name of its own");
        while executor.runs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for requester in &submitted {
            let stage = requester.updates.borrow().stage.clone();
            assert!(matches!(&stage, Stage::Executing { worker, .. } if worker == "host-1"), "{stage:?}");
        }
        executor.release.notify_one();
        for mut requester in submitted {
            while !requester.updates.borrow_and_update().is_done() {
                requester.updates.changed().await.unwrap();
            }
            let state = requester.updates.borrow().clone();
            let result = state.response().unwrap().result.clone().unwrap();
            assert_eq!(result.exit_code, 7);
            let queued = result.execution_metadata.unwrap().queued_timestamp.expect("the queue time is filled in");
            assert_eq!(Some(queued), casbuild_proto::timestamp(state.queued));
        }
        assert_eq!(executor.runs.load(std::sync::atomic::Ordering::SeqCst), 1, "ten requests, one run");

        // Once finished, the same action runs again (only in-flight work is shared).
        let mut again = scheduler.submit("", action_digest, 0);
        while executor.runs.load(std::sync::atomic::Ordering::SeqCst) == 1 {
            tokio::task::yield_now().await;
        }
        executor.release.notify_one();
        while !again.updates.borrow_and_update().is_done() {
            again.updates.changed().await.unwrap();
        }
        assert_eq!(executor.runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
