//! Shared state on PostgreSQL (docs/adr/0007-shared-state-on-postgresql.md):
//! the action cache and the Remote Asset records of several coordinators.
//!
//! A write is acknowledged once its transaction has committed (PostgreSQL's
//! default `synchronous_commit = on` flushes the WAL first), so a database
//! restart loses nothing a client was told was stored. Rows are keyed by the
//! instance's directory name ([`instance_dir`]: hashed, so any instance name
//! is a valid key) and carry the encoded protos. The schema is created and
//! migrated at connect, under an advisory lock (coordinators may start
//! together), and a schema newer than this casbuild knows is refused.

use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use crate::digest::{Digest, DigestFunction};
use crate::namespace::instance_dir;
use crate::store::StoreError;

/// The schema version this casbuild writes.
const SCHEMA_VERSION: i64 = 4;

/// Statements taking the schema from version N to N + 1.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE casbuild_action_cache (
        instance TEXT NOT NULL,
        function TEXT NOT NULL,
        hash BYTEA NOT NULL,
        size BIGINT NOT NULL,
        result BYTEA NOT NULL,
        written_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (instance, function, hash, size)
    );
    CREATE TABLE casbuild_assets (
        instance TEXT NOT NULL,
        key TEXT NOT NULL,
        entry BYTEA NOT NULL,
        written_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (instance, key)
    );
",
    "
    CREATE INDEX casbuild_action_cache_recent ON casbuild_action_cache (instance, written_at);
",
    "
    CREATE TABLE casbuild_operations (
        name TEXT PRIMARY KEY,
        instance BYTEA NOT NULL,
        coordinator TEXT NOT NULL,
        operation BYTEA NOT NULL,
        done BOOLEAN NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE casbuild_coordinators (
        id TEXT PRIMARY KEY,
        seen_at TIMESTAMPTZ NOT NULL
    );
",
    "
    CREATE TABLE casbuild_leases (
        instance TEXT NOT NULL,
        function TEXT NOT NULL,
        hash BYTEA NOT NULL,
        size BIGINT NOT NULL,
        instance_name BYTEA NOT NULL,
        operation TEXT NOT NULL,
        coordinator TEXT NOT NULL,
        priority INTEGER NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (instance, function, hash, size)
    );
    CREATE INDEX casbuild_leases_coordinator ON casbuild_leases (coordinator);
",
];

/// Serializes migrations of coordinators starting at once ("casbuild" in ASCII).
const MIGRATION_LOCK: i64 = 0x63_6173_6275_696c;

