//! Running one submitted graph. A job whose inputs all exist becomes a REAPI
//! Action (its input root holds its sources and the outputs of the jobs it
//! reads) and goes to the same scheduler as Execute, so identical actions run
//! once and results are cached for everyone. Every step is an event in the
//! graph's log, which any number of watchers follow and can resume.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use casbuild_cas::action::ActionSpec;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::storage::Storage;
use casbuild_proto::graph::graph_event::Event;
use casbuild_proto::graph::{self as proto, output::Kind, GraphEvent};
use casbuild_proto::reapi::{ActionResult, Tree};
use futures::stream::{self, FuturesUnordered, Stream, StreamExt};
use prost::Message;
use tokio::sync::watch;
use tonic::Code;

use super::{normal, parse_input, Graph, Input, Job};
use crate::action_cache::{cached_result, Lookup};
use crate::scheduler::{Scheduler, Stage};
use casbuild_cas::input_root::{Entry, InputRoot};

/// A checked graph and what it runs against.
pub struct GraphSpec {
    /// The REAPI instance.
    pub instance: String,
    /// The digest function of every digest involved.
    pub function: DigestFunction,
    /// The jobs (already checked: no problems).
    pub graph: Graph,
    /// Source files by normalized path.
    pub sources: HashMap<String, Entry>,
    /// Run what does not depend on a failure instead of stopping.
    pub keep_going: bool,
}

/// One graph's event log and its watchers' wake-up signal.
pub struct GraphRun {
    /// The graph's id, given to clients for WatchGraph.
    pub id: String,
    /// The instance it runs on (who may watch it is checked against it).
    pub instance: String,
    log: Mutex<Vec<GraphEvent>>,
    latest: watch::Sender<u64>,
}

impl GraphRun {
    /// An empty log for a new graph.
    pub fn new(instance: &str) -> Arc<Self> {
        let (latest, _) = watch::channel(0);
        let id = uuid::Uuid::new_v4().to_string();
        Arc::new(GraphRun { id, instance: instance.to_owned(), log: Mutex::new(Vec::new()), latest })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<GraphEvent>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and wakes the watchers.
    pub fn emit(&self, event: Event) {
        let sequence = {
            let mut log = self.log();
            let sequence = log.len() as u64 + 1;
            log.push(GraphEvent { graph_id: self.id.clone(), sequence, event: Some(event) });
            sequence
        };
        self.latest.send_replace(sequence);
    }

    /// The events after `after`, then live ones, ending with GraphDone.
    pub fn events(self: &Arc<Self>, after: u64) -> impl Stream<Item = GraphEvent> + Send + 'static {
        let receiver = self.latest.subscribe();
        stream::unfold((self.clone(), after, receiver, false), |(run, after, mut receiver, finished)| async move {
            if finished {
                return None;
            }
            loop {
                receiver.borrow_and_update();
                let (batch, finished): (Vec<GraphEvent>, bool) = {
                    let log = run.log();
                    let finished = log.last().is_some_and(|e| matches!(e.event, Some(Event::Done(_))));
                    (log.iter().skip(after as usize).cloned().collect(), finished)
                };
                if let Some(last) = batch.last() {
                    let (sequence, done) = (last.sequence, matches!(last.event, Some(Event::Done(_))));
                    return Some((stream::iter(batch), (run, sequence, receiver, done)));
                }
                // Caught up with a finished graph: nothing more will come.
                if finished || receiver.changed().await.is_err() {
                    return None;
                }
            }
        })
        .flatten()
    }
}

/// Where one job stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

/// How one job ended.
enum Outcome {
    Succeeded { outputs: HashMap<String, Entry>, event: proto::JobFinished },
    Failed(proto::JobFailed),
}

