//! Operations and leases shared through the cluster's database, so that
//! several coordinators serve one cluster: an action runs once however many
//! coordinators are asked for it, GetOperation and WaitExecution work on
//! any of them, and a coordinator that dies loses no queued or running
//! action.
//!
//! - **Leases.** Before a coordinator schedules an action it takes the
//!   action's lease in the database (one row per instance and action); a
//!   coordinator asked for an action whose lease another operation holds
//!   follows that operation instead of running it again. A lease lasts as
//!   long as its coordinator's heartbeats (every 2 s): once they stop for
//!   10 s the others adopt its leases (`FOR UPDATE SKIP LOCKED`, so each
//!   lease has one adopter) and run those actions under the same operation
//!   names. A lease ends when its operation's final state is published.
//! - **Operations.** The coordinator running an operation publishes each of
//!   its states (the encoded Operation: queued, executing, done); another
//!   coordinator asked about a name it does not know reads it there and,
//!   for WaitExecution, follows the row until it is done, moving on to
//!   whichever operation holds the action's lease when the row's own
//!   coordinator has stopped. An operation whose coordinator stopped with
//!   no lease left on its action is NOT_FOUND (REAPI's "execute again").

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use casbuild_cas::database::{Database, Lease, Leased, SharedOperation};
use casbuild_cas::digest::Digest;
use casbuild_proto::longrunning::Operation;
use casbuild_proto::reapi::ExecuteOperationMetadata;
use futures::Stream;
use prost::Message;
use tokio::sync::watch;
use tonic::Status;

use crate::scheduler::{new_operation_name, JobState, Scheduler, Submitted};
use crate::status::store_status;

/// How often each coordinator records that it is alive (renewing its
/// leases), adopts the leases of stopped ones, and ends its finished ones.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A coordinator silent this long is taken for dead (its leases expire).
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// The most leases one heartbeat adopts.
const ADOPT_AT_ONCE: i64 = 64;
/// How often a follower looks at an operation another coordinator runs.
const FOLLOW: Duration = Duration::from_millis(500);
/// How long finished operations stay in the database.
const KEEP_DONE: Duration = Duration::from_secs(15 * 60);

/// A stream of an operation's states.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// How a job's state reads on the wire (the Execution service's renderer).
pub type Render = fn(&str, &JobState) -> Operation;

/// Where an Execute in a cluster ended up.
pub enum Submission {
    /// This coordinator runs the action (or joined its job here).
    Here(Submitted),
    /// Another coordinator's operation runs it: its states, followed.
    Elsewhere(OperationStream),
}

/// This coordinator's side of the shared operations and leases.
pub struct SharedOperations {
    database: Database,
    scheduler: Arc<Scheduler>,
    render: Render,
    /// This coordinator's id in the database (new at every start).
    id: String,
}