/// A pool of connections to the shared database. Cloning shares the pool.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    /// Host, port and database name, for messages (never the password).
    describe: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Database {
    /// Connects to `url` (`postgresql://USER@HOST:PORT/DB` or `host=... user=...`)
    /// and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::InvalidArgument(format!("database URL: {e}")))?;
        let describe = describe(&config);
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .wait_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::InvalidArgument(format!("{describe}: {e}")))?;
        let database = Database { pool, describe };
        database.migrate().await?;
        Ok(database)
    }

    /// How the database is named in messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn unavailable(&self, what: &str, error: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("{}: {what}: {error}", self.describe))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.unavailable("connecting", e))
    }

    /// Runs `attempt` on a pooled connection until it succeeds, riding out
    /// a database restart (see [`Patience`]).
    async fn patiently<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T, StoreError>
    where
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut patience = Patience::new();
        loop {
            let outcome = match self.pool.get().await {
                Ok(client) => attempt(client).await.map_err(Failure::Query),
                Err(e) => Err(Failure::Pool(e)),
            };
            match outcome {
                Ok(value) => return Ok(value),
                Err(failure) => patience.wait(failure, || self.unavailable(what, "")).await?,
            }
        }
    }

    /// Runs one statement (prepared once per connection), riding out a
    /// database restart; the rows it changed.
    async fn execute(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.patiently(what, |client| async move {
            let statement = client.prepare_cached(sql).await?;
            client.execute(&statement, params).await
        })
        .await
    }

    /// Runs one query of at most one row (prepared once per connection),
    /// riding out a database restart.
    async fn query_opt(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        self.patiently(what, |client| async move {
            let statement = client.prepare_cached(sql).await?;
            client.query_opt(&statement, params).await
        })
        .await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let failed = |e: tokio_postgres::Error| self.unavailable("migrating the schema", e);
        let tx = client.transaction().await.map_err(failed)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(failed)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS casbuild_schema (version BIGINT NOT NULL)")
            .await
            .map_err(failed)?;
        let row = tx.query_opt("SELECT version FROM casbuild_schema", &[]).await.map_err(failed)?;
        let version: i64 = row.map_or(0, |row| row.get(0));
        if version > SCHEMA_VERSION {
            return Err(StoreError::InvalidArgument(format!(
                "{}: the database's schema is version {version}, newer than this casbuild's {SCHEMA_VERSION}: \
                 upgrade casbuild",
                self.describe
            )));
        }
        for migration in &MIGRATIONS[version as usize..] {
            tx.batch_execute(migration).await.map_err(failed)?;
        }
        if version == 0 {
            tx.execute("INSERT INTO casbuild_schema (version) VALUES ($1)", &[&SCHEMA_VERSION])
                .await
                .map_err(failed)?;
        } else if version < SCHEMA_VERSION {
            tx.execute("UPDATE casbuild_schema SET version = $1", &[&SCHEMA_VERSION]).await.map_err(failed)?;
        }
        tx.commit().await.map_err(failed)
    }

    /// The encoded ActionResult of `action` in `instance`.
    pub async fn action_result(&self, instance: &str, action: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .query_opt(
                "reading the action cache",
                "SELECT result FROM casbuild_action_cache \
                 WHERE instance = $1 AND function = $2 AND hash = $3 AND size = $4",
                &[&instance_dir(instance), &action.function.name(), &&action.hash[..], &size_column(action)],
            )
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Stores (or replaces) the encoded ActionResult of `action`.
    pub async fn put_action_result(&self, instance: &str, action: &Digest, result: &[u8]) -> Result<(), StoreError> {
        self.execute(
            "writing the action cache",
            "INSERT INTO casbuild_action_cache (instance, function, hash, size, result) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (instance, function, hash, size) \
                 DO UPDATE SET result = EXCLUDED.result, written_at = now()",
            &[&instance_dir(instance), &action.function.name(), &&action.hash[..], &size_column(action), &result],
        )
        .await?;
        Ok(())
    }

    /// Every action digest of `instance` with `function`.
    pub async fn action_keys(&self, instance: &str, function: DigestFunction) -> Result<Vec<Digest>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT hash, size FROM casbuild_action_cache WHERE instance = $1 AND function = $2",
                &[&instance_dir(instance), &function.name()],
            )
            .await
            .map_err(|e| self.unavailable("listing the action cache", e))?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let hash: &[u8] = row.get(0);
                let size: i64 = row.get(1);
                Some(Digest { function, hash: hash.try_into().ok()?, size_bytes: u64::try_from(size).ok()? })
            })
            .collect())
    }

    /// The database's clock (the one `written_at` is read from).
    pub async fn now(&self) -> Result<SystemTime, StoreError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT now()", &[]).await.map_err(|e| self.unavailable("reading the clock", e))?;
        Ok(row.get(0))
    }

    /// The hashes of the action digests of `instance` written at or after
    /// `since` (by the database's clock), whatever their digest function.
    pub async fn action_hashes_since(&self, instance: &str, since: SystemTime) -> Result<Vec<[u8; 32]>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT hash FROM casbuild_action_cache WHERE instance = $1 AND written_at >= $2",
                &[&instance_dir(instance), &since],
            )
            .await
            .map_err(|e| self.unavailable("listing recent action cache entries", e))?;
        Ok(rows.iter().filter_map(|row| row.get::<_, &[u8]>(0).try_into().ok()).collect())
    }

    /// Bytes of results held, and how many there are.
    pub async fn action_cache_usage(&self) -> Result<(u64, usize), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), coalesce(sum(octet_length(result)), 0)::BIGINT FROM casbuild_action_cache",
                &[],
            )
            .await
            .map_err(|e| self.unavailable("sizing the action cache", e))?;
        let (count, bytes): (i64, i64) = (row.get(0), row.get(1));
        Ok((bytes.max(0) as u64, count.max(0) as usize))
    }

    /// The encoded asset entry under `key` in `instance`.
    pub async fn asset(&self, instance: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .query_opt(
                "reading Remote Asset records",
                "SELECT entry FROM casbuild_assets WHERE instance = $1 AND key = $2",
                &[&instance_dir(instance), &key],
            )
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Stores (or replaces) the encoded asset entry under `key`.
    pub async fn put_asset(&self, instance: &str, key: &str, entry: &[u8]) -> Result<(), StoreError> {
        self.execute(
            "writing Remote Asset records",
            "INSERT INTO casbuild_assets (instance, key, entry) VALUES ($1, $2, $3) \
                 ON CONFLICT (instance, key) DO UPDATE SET entry = EXCLUDED.entry, written_at = now()",
            &[&instance_dir(instance), &key, &entry],
        )
        .await?;
        Ok(())
    }
}