/// Runs `spec` to the end, logging every step in `run`.
pub async fn drive(run: Arc<GraphRun>, spec: GraphSpec, scheduler: Arc<Scheduler>, storage: Arc<Storage>) {
    let started = Instant::now();
    let spec = Arc::new(spec);
    let jobs = &spec.graph.jobs;
    let index: HashMap<&str, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id.as_str(), i)).collect();
    let mut dependencies: Vec<HashSet<usize>> = vec![HashSet::new(); jobs.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (i, job) in jobs.iter().enumerate() {
        for input in &job.inputs {
            if let Input::Output { job: producer, .. } = parse_input(input) {
                let p = index[producer];
                if dependencies[i].insert(p) {
                    dependents[p].push(i);
                }
            }
        }
    }
    let mut waiting: Vec<usize> = dependencies.iter().map(HashSet::len).collect();
    let mut state = vec![State::Waiting; jobs.len()];
    let mut outputs: Vec<Option<Arc<HashMap<String, Entry>>>> = vec![None; jobs.len()];
    let (mut executed, mut cached, mut failed, mut skipped) = (0u32, 0u32, 0u32, 0u32);
    let mut first_failure: Option<String> = None;
    let mut running = FuturesUnordered::new();

    let launch = |i: usize, outputs: &[Option<Arc<HashMap<String, Entry>>>]| {
        let produced: HashMap<&str, Arc<HashMap<String, Entry>>> =
            dependencies[i].iter().filter_map(|p| outputs[*p].clone().map(|o| (jobs[*p].id.as_str(), o))).collect();
        let root = input_root(&spec, &jobs[i], &produced);
        let (spec, run, scheduler, storage) = (spec.clone(), run.clone(), scheduler.clone(), storage.clone());
        async move {
            let outcome = match root {
                Ok(root) => run_job(&spec, i, root, &run, &scheduler, &storage).await,
                Err(reason) => Outcome::Failed(proto::JobFailed {
                    job_id: spec.graph.jobs[i].id.clone(),
                    reason,
                    ..Default::default()
                }),
            };
            (i, outcome)
        }
    };
    for i in 0..jobs.len() {
        if waiting[i] == 0 {
            state[i] = State::Running;
            running.push(launch(i, &outputs));
        }
    }
    while let Some((i, outcome)) = running.next().await {
        match outcome {
            Outcome::Succeeded { outputs: produced, event } => {
                state[i] = State::Succeeded;
                if event.cached {
                    cached += 1;
                } else {
                    executed += 1;
                }
                run.emit(Event::Finished(event));
                outputs[i] = Some(Arc::new(produced));
                for &d in &dependents[i] {
                    waiting[d] -= 1;
                    if waiting[d] == 0 && state[d] == State::Waiting && first_failure.is_none() {
                        state[d] = State::Running;
                        running.push(launch(d, &outputs));
                    }
                }
            }
            Outcome::Failed(event) => {
                state[i] = State::Failed;
                failed += 1;
                let id = event.job_id.clone();
                run.emit(Event::Failed(event));
                if spec.keep_going {
                    let mut stack = dependents[i].clone();
                    while let Some(d) = stack.pop() {
                        if state[d] == State::Waiting {
                            state[d] = State::Skipped;
                            skipped += 1;
                            let reason = format!("it needs job {id:?}, which failed");
                            run.emit(Event::Skipped(proto::JobSkipped { job_id: jobs[d].id.clone(), reason }));
                            stack.extend(&dependents[d]);
                        }
                    }
                } else if first_failure.is_none() {
                    first_failure = Some(id);
                }
            }
        }
    }
    if let Some(id) = first_failure {
        for (i, job) in jobs.iter().enumerate() {
            if state[i] == State::Waiting {
                skipped += 1;
                let reason = format!("the graph stopped after job {id:?} failed (keep-going runs everything else)");
                run.emit(Event::Skipped(proto::JobSkipped { job_id: job.id.clone(), reason }));
            }
        }
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    run.emit(Event::Done(proto::GraphDone { executed, cached, failed, skipped, duration_ms }));
}

/// The job's input root: its sources and its producers' outputs at their paths.
fn input_root(
    spec: &GraphSpec,
    job: &Job,
    produced: &HashMap<&str, Arc<HashMap<String, Entry>>>,
) -> Result<InputRoot, String> {
    let mut root = InputRoot::default();
    for input in &job.inputs {
        let (path, entry) = match parse_input(input) {
            Input::Source(path) => (path, spec.sources.get(&normal(path))),
            Input::Output { job: producer, path } => {
                (path, produced.get(producer).and_then(|outputs| outputs.get(&normal(path))))
            }
        };
        let entry = entry.ok_or_else(|| format!("input {input:?} is not available"))?;
        root.insert(path, entry.clone()).map_err(|e| e.0)?;
    }
    Ok(root)
}

/// Stores the job's Action and runs it (or finds it cached).
async fn run_job(
    spec: &GraphSpec,
    i: usize,
    root: InputRoot,
    run: &GraphRun,
    scheduler: &Arc<Scheduler>,
    storage: &Storage,
) -> Outcome {
    let job = &spec.graph.jobs[i];
    let fail =
        |reason: String| Outcome::Failed(proto::JobFailed { job_id: job.id.clone(), reason, ..Default::default() });
    let action = match store_action(spec, job, root, storage).await {
        Ok(action) => action,
        Err(reason) => return fail(reason),
    };
    run.emit(Event::Queued(proto::JobQueued { job_id: job.id.clone(), action_digest: Some(action.to_proto()) }));
    match cached_result(storage, &spec.instance, &action).await {
        Ok(Lookup::Hit(result)) => {
            return with_directories(spec, storage, outcome(spec, job, &action, *result, true, String::new())).await
        }
        Ok(Lookup::Miss(_)) => {}
        Err(e) => return fail(format!("looking up action {action} in the action cache: {e}")),
    }
    let mut updates = scheduler.submit(&spec.instance, action, 0).updates;
    let mut announced = false;
    let response = loop {
        let stage = updates.borrow_and_update().stage.clone();
        match stage {
            Stage::Completed(response) => break Arc::unwrap_or_clone(response),
            Stage::Executing { worker, .. } if !announced && !worker.is_empty() => {
                announced = true;
                run.emit(Event::Started(proto::JobStarted { job_id: job.id.clone(), worker }));
            }
            Stage::Queued | Stage::Executing { .. } => {}
        }
        if updates.changed().await.is_err() {
            return fail("the scheduler dropped the job".into());
        }
    };
    let status = response.status.clone().unwrap_or_default();
    match (Code::from_i32(status.code), response.result) {
        (Code::Ok, Some(result)) => {
            let outcome = outcome(spec, job, &action, result, response.cached_result, response.message);
            with_directories(spec, storage, outcome).await
        }
        (Code::DeadlineExceeded, Some(result)) => {
            let mut failed = ran_failure(spec, job, &result);
            failed.reason = format!("timed out: {}", status.message);
            Outcome::Failed(failed)
        }
        (code, _) => fail(format!("could not run ({code:?}): {}", status.message)),
    }
}

/// The job's outcome from its ActionResult: it succeeded when it exited 0 and
/// produced every declared output.
fn outcome(
    spec: &GraphSpec,
    job: &Job,
    action: &Digest,
    result: ActionResult,
    cached: bool,
    message: String,
) -> Outcome {
    if result.exit_code != 0 {
        let mut failed = ran_failure(spec, job, &result);
        failed.reason = format!("exited with code {}", result.exit_code);
        if !message.is_empty() {
            failed.reason = format!("{}; {message}", failed.reason);
        }
        return Outcome::Failed(failed);
    }
    let function = spec.function;
    let parse =
        |d: &Option<casbuild_proto::reapi::Digest>| d.as_ref().and_then(|d| Digest::from_proto(function, d).ok());
    let mut produced = HashMap::new();
    let mut listed = Vec::new();
    for file in &result.output_files {
        if let Some(digest) = parse(&file.digest) {
            produced.insert(normal(&file.path), Entry::File { digest, executable: file.is_executable });
            listed.push(output(&file.path, Kind::File, Some(digest), file.is_executable, ""));
        }
    }
    for dir in &result.output_directories {
        if let Some(digest) = parse(&dir.tree_digest) {
            // A Tree digest for now; `with_directories` makes it a Directory.
            produced.insert(normal(&dir.path), Entry::Directory(digest));
            listed.push(output(&dir.path, Kind::Directory, Some(digest), false, ""));
        }
    }
    for link in &result.output_symlinks {
        produced.insert(normal(&link.path), Entry::Symlink(link.target.clone()));
        listed.push(output(&link.path, Kind::Symlink, None, false, &link.target));
    }
    if let Some(absent) = job.outputs.iter().find(|o| !produced.contains_key(&normal(o))) {
        let mut failed = ran_failure(spec, job, &result);
        failed.reason = format!("declared output {absent:?} was not produced");
        return Outcome::Failed(failed);
    }
    let event = proto::JobFinished {
        job_id: job.id.clone(),
        cached,
        exit_code: 0,
        stdout_digest: parse(&result.stdout_digest).as_ref().map(Digest::to_proto),
        stderr_digest: parse(&result.stderr_digest).as_ref().map(Digest::to_proto),
        outputs: listed,
        worker: result.execution_metadata.as_ref().map(|m| m.worker.clone()).unwrap_or_default(),
        action_digest: Some(action.to_proto()),
    };
    Outcome::Succeeded { outputs: produced, event }
}

/// A JobFailed for a command that ran, carrying its exit code and logs.
fn ran_failure(spec: &GraphSpec, job: &Job, result: &ActionResult) -> proto::JobFailed {
    let parse = |d: &Option<casbuild_proto::reapi::Digest>| {
        d.as_ref().and_then(|d| Digest::from_proto(spec.function, d).ok()).as_ref().map(Digest::to_proto)
    };
    proto::JobFailed {
        job_id: job.id.clone(),
        reason: String::new(),
        ran: true,
        exit_code: result.exit_code,
        stdout_digest: parse(&result.stdout_digest),
        stderr_digest: parse(&result.stderr_digest),
        worker: result.execution_metadata.as_ref().map(|m| m.worker.clone()).unwrap_or_default(),
    }
}

fn output(path: &str, kind: Kind, digest: Option<Digest>, is_executable: bool, target: &str) -> proto::Output {
    proto::Output {
        path: path.to_owned(),
        kind: kind as i32,
        digest: digest.as_ref().map(Digest::to_proto),
        is_executable,
        symlink_target: target.to_owned(),
    }
}

/// Writes the job's Directories, Command and Action into the CAS (what it
/// lacks) and returns the Action's digest.
async fn store_action(spec: &GraphSpec, job: &Job, root: InputRoot, storage: &Storage) -> Result<Digest, String> {
    let function = spec.function;
    let (root, mut blobs) = root.encode(function);
    let action = ActionSpec {
        argv: job.argv.clone(),
        env: job.env.clone(),
        outputs: job.outputs.iter().map(|o| normal(o)).collect(),
        input_root: Some(root),
        timeout_secs: job.timeout_secs,
        platform: job.platform.clone(),
    }
    .encode(function);
    blobs.extend(action.blobs);
    write_missing(storage, &spec.instance, blobs).await?;
    Ok(action.digest)
}

/// Writes whichever of `blobs` the instance's CAS lacks.
async fn write_missing(storage: &Storage, instance: &str, blobs: Vec<(Digest, Bytes)>) -> Result<(), String> {
    let cas = storage.cas(instance);
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    let missing: HashSet<Digest> =
        cas.find_missing(&digests).await.map_err(|e| format!("storing the action: {e}"))?.into_iter().collect();
    for (digest, bytes) in blobs {
        if missing.contains(&digest) {
            cas.write(&digest, bytes).await.map_err(|e| format!("storing the action: {e}"))?;
        }
    }
    Ok(())
}

/// A successful outcome whose output directories are ready to be inputs
/// (see [`unpack_trees`]).
async fn with_directories(spec: &GraphSpec, storage: &Storage, outcome: Outcome) -> Outcome {
    let Outcome::Succeeded { outputs, event } = outcome else { return outcome };
    match unpack_trees(storage, &spec.instance, spec.function, outputs).await {
        Ok(outputs) => Outcome::Succeeded { outputs, event },
        Err(reason) => Outcome::Failed(proto::JobFailed { job_id: event.job_id, reason, ..Default::default() }),
    }
}

/// Turns every produced directory's Tree into Directory blobs in the CAS, so
/// the directory can sit in another job's input root; returns the entries
/// with each Tree digest replaced by its root Directory's digest.
async fn unpack_trees(
    storage: &Storage,
    instance: &str,
    function: DigestFunction,
    outputs: HashMap<String, Entry>,
) -> Result<HashMap<String, Entry>, String> {
    let cas = storage.cas(instance);
    let mut unpacked = HashMap::with_capacity(outputs.len());
    for (path, entry) in outputs {
        let entry = match entry {
            Entry::Directory(tree_digest) => {
                let bytes = cas.read_all(&tree_digest).await.map_err(|e| format!("output {path:?}: {e}"))?;
                let tree = Tree::decode(bytes.as_ref()).map_err(|e| format!("output {path:?}: a bad Tree: {e}"))?;
                let root = tree.root.unwrap_or_default();
                let mut blobs: Vec<(Digest, Bytes)> = tree
                    .children
                    .iter()
                    .map(|child| {
                        let bytes = Bytes::from(child.encode_to_vec());
                        (function.digest_of(&bytes), bytes)
                    })
                    .collect();
                let root_bytes = Bytes::from(root.encode_to_vec());
                let root_digest = function.digest_of(&root_bytes);
                blobs.push((root_digest, root_bytes));
                write_missing(storage, instance, blobs).await?;
                Entry::Directory(root_digest)
            }
            other => other,
        };
        unpacked.insert(path, entry);
    }
    Ok(unpacked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_resume_after_a_sequence_and_end_with_the_graph() {
        let run = GraphRun::new("");
        run.emit(Event::Accepted(proto::GraphAccepted { jobs: 1 }));
        let live = tokio::spawn({
            let run = run.clone();
            async move { run.events(0).collect::<Vec<_>>().await }
        });
        run.emit(Event::Queued(proto::JobQueued { job_id: "a".into(), action_digest: None }));
        run.emit(Event::Done(proto::GraphDone::default()));
        let limit = std::time::Duration::from_secs(5);
        let all = tokio::time::timeout(limit, live).await.expect("the stream ends with GraphDone").unwrap();
        assert_eq!(all.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2, 3]);
        let resumed = tokio::time::timeout(limit, run.events(1).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(resumed.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2, 3]);
        // Caught up with a finished graph: the stream ends instead of waiting.
        let caught_up = tokio::time::timeout(limit, run.events(3).collect::<Vec<_>>()).await.expect("no hang");
        assert!(caught_up.is_empty());
    }
}