impl SharedOperations {
    /// Joins the cluster's operations in `database`, scheduling on
    /// `scheduler`: records heartbeats, adopts stopped coordinators' leases,
    /// and ends this one's finished ones, until dropped.
    pub fn start(database: Database, scheduler: Arc<Scheduler>, render: Render) -> Arc<Self> {
        let id = uuid::Uuid::new_v4().to_string();
        let shared = Arc::new(SharedOperations { database, scheduler, render, id });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(shared) = weak.upgrade() {
                if let Err(e) = shared.beat().await {
                    tracing::warn!("shared operations: {e}");
                }
                drop(shared);
                tokio::time::sleep(HEARTBEAT).await;
            }
        });
        shared
    }

    /// One heartbeat: alive, adopt, tidy.
    async fn beat(&self) -> Result<(), casbuild_cas::store::StoreError> {
        self.database.heartbeat(&self.id, KEEP_DONE).await?;
        let adopted = self.database.adopt_leases(&self.id, DEAD_AFTER, ADOPT_AT_ONCE).await?;
        if !adopted.is_empty() {
            tracing::info!(leases = adopted.len(), "adopted from a stopped coordinator");
            metrics::counter!("casbuild_leases_adopted_total").increment(adopted.len() as u64);
        }
        // Every lease this coordinator holds runs here: adopted ones start
        // (also those a failed beat adopted without starting), finished ones
        // whose last publication (and so their release) failed end.
        for lease in self.database.leases_of(&self.id).await? {
            if let Err(e) = self.keep(lease).await {
                tracing::warn!("shared operations: {e}");
            }
        }
        Ok(())
    }

    /// Runs, or ends, one of this coordinator's leases.
    async fn keep(&self, lease: Lease) -> Result<(), casbuild_cas::store::StoreError> {
        match self.scheduler.watch(&lease.operation) {
            Some((instance, updates)) => {
                if updates.borrow().is_done() {
                    self.publish(lease.operation, instance, updates).await;
                }
            }
            // Finished by a coordinator that died before releasing it.
            None if self.database.operation(&lease.operation).await?.is_some_and(|row| row.done) => {
                self.database.release(&lease.instance, &lease.action, &lease.operation).await?;
            }
            None => {
                tracing::info!(operation = %lease.operation, action = %lease.action, "running an adopted lease");
                // (A lease this coordinator has just taken and is about to
                // schedule joins the same job: no second run.)
                let submitted =
                    self.scheduler.submit_as(&lease.instance, lease.action, lease.priority, lease.operation);
                self.publish(submitted.name, lease.instance, submitted.updates).await;
            }
        }
        Ok(())
    }

    /// Schedules `action` for the cluster: joins this coordinator's job for
    /// it, or takes its lease and schedules it here, or follows the
    /// operation that holds the lease.
    pub async fn submit(self: &Arc<Self>, instance: &str, action: Digest, priority: i32) -> Result<Submission, Status> {
        if let Some(joined) = self.scheduler.join(instance, action) {
            self.publish(joined.name.clone(), instance.to_owned(), joined.updates.clone()).await;
            return Ok(Submission::Here(joined));
        }
        let name = new_operation_name();
        match self.database.lease(instance, &action, &name, &self.id, priority).await.map_err(store_status)? {
            Leased::Taken => {
                let submitted = self.scheduler.submit_as(instance, action, priority, name);
                self.publish(submitted.name.clone(), instance.to_owned(), submitted.updates.clone()).await;
                Ok(Submission::Here(submitted))
            }
            Leased::Held(lease) => {
                metrics::counter!("casbuild_leases_followed_total").increment(1);
                let first = self.database.operation(&lease.operation).await.map_err(store_status)?;
                let target = Target { instance: instance.to_owned(), action, source: lease.operation.clone() };
                Ok(Submission::Elsewhere(self.follow_target(lease.operation, target, first)))
            }
        }
    }

    /// Publishes every state of operation `name`, until it is done: the
    /// first before returning (so the name is known cluster-wide once its
    /// requester has it), the rest as they come; the final one ends the
    /// operation's lease.
    pub async fn publish(&self, name: String, instance: String, mut receiver: watch::Receiver<JobState>) {
        let (database, id, render) = (self.database.clone(), self.id.clone(), self.render);
        let publish = move |receiver: &mut watch::Receiver<JobState>| {
            let state = receiver.borrow_and_update().clone();
            let operation = render(&name, &state);
            let (database, id, name, instance) = (database.clone(), id.clone(), name.clone(), instance.clone());
            async move {
                let (done, encoded) = (operation.done, operation.encode_to_vec());
                let published = match done {
                    true => database.finish_operation(&name, &instance, &id, &encoded, &state.action).await,
                    false => database.put_operation(&name, &instance, &id, &encoded).await,
                };
                if let Err(e) = published {
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
    /// finished and nobody holds its action's lease.
    pub async fn find(&self, name: &str) -> Result<Option<SharedOperation>, Status> {
        // Names this cluster gives out; anything else is not looked up.
        if !name.starts_with("operations/") || name.len() > 64 {
            return Ok(None);
        }
        match self.database.operation(name).await.map_err(store_status)? {
            Some(row) if !row.done && !self.owner_alive(&row).await => match Target::of(name, &row) {
                Some(target) if self.lease(&target).await.is_some() => Ok(Some(row)),
                _ => Err(orphaned(name)),
            },
            found => Ok(found),
        }
    }

    /// Whether the coordinator running `row` still records heartbeats (a
    /// database error counts as alive: the follower keeps waiting).
    async fn owner_alive(&self, row: &SharedOperation) -> bool {
        !matches!(self.database.coordinator_alive(&row.coordinator, DEAD_AFTER).await, Ok(false))
    }

    /// The lease on `target`'s action (a database error counts as held: the
    /// follower keeps waiting).
    async fn lease(&self, target: &Target) -> Option<Lease> {
        match self.database.lease_of(&target.instance, &target.action).await {
            Ok(lease) => lease,
            Err(_) => Some(Lease {
                instance: target.instance.clone(),
                action: target.action,
                operation: target.source.clone(),
                coordinator: String::new(),
                priority: 0,
            }),
        }
    }

    /// The operation a row holds.
    pub fn decode(row: &SharedOperation) -> Result<Operation, Status> {
        Operation::decode(row.operation.as_slice())
            .map_err(|e| Status::internal(format!("a shared operation does not decode: {e}")))
    }

    /// Every new state of operation `name`, from `row` on, until it is done
    /// (or its action is lost with its coordinator).
    pub fn follow(self: &Arc<Self>, name: String, row: SharedOperation) -> OperationStream {
        match Target::of(&name, &row) {
            Some(target) => self.follow_target(name, target, Some(row)),
            None => Box::pin(futures::stream::iter([Err(Status::internal(format!(
                "shared operation {name} names no action"
            )))])),
        }
    }

    /// Every new state of `target`'s operation, under the name `name`.
    fn follow_target(self: &Arc<Self>, name: String, target: Target, row: Option<SharedOperation>) -> OperationStream {
        let start = Some((self.clone(), name, target, None::<Vec<u8>>, row));
        Box::pin(futures::stream::unfold(start, |state| async move {
            let (shared, name, mut target, sent, mut row) = state?;
            loop {
                if let Some(current) = row.as_ref().filter(|row| sent.as_deref() != Some(row.operation.as_slice())) {
                    let mut operation = match SharedOperations::decode(current) {
                        Ok(operation) => operation,
                        Err(e) => return Some((Err(e), None)),
                    };
                    operation.name = name.clone();
                    let done = current.done;
                    let sent = Some(current.operation.clone());
                    let next = (!done).then(|| (shared.clone(), name.clone(), target.clone(), sent, row.clone()));
                    return Some((Ok(operation), next));
                }
                tokio::time::sleep(FOLLOW).await;
                let fresh = match shared.database.operation(&target.source).await {
                    Ok(fresh) => fresh,
                    Err(e) => return Some((Err(store_status(e)), None)),
                };
                let stalled = fresh.is_none() || fresh == row;
                let owner_gone = match &fresh {
                    Some(fresh) => !shared.owner_alive(fresh).await,
                    None => true,
                };
                row = fresh;
                if stalled && owner_gone {
                    match shared.lease(&target).await {
                        // Adopted (or about to be) under another name: follow that one.
                        Some(lease) if lease.operation != target.source => {
                            target.source = lease.operation;
                            row = None;
                        }
                        // Its lease waits for an adopter, or its first state for publishing.
                        Some(_) => {}
                        None if row.is_none() => {
                            return Some((Err(Status::not_found(format!("no operation {name:?}"))), None))
                        }
                        None => return Some((Err(orphaned(&name)), None)),
                    }
                }
            }
        }))
    }
}

/// What a follower follows: the action and the operation running it now.
#[derive(Clone, Debug)]
struct Target {
    instance: String,
    action: Digest,
    /// The operation whose rows are read.
    source: String,
}

impl Target {
    /// The action of operation `name`'s row, from its metadata.
    fn of(name: &str, row: &SharedOperation) -> Option<Target> {
        let operation = Operation::decode(row.operation.as_slice()).ok()?;
        let metadata = ExecuteOperationMetadata::decode(operation.metadata?.value.as_slice()).ok()?;
        let action = Digest::from_request(metadata.digest_function, metadata.action_digest.as_ref()?).ok()?;
        Some(Target { instance: row.instance.clone(), action, source: name.to_owned() })
    }
}

/// What a caller hears of an operation whose coordinator died with no
/// adopter for its action: REAPI's NOT_FOUND, on which clients execute the
/// action again.
fn orphaned(name: &str) -> Status {
    Status::not_found(format!("the coordinator running {name} stopped before it finished; execute the action again"))
}