/// An operation as another coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedOperation {
    /// The instance it runs in.
    pub instance: String,
    /// The coordinator that runs it.
    pub coordinator: String,
    /// The encoded google.longrunning.Operation, as last published.
    pub operation: Vec<u8>,
    /// Whether that operation is done.
    pub done: bool,
}

/// Publishes an operation's state: ($1 name, $2 instance, $3 coordinator,
/// $4 encoded operation, $5 done).
macro_rules! upsert_operation {
    () => {
        "INSERT INTO casbuild_operations (name, instance, coordinator, operation, done) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (name) DO UPDATE SET operation = EXCLUDED.operation, done = EXCLUDED.done, \
         coordinator = EXCLUDED.coordinator, updated_at = now()"
    };
}

impl Database {
    /// Publishes the final state of operation `name` and ends its lease on
    /// `action`, in one statement (so one commit): a lease never ends
    /// without its result published.
    pub async fn finish_operation(
        &self,
        name: &str,
        instance: &str,
        coordinator: &str,
        operation: &[u8],
        action: &Digest,
    ) -> Result<(), StoreError> {
        self.execute(
            "publishing an operation's end",
            concat!(
                "WITH released AS (DELETE FROM casbuild_leases \
                 WHERE instance = $6 AND function = $7 AND hash = $8 AND size = $9 AND operation = $1) ",
                upsert_operation!()
            ),
            &[
                &name,
                &instance.as_bytes(),
                &coordinator,
                &operation,
                &true,
                &instance_dir(instance),
                &action.function.name(),
                &&action.hash[..],
                &size_column(action),
            ],
        )
        .await?;
        Ok(())
    }

    /// Publishes a state of operation `name` (not its last: see
    /// [`Database::finish_operation`]), run by `coordinator`.
    pub async fn put_operation(
        &self,
        name: &str,
        instance: &str,
        coordinator: &str,
        operation: &[u8],
    ) -> Result<(), StoreError> {
        self.execute(
            "publishing an operation",
            upsert_operation!(),
            &[&name, &instance.as_bytes(), &coordinator, &operation, &false],
        )
        .await?;
        Ok(())
    }

    /// Operation `name` as last published, if any coordinator published it.
    pub async fn operation(&self, name: &str) -> Result<Option<SharedOperation>, StoreError> {
        let row = self
            .query_opt(
                "reading an operation",
                "SELECT instance, coordinator, operation, done FROM casbuild_operations WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(row.map(|row| SharedOperation {
            instance: String::from_utf8_lossy(row.get::<_, &[u8]>(0)).into_owned(),
            coordinator: row.get(1),
            operation: row.get(2),
            done: row.get(3),
        }))
    }

    /// Records that `coordinator` is alive now, and forgets finished
    /// operations older than `keep_done`, and the unfinished operations and
    /// heartbeats of coordinators silent that long (each start is a new
    /// coordinator id, so without this they would pile up).
    pub async fn heartbeat(&self, coordinator: &str, keep_done: Duration) -> Result<(), StoreError> {
        let client = self.client().await?;
        let failed = |e| self.unavailable("recording this coordinator's heartbeat", e);
        client
            .execute(
                "INSERT INTO casbuild_coordinators (id, seen_at) VALUES ($1, now()) \
                 ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                &[&coordinator],
            )
            .await
            .map_err(failed)?;
        let keep = keep_done.as_secs_f64();
        for statement in [
            "DELETE FROM casbuild_operations WHERE done AND updated_at < now() - make_interval(secs => $1)",
            "DELETE FROM casbuild_operations o WHERE NOT done AND NOT EXISTS (SELECT 1 FROM casbuild_coordinators c \
             WHERE c.id = o.coordinator AND c.seen_at > now() - make_interval(secs => $1))",
            "DELETE FROM casbuild_coordinators WHERE seen_at < now() - make_interval(secs => $1)",
        ] {
            client.execute(statement, &[&keep]).await.map_err(failed)?;
        }
        Ok(())
    }

    /// Whether `coordinator` recorded a heartbeat within `within`.
    pub async fn coordinator_alive(&self, coordinator: &str, within: Duration) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM casbuild_coordinators WHERE id = $1 AND seen_at > now() - make_interval(secs => $2)",
                &[&coordinator, &within.as_secs_f64()],
            )
            .await
            .map_err(|e| self.unavailable("reading coordinators' heartbeats", e))?;
        Ok(row.is_some())
    }
}

