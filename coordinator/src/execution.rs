//! The Execution service (Execute, WaitExecution) and the longrunning
//! Operations service (GetOperation, CancelOperation) over the [`Scheduler`].
//! The only place a job's [`JobState`] becomes a `google.longrunning.Operation`.

use std::sync::Arc;

use casbuild_cas::storage::Storage;
use casbuild_proto::longrunning::operations_server::Operations;
use casbuild_proto::longrunning::{
    operation, CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use casbuild_proto::operation::pack;
use casbuild_proto::protobuf::Empty;
use casbuild_proto::reapi::execution_server::Execution;
use casbuild_proto::reapi::execution_stage::Value as WireStage;
use casbuild_proto::reapi::{
    ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, ExecutedActionMetadata, WaitExecutionRequest,
};
use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::action_cache::{cached_result, Lookup};
use crate::auth::{admit, principal, require_everywhere, Permission, Principal};
use crate::scheduler::{new_operation_name, JobState, Scheduler, Stage};
use crate::status::{request_digest, rpc_ok, store_status};

/// Operations in a ListOperations page unless the caller asks for fewer.
const DEFAULT_PAGE: usize = 100;
/// The most operations in one page.
const MAX_PAGE: usize = 1000;

use crate::shared_operations::{OperationStream, SharedOperations, Submission};

/// Execution and Operations, sharing one scheduler.
#[derive(Clone)]
pub struct ExecutionService {
    storage: Arc<Storage>,
    scheduler: Arc<Scheduler>,
    /// The cluster's operations, when the action cache is in a shared database.
    shared: Option<Arc<SharedOperations>>,
}

impl ExecutionService {
    /// Serves `scheduler`, looking up results in `storage`'s action cache
    /// (and operations of other coordinators in its database, if shared).
    pub fn new(storage: Arc<Storage>, scheduler: Arc<Scheduler>) -> Self {
        let shared = storage
            .action_cache()
            .database()
            .cloned()
            .map(|database| SharedOperations::start(database, scheduler.clone(), to_operation));
        ExecutionService { storage, scheduler, shared }
    }

    /// Operation `name` as another coordinator of the cluster published it,
    /// for a caller who may execute on its instance.
    async fn elsewhere(
        &self,
        principal: &Principal,
        name: &str,
    ) -> Result<Option<(Arc<SharedOperations>, casbuild_cas::database::SharedOperation)>, Status> {
        let Some(shared) = &self.shared else { return Ok(None) };
        match shared.find(name).await? {
            Some(row) if principal.may(Permission::Execute, &row.instance) => Ok(Some((shared.clone(), row))),
            _ => Ok(None),
        }
    }

    /// The updates of operation `name`, for a caller who may execute on its
    /// instance (others learn nothing, not even that it exists).
    fn operation(&self, principal: &Principal, name: &str) -> Result<watch::Receiver<JobState>, Status> {
        match self.scheduler.watch(name) {
            Some((instance, receiver)) if principal.may(Permission::Execute, &instance) => Ok(receiver),
            _ => Err(Status::not_found(format!("no operation {name:?}"))),
        }
    }
}

/// A job's state as REAPI's Operation named `name`: ExecuteOperationMetadata
/// (stage, action, and the worker once one runs it) and, when done, the
/// ExecuteResponse.
fn to_operation(name: &str, state: &JobState) -> Operation {
    let (stage, partial) = match &state.stage {
        Stage::Queued => (WireStage::Queued, None),
        Stage::Executing { worker, since } => {
            let partial = ExecutedActionMetadata {
                worker: worker.clone(),
                queued_timestamp: casbuild_proto::timestamp(state.queued),
                worker_start_timestamp: casbuild_proto::timestamp(*since),
                ..Default::default()
            };
            (WireStage::Executing, Some(partial))
        }
        Stage::Completed(_) => (WireStage::Completed, None),
    };
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(state.action.to_proto()),
        digest_function: state.action.function.to_proto() as i32,
        partial_execution_metadata: partial,
        ..Default::default()
    };
    Operation {
        name: name.to_owned(),
        metadata: Some(pack("ExecuteOperationMetadata", &metadata)),
        done: state.is_done(),
        result: state
            .response()
            .map(|response| operation::Result::Response(pack("ExecuteResponse", response.as_ref()))),
    }
}

/// Every change of an operation, ending with the one that is done, under
/// the name the requester knows it by.
fn updates(mut receiver: watch::Receiver<JobState>, name: String) -> OperationStream {
    Box::pin(async_stream(move |tx| async move {
        loop {
            let operation = to_operation(&name, &receiver.borrow_and_update());
            let done = operation.done;
            if tx.send(Ok(operation)).await.is_err() || done {
                return;
            }
            if receiver.changed().await.is_err() {
                return;
            }
        }
    }))
}

