//! Operations shared through the cluster's database, so that GetOperation
//! and WaitExecution work on any coordinator, not only on the one running
//! the action.
//!
//! The coordinator that runs an operation publishes each of its states (the
//! encoded Operation: queued, executing, done) to the database; another
//! coordinator asked about a name it does not know reads it there and, for
//! WaitExecution, follows the row until it is done. Every coordinator
//! records a heartbeat; an operation whose coordinator stopped before it
//! finished is NOT_FOUND (ending its followers' streams), which REAPI
//! clients answer by executing the action again: that coordinator's queue
//! and leases died with it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use casbuild_cas::database::{Database, SharedOperation};
use casbuild_proto::longrunning::Operation;
use futures::Stream;
use prost::Message;
use tokio::sync::watch;
use tonic::Status;

use crate::scheduler::JobState;
use crate::status::store_status;

/// How often each coordinator records that it is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A coordinator silent this long is taken for dead.
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// How often a follower looks at an operation another coordinator runs.
const FOLLOW: Duration = Duration::from_millis(500);
/// How long finished operations stay in the database.
const KEEP_DONE: Duration = Duration::from_secs(15 * 60);

/// A stream of an operation's states.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// This coordinator's side of the shared operations.
pub struct SharedOperations {
    database: Database,
    /// This coordinator's id in the database (new at every start).
    id: String,
}

impl SharedOperations {
    /// Joins the cluster's operations in `database`, recording heartbeats
    /// (and pruning old finished operations) until dropped.
    pub fn start(database: Database) -> Arc<Self> {
        let shared = Arc::new(SharedOperations { database, id: uuid::Uuid::new_v4().to_string() });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(shared) = weak.upgrade() {
                if let Err(e) = shared.database.heartbeat(&shared.id, KEEP_DONE).await {
                    tracing::warn!("shared operations: {e}");
                }
                drop(shared);
                tokio::time::sleep(HEARTBEAT).await;
            }
        });
        shared
    }

    /// Publishes every state of operation `name` as `to_operation` renders
    /// it, until it is done: the first before returning (so the name is
    /// known cluster-wide once its requester has it), the rest as they come.
    pub async fn publish(
        &self,
        name: String,
        instance: String,
        mut receiver: watch::Receiver<JobState>,
        to_operation: fn(&str, &JobState) -> Operation,
    ) {
        let (database, id) = (self.database.clone(), self.id.clone());
        let publish = move |receiver: &mut watch::Receiver<JobState>| {
            let operation = to_operation(&name, &receiver.borrow_and_update());
            let (database, id, name, instance) = (database.clone(), id.clone(), name.clone(), instance.clone());
            async move {
                let done = operation.done;
                if let Err(e) = database.put_operation(&name, &instance, &id, &operation.encode_to_vec(), done).await {
                    tracing::warn!(operation = %name, "publishing: {e}");
                }
                done
            }
        };
        if publish(&mut receiver).await {
            return;
        }
        tokio::spawn(async move {
            while receiver.changed().await.is_ok() {
                if publish(&mut receiver).await {
                    return;
                }
            }
        });
    }

    /// Operation `name` as some coordinator last published it; NOT_FOUND
    /// (saying why) when the coordinator running it stopped before it
    /// finished.
    pub async fn find(&self, name: &str) -> Result<Option<SharedOperation>, Status> {
        // Names this cluster gives out; anything else is not looked up.
        if !name.starts_with("operations/") || name.len() > 64 {
            return Ok(None);
        }
        match self.database.operation(name).await.map_err(store_status)? {
            Some(row) if !row.done && !self.owner_alive(&row).await => Err(orphaned(name)),
            found => Ok(found),
        }
    }

    /// Whether the coordinator running `row` still records heartbeats (a
    /// database error counts as alive: the follower keeps waiting).
    async fn owner_alive(&self, row: &SharedOperation) -> bool {
        !matches!(self.database.coordinator_alive(&row.coordinator, DEAD_AFTER).await, Ok(false))
    }

    /// The operation a row holds.
    pub fn decode(row: &SharedOperation) -> Result<Operation, Status> {
        Operation::decode(row.operation.as_slice())
            .map_err(|e| Status::internal(format!("a shared operation does not decode: {e}")))
    }

    /// Every new state of operation `name`, from `row` on, until it is done
    /// (or its coordinator is gone).
    pub fn follow(self: Arc<Self>, name: String, row: SharedOperation) -> OperationStream {
        let start = Some((self, name, None::<Vec<u8>>, row));
        Box::pin(futures::stream::unfold(start, |state| async move {
            let (shared, name, sent, mut row) = state?;
            loop {
                if sent.as_deref() != Some(row.operation.as_slice()) {
                    let operation = match SharedOperations::decode(&row) {
                        Ok(operation) => operation,
                        Err(e) => return Some((Err(e), None)),
                    };
                    let next = (!row.done).then(|| (shared.clone(), name.clone(), Some(row.operation.clone()), row));
                    return Some((Ok(operation), next));
                }
                tokio::time::sleep(FOLLOW).await;
                let fresh = match shared.database.operation(&name).await {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) => return Some((Err(Status::not_found(format!("no operation {name:?}"))), None)),
                    Err(e) => return Some((Err(store_status(e)), None)),
                };
                if fresh.operation == row.operation && !shared.owner_alive(&fresh).await {
                    return Some((Err(orphaned(&name)), None));
                }
                row = fresh;
            }
        }))
    }
}

/// What a caller hears of an operation whose coordinator died: REAPI's
/// NOT_FOUND, on which clients execute the action again.
fn orphaned(name: &str) -> Status {
    Status::not_found(format!("the coordinator running {name} stopped before it finished; execute the action again"))
}