/// A lease on an action: the one coordinator of the cluster that runs it,
/// and the operation its requesters follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The instance the action runs in (its name, not its directory).
    pub instance: String,
    /// The action.
    pub action: Digest,
    /// The operation that runs it.
    pub operation: String,
    /// The coordinator holding the lease.
    pub coordinator: String,
    /// ExecutionPolicy.priority of the request that created it.
    pub priority: i32,
}

/// What asking for a lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leased {
    /// The asker holds it now.
    Taken,
    /// Another operation holds it (maybe the asker's own, maybe another
    /// coordinator's, maybe a dead one's about to be adopted).
    Held(Lease),
}

impl Database {
    /// Takes the lease on `action` in `instance` for `operation` run by
    /// `coordinator`, unless some operation holds it already. Leases last
    /// as long as their coordinator's heartbeats; a dead coordinator's are
    /// adopted by the others ([`Database::adopt_leases`]).
    pub async fn lease(
        &self,
        instance: &str,
        action: &Digest,
        operation: &str,
        coordinator: &str,
        priority: i32,
    ) -> Result<Leased, StoreError> {
        let key = (instance_dir(instance), action.function.name(), &action.hash[..], size_column(action));
        // A released lease may vanish between the insert and the read: ask again.
        for _ in 0..3 {
            let inserted = self
                .execute(
                    "taking a lease on an action",
                    "INSERT INTO casbuild_leases \
                     (instance, function, hash, size, instance_name, operation, coordinator, priority) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                    &[&key.0, &key.1, &key.2, &key.3, &instance.as_bytes(), &operation, &coordinator, &priority],
                )
                .await?;
            if inserted == 1 {
                return Ok(Leased::Taken);
            }
            match self.lease_of(instance, action).await? {
                // An insert that committed although its answer was lost, and was tried again.
                Some(held) if held.operation == operation => return Ok(Leased::Taken),
                Some(held) => return Ok(Leased::Held(held)),
                None => {}
            }
        }
        Err(StoreError::Unavailable(format!("{}: the lease on {action} keeps changing hands", self.describe)))
    }

    /// The lease on `action` in `instance`, if an operation holds one.
    pub async fn lease_of(&self, instance: &str, action: &Digest) -> Result<Option<Lease>, StoreError> {
        let row = self
            .query_opt(
                "reading a lease",
                "SELECT operation, coordinator, priority FROM casbuild_leases \
                 WHERE instance = $1 AND function = $2 AND hash = $3 AND size = $4",
                &[&instance_dir(instance), &action.function.name(), &&action.hash[..], &size_column(action)],
            )
            .await?;
        Ok(row.map(|row| Lease {
            instance: instance.to_owned(),
            action: *action,
            operation: row.get(0),
            coordinator: row.get(1),
            priority: row.get(2),
        }))
    }

    /// Ends `operation`'s lease on `action` (once its result is published);
    /// a lease another operation holds stays.
    pub async fn release(&self, instance: &str, action: &Digest, operation: &str) -> Result<(), StoreError> {
        self.execute(
            "releasing a lease",
            "DELETE FROM casbuild_leases \
                 WHERE instance = $1 AND function = $2 AND hash = $3 AND size = $4 AND operation = $5",
            &[&instance_dir(instance), &action.function.name(), &&action.hash[..], &size_column(action), &operation],
        )
        .await?;
        Ok(())
    }