/// A stream fed by a spawned task through a channel.
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<Operation, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Operation, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<Self::ExecuteStream>, Status> {
        let (_, request) = admit(request, Permission::Execute, |r| &r.instance_name)?;
        let action = request_digest(request.digest_function, request.action_digest.as_ref(), "action_digest")?;
        let instance = request.instance_name;
        if !request.skip_cache_lookup {
            let lookup = cached_result(&self.storage, &instance, &action).await.map_err(store_status)?;
            crate::action_cache::count_lookup("execute", &lookup);
            if let Lookup::Hit(result) = lookup {
                let name = new_operation_name();
                let response = ExecuteResponse {
                    result: Some(*result),
                    cached_result: true,
                    status: Some(rpc_ok()),
                    ..Default::default()
                };
                let operation = to_operation(&name, &JobState::completed(action, response));
                return Ok(Response::new(Box::pin(futures::stream::iter([Ok(operation)]))));
            }
        }
        let priority = request.execution_policy.map_or(0, |p| p.priority);
        let submitted = match &self.shared {
            None => self.scheduler.submit(&instance, action, priority),
            Some(shared) => match shared.submit(&instance, action, priority).await? {
                Submission::Here(submitted) => submitted,
                Submission::Elsewhere(followed) => return Ok(Response::new(followed)),
            },
        };
        Ok(Response::new(updates(submitted.updates, submitted.name)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let principal = principal(&request)?;
        let name = request.into_inner().name;
        match self.operation(&principal, &name) {
            Ok(receiver) => Ok(Response::new(updates(receiver, name))),
            Err(not_here) => match self.elsewhere(&principal, &name).await? {
                Some((shared, row)) => Ok(Response::new(shared.follow(name, row))),
                None => Err(not_here),
            },
        }
    }
}

#[tonic::async_trait]
impl Operations for ExecutionService {
    /// Every operation, in name order, a page at a time, for admins only: an
    /// operation's name is what lets a caller follow or cancel it, so a
    /// listing must not hand other callers' names to anyone who may merely
    /// execute. `name` is empty (or `operations`) for every instance, else
    /// the one instance to list; the page token is the last name of the
    /// previous page.
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        require_everywhere(&request, Permission::Admin)?;
        let request = request.into_inner();
        if !request.filter.is_empty() {
            return Err(Status::invalid_argument(format!("filter {:?}: no filters are supported", request.filter)));
        }
        let size = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n < 0 => return Err(Status::invalid_argument(format!("page_size {n} is negative"))),
            n => (n as usize).min(MAX_PAGE),
        };
        let after = request.page_token;
        if !after.is_empty() && !after.starts_with("operations/") {
            return Err(Status::invalid_argument(format!("page_token {after:?} is not one this server gave")));
        }
        let instance = Some(request.name).filter(|n| !n.is_empty() && n != "operations");
        let mut visible = self
            .scheduler
            .operations()
            .into_iter()
            .filter(|op| op.name > after)
            .filter(|op| instance.as_ref().is_none_or(|i| *i == op.instance));
        let operations: Vec<Operation> =
            visible.by_ref().take(size).map(|op| to_operation(&op.name, &op.state)).collect();
        let next_page_token = match (visible.next(), operations.last()) {
            (Some(_), Some(last)) => last.name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(ListOperationsResponse { operations, next_page_token, ..Default::default() }))
    }

    async fn get_operation(&self, request: Request<GetOperationRequest>) -> Result<Response<Operation>, Status> {
        let principal = principal(&request)?;
        let name = request.into_inner().name;
        match self.operation(&principal, &name) {
            Ok(receiver) => Ok(Response::new(to_operation(&name, &receiver.borrow()))),
            Err(not_here) => match self.elsewhere(&principal, &name).await? {
                Some((_, row)) => Ok(Response::new(SharedOperations::decode(&row)?)),
                None => Err(not_here),
            },
        }
    }

    async fn delete_operation(&self, _request: Request<DeleteOperationRequest>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("deleting operations is not supported"))
    }

    async fn cancel_operation(&self, request: Request<CancelOperationRequest>) -> Result<Response<Empty>, Status> {
        let principal = principal(&request)?;
        let name = request.into_inner().name;
        self.operation(&principal, &name)?;
        // Only an admin stops an action other requesters still wait for.
        if self.scheduler.cancel(&name, principal.may_everywhere(Permission::Admin)) {
            Ok(Response::new(Empty {}))
        } else {
            Err(Status::not_found(format!("no operation {name:?}")))
        }
    }

    async fn wait_operation(&self, _request: Request<WaitOperationRequest>) -> Result<Response<Operation>, Status> {
        Err(Status::unimplemented("use Execution.WaitExecution"))
    }
}
