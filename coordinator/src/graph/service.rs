//! The Graphs gRPC service: SubmitGraph checks a graph and starts it,
//! WatchGraph resumes its event stream.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{admit, Permission};
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::storage::Storage;
use casbuild_proto::graph::graph_event::Event;
use casbuild_proto::graph::graphs_server::Graphs;
use casbuild_proto::graph::{self as proto, GraphEvent, SubmitGraphRequest, WatchGraphRequest};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::run::{drive, GraphRun, GraphSpec};
use super::{escapes, normal, Graph, Job};
use crate::scheduler::Scheduler;
use crate::status::{call_status, precondition_missing, store_status};
use casbuild_cas::input_root::Entry;

/// How long a finished graph's events can still be watched.
const KEEP_FINISHED: Duration = Duration::from_secs(600);

type EventStream = Pin<Box<dyn Stream<Item = Result<GraphEvent, Status>> + Send>>;

/// Runs submitted graphs on the Execute scheduler.
#[derive(Clone)]
pub struct GraphsService {
    storage: Arc<Storage>,
    scheduler: Arc<Scheduler>,
    runs: Arc<Mutex<Runs>>,
}

/// Finished graphs kept for watchers at most; beyond it the oldest go first.
const MAX_FINISHED: usize = 1000;

/// The graphs that can be watched: running ones, and finished ones for
/// [`KEEP_FINISHED`] within [`MAX_FINISHED`].
#[derive(Default)]
struct Runs {
    by_id: HashMap<String, Arc<GraphRun>>,
    /// Ids of finished graphs in the order they finished (some may have
    /// been forgotten already, by time).
    finished: VecDeque<String>,
}

impl Runs {
    fn finished(&mut self, id: &str) {
        self.finished.push_back(id.to_owned());
        while self.finished.len() > MAX_FINISHED {
            if let Some(oldest) = self.finished.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
    }
}

impl GraphsService {
    /// Graphs over `storage`, their jobs run by `scheduler`.
    pub fn new(storage: Arc<Storage>, scheduler: Arc<Scheduler>) -> Self {
        GraphsService { storage, scheduler, runs: Arc::default() }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the request: the graph, its sources and their digests. Every
    /// problem is named in one INVALID_ARGUMENT.
    fn check(request: SubmitGraphRequest) -> Result<GraphSpec, Status> {
        let function = match request.digest_function {
            0 => DigestFunction::Sha256,
            n => {
                DigestFunction::resolve(n, "").map_err(|e| Status::invalid_argument(format!("digest_function: {e}")))?
            }
        };
        let mut problems = Vec::new();
        let mut sources: HashMap<String, Entry> = HashMap::new();
        for (k, source) in request.sources.iter().enumerate() {
            if let Some(why) = escapes(&source.path) {
                problems.push(format!("sources[{k}] {:?} {why}", source.path));
                continue;
            }
            let digest = source
                .digest
                .as_ref()
                .ok_or_else(|| "has no digest".to_owned())
                .and_then(|d| Digest::from_hex(function, &d.hash, d.size_bytes).map_err(|e| e.to_string()));
            let entry = match digest {
                Ok(digest) => Entry::File { digest, executable: source.is_executable },
                Err(why) => {
                    problems.push(format!("sources[{k}] {:?}: digest {why}", source.path));
                    continue;
                }
            };
            if let Some(other) = sources.insert(normal(&source.path), entry.clone()) {
                if other != entry {
                    problems.push(format!("sources[{k}] {:?} is listed twice with different contents", source.path));
                }
            }
        }
        let graph = Graph { jobs: request.jobs.into_iter().map(Job::from).collect() };
        problems.extend(graph.problems_with(|path| {
            (!sources.contains_key(&normal(path))).then(|| format!("source file {path:?} was not sent with the graph"))
        }));
        if !problems.is_empty() {
            return Err(Status::invalid_argument(format!("the graph is invalid:\n{}", problems.join("\n"))));
        }
        crate::status::check_instance(&request.instance_name)?;
        Ok(GraphSpec { instance: request.instance_name, function, graph, sources, keep_going: request.keep_going })
    }

    /// FAILED_PRECONDITION listing the sources the CAS lacks, if any.
    async fn check_sources(&self, spec: &GraphSpec) -> Result<(), Status> {
        let digests: Vec<Digest> = spec
            .sources
            .values()
            .filter_map(|e| match e {
                Entry::File { digest, .. } => Some(*digest),
                _ => None,
            })
            .collect();
        let missing = self.storage.cas(&spec.instance).find_missing(&digests).await.map_err(store_status)?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(call_status(precondition_missing(&missing)))
        }
    }
}

#[tonic::async_trait]
impl Graphs for GraphsService {
    type SubmitGraphStream = EventStream;
    type WatchGraphStream = EventStream;

    async fn submit_graph(&self, request: Request<SubmitGraphRequest>) -> Result<Response<EventStream>, Status> {
        let (_, request) = admit(request, Permission::Execute, |r| &r.instance_name)?;
        let spec = Self::check(request)?;
        self.check_sources(&spec).await?;
        let run = GraphRun::new(&spec.instance);
        run.emit(Event::Accepted(proto::GraphAccepted { jobs: spec.graph.jobs.len() as u32 }));
        self.runs().by_id.insert(run.id.clone(), run.clone());
        tracing::info!("graph {}: {} jobs", run.id, spec.graph.jobs.len());
        let (driven, runs, scheduler, storage) =
            (run.clone(), self.runs.clone(), self.scheduler.clone(), self.storage.clone());
        tokio::spawn(async move {
            drive(driven.clone(), spec, scheduler, storage).await;
            runs.lock().unwrap_or_else(|e| e.into_inner()).finished(&driven.id);
            tokio::time::sleep(KEEP_FINISHED).await;
            runs.lock().unwrap_or_else(|e| e.into_inner()).by_id.remove(&driven.id);
        });
        Ok(Response::new(Box::pin(run.events(0).map(Ok))))
    }

    async fn watch_graph(&self, request: Request<WatchGraphRequest>) -> Result<Response<EventStream>, Status> {
        let principal = crate::auth::principal(&request)?;
        let request = request.into_inner();
        let run = self.runs().by_id.get(&request.graph_id).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "graph {:?} is unknown here (finished graphs are kept for {} s)",
                request.graph_id,
                KEEP_FINISHED.as_secs()
            ))
        })?;
        crate::auth::check(&principal, Permission::Execute, &run.instance)?;
        Ok(Response::new(Box::pin(run.events(request.after_sequence).map(Ok))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_graphs_are_kept_within_a_count_oldest_first() {
        let mut runs = Runs::default();
        let ids: Vec<String> = (0..MAX_FINISHED + 5).map(|i| format!("graph-{i}")).collect();
        for id in &ids {
            runs.by_id.insert(id.clone(), GraphRun::new(""));
        }
        runs.by_id.insert("running".into(), GraphRun::new(""));
        for id in &ids {
            runs.finished(id);
        }
        assert_eq!(runs.by_id.len(), MAX_FINISHED + 1, "the running graph stays");
        assert!(ids[..5].iter().all(|id| !runs.by_id.contains_key(id)));
        assert!(runs.by_id.contains_key(&ids[5]) && runs.by_id.contains_key("running"));
    }
}