    /// Moves up to `limit` leases of coordinators silent for `dead_after`
    /// to `coordinator`, oldest (by priority, then age) first, and returns
    /// them. Rows another coordinator is adopting at the same moment are
    /// skipped (`FOR UPDATE SKIP LOCKED`), so each lease has one adopter.
    pub async fn adopt_leases(
        &self,
        coordinator: &str,
        dead_after: Duration,
        limit: i64,
    ) -> Result<Vec<Lease>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE casbuild_leases l SET coordinator = $1 FROM ( \
                     SELECT o.instance, o.function, o.hash, o.size FROM casbuild_leases o \
                     WHERE o.coordinator <> $1 AND NOT EXISTS (SELECT 1 FROM casbuild_coordinators c \
                         WHERE c.id = o.coordinator AND c.seen_at > now() - make_interval(secs => $2)) \
                     ORDER BY o.priority, o.created_at LIMIT $3 FOR UPDATE SKIP LOCKED) orphan \
                 WHERE (l.instance, l.function, l.hash, l.size) = (orphan.instance, orphan.function, orphan.hash, orphan.size) \
                 RETURNING l.instance_name, l.function, l.hash, l.size, l.operation, l.priority",
                &[&coordinator, &dead_after.as_secs_f64(), &limit],
            )
            .await
            .map_err(|e| self.unavailable("adopting the leases of stopped coordinators", e))?;
        Ok(rows.iter().filter_map(|row| lease_row(row, coordinator)).collect())
    }

    /// The operations of `coordinator`'s leases.
    pub async fn leases_of(&self, coordinator: &str) -> Result<Vec<Lease>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT instance_name, function, hash, size, operation, priority FROM casbuild_leases \
                 WHERE coordinator = $1",
                &[&coordinator],
            )
            .await
            .map_err(|e| self.unavailable("reading this coordinator's leases", e))?;
        Ok(rows.iter().filter_map(|row| lease_row(row, coordinator)).collect())
    }
}

/// `coordinator`'s lease in a row of (instance_name, function, hash, size,
/// operation, priority); `None` if its columns spell no digest.
fn lease_row(row: &tokio_postgres::Row, coordinator: &str) -> Option<Lease> {
    let function = DigestFunction::ALL.into_iter().find(|f| f.name() == row.get::<_, &str>(1))?;
    let hash: [u8; 32] = row.get::<_, &[u8]>(2).try_into().ok()?;
    let size_bytes = u64::try_from(row.get::<_, i64>(3)).ok()?;
    Some(Lease {
        instance: String::from_utf8_lossy(row.get::<_, &[u8]>(0)).into_owned(),
        action: Digest { function, hash, size_bytes },
        operation: row.get(4),
        coordinator: coordinator.to_owned(),
        priority: row.get(5),
    })
}

/// How long a request waits for the database to come back (a restart, a
/// failover) before it fails with UNAVAILABLE.
const RIDE_OUT: Duration = Duration::from_secs(15);

/// Why one attempt at a statement failed.
enum Failure {
    /// No connection could be had.
    Pool(deadpool_postgres::PoolError),
    /// The statement failed.
    Query(tokio_postgres::Error),
}

impl Failure {
    /// Whether trying again may succeed: the connection broke or could not
    /// be made, or the server is shutting down or starting up (SQLSTATE
    /// classes 08 and 57); not for errors in the statement or its data.
    fn transient(&self) -> bool {
        let query = match self {
            Failure::Pool(deadpool_postgres::PoolError::Timeout(_)) => return true,
            Failure::Pool(deadpool_postgres::PoolError::Backend(e)) => e,
            Failure::Pool(_) => return false,
            Failure::Query(e) => e,
        };
        match query.code() {
            _ if query.is_closed() => true,
            Some(code) => matches!(&code.code()[..2], "08" | "57"),
            None => true,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Pool(e) => write!(f, "{e}"),
            Failure::Query(e) => match e.as_db_error() {
                Some(db) => write!(f, "{}", db.message()),
                None => write!(f, "{e}"),
            },
        }
    }
}

/// Retries of one statement: backing off from 100 ms to 1 s while its
/// failures are transient, for at most [`RIDE_OUT`].
struct Patience {
    since: std::time::Instant,
    delay: Duration,
}

impl Patience {
    fn new() -> Self {
        Patience { since: std::time::Instant::now(), delay: Duration::from_millis(100) }
    }

    /// Waits before the next attempt, or gives up with `error` (naming
    /// what was done) completed by the failure.
    async fn wait(&mut self, failure: Failure, error: impl Fn() -> StoreError) -> Result<(), StoreError> {
        if !failure.transient() || self.since.elapsed() + self.delay > RIDE_OUT {
            return Err(match error() {
                StoreError::Unavailable(message) => StoreError::Unavailable(format!("{message}{failure}")),
                other => other,
            });
        }
        tracing::debug!("the database failed ({failure}); trying again in {:?}", self.delay);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
        Ok(())
    }
}

/// A digest's size as the column holds it (REAPI sizes are int64 already).
fn size_column(digest: &Digest) -> i64 {
    i64::try_from(digest.size_bytes).unwrap_or(i64::MAX)
}

/// `database HOST:PORT/NAME`, from a parsed configuration.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config.get_ports().get(i).or(config.get_ports().first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!("database {}/{}", hosts.join(","), config.get_dbname().unwrap_or(config.get_user().unwrap_or("")))
}
