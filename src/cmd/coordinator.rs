//! `casbuild coordinator`: the REAPI server on local storage.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use casbuild_cas::database::Database;
use casbuild_cas::storage::{Storage, StorageConfig};
use casbuild_cas::store::ObjectStoreConfig;
use casbuild_coordinator::auth::{AuthConfig, Authenticator};
use casbuild_coordinator::scheduler::Retention;
use casbuild_coordinator::status_page::{self, StatusPage};
use casbuild_coordinator::{ExecutionConfig, PoolConfig, Scheduler, ServerConfig, WorkerPool};
use serde::Deserialize;

use crate::config::{default_state_dir, load_toml, parse_duration, parse_size, secret, ConfigDuration, ConfigSize};

/// Flags of `casbuild coordinator`; each may also come from `--config`.
#[derive(clap::Args)]
pub struct Args {
    /// TOML file: any flag as a key (`max_disk = "20GiB"`), a [limits] table and an [auth] table (reloaded
    /// on SIGHUP) [default: $XDG_CONFIG_HOME/casbuild/coordinator.toml, else /etc/casbuild/coordinator.toml].
    /// Example: docs/config/coordinator.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve on (port 0 picks a free port, printed at start).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of the blob store and action cache [default: /var/lib/casbuild as root, else
    /// $XDG_DATA_HOME/casbuild].
    #[arg(long)]
    storage: Option<PathBuf>,
    /// Disk budget; least recently used blobs are evicted beyond it [default: 20GiB].
    #[arg(long, value_parser = parse_size)]
    max_disk: Option<u64>,
    /// Memory budget of the in-memory blob tier [default: 1GiB].
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Largest total size of one batch call, announced to clients [default: 4MiB].
    #[arg(long, value_parser = parse_size)]
    max_batch: Option<u64>,
    /// The secret workers must present (`casbuild worker --worker-token`); without it any worker may join.
    #[arg(long, env = "CASBUILD_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// A file whose first line is the worker token (keeps it out of `ps`).
    #[arg(long)]
    worker_token_file: Option<PathBuf>,
    /// Listen beyond loopback while callers without credentials may write the cache, execute or register
    /// as workers (no [auth] table, or no worker token): anyone who reaches the port may then do so.
    #[arg(long)]
    insecure: bool,
    /// PEM certificate chain of this server: serve gRPC over TLS (clients use grpcs://).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM bundle of the CAs whose client certificates are accepted (mTLS identities for [auth] certs).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Refuse TLS connections without a client certificate signed by --tls-client-ca.
    #[arg(long)]
    tls_require_client_cert: bool,
    /// How often workers heartbeat, like 3s or 500ms; three missed heartbeats lose a worker its leases.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    heartbeat: std::time::Duration,
    /// PostgreSQL database shared by a cluster's coordinators for the action cache and Remote Asset records
    /// (postgresql://USER[:PASSWORD]@HOST:PORT/DB, or "host=... user=... dbname=..."); without it they are
    /// kept under --storage.
    #[arg(long, env = "CASBUILD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A file whose first line is the --database-url (keeps its password out of `ps`).
    #[arg(long)]
    database_url_file: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics), liveness (/healthz) and readiness (/readyz) over HTTP on this
    /// address (no authentication: keep it on loopback or a management network).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// The tables of the `--config` file; its other keys are flags
/// (`crate::config_file`).
#[derive(Deserialize, Default)]
struct FileConfig {
    auth: Option<AuthConfig>,
    limits: Option<Limits>,
    object_store: Option<ObjectStoreSection>,
}

/// The `[object_store]` table: keep blobs in an S3-compatible bucket, with
/// the memory and disk tiers as a cache in front of it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectStoreSection {
    /// The bucket (it must exist).
    bucket: String,
    /// The S3 endpoint, like "https://s3.example.com" or "http://127.0.0.1:9000"; AWS when absent.
    endpoint: Option<String>,
    /// A key prefix for everything casbuild stores in the bucket.
    prefix: Option<String>,
    /// The bucket's region [default: us-east-1].
    region: Option<String>,
    /// A TOML file with access_key_id and secret_access_key; else the AWS_* environment variables.
    credentials_file: Option<PathBuf>,
    /// Requests to the bucket in flight at once [default: 64].
    max_requests: Option<usize>,
    /// How long one request may take, retries included [default: 30s].
    request_timeout: Option<ConfigDuration>,
}

impl ObjectStoreSection {
    fn config(self) -> anyhow::Result<ObjectStoreConfig> {
        anyhow::ensure!(!self.bucket.is_empty(), "[object_store] bucket is empty");
        if let Some(endpoint) = &self.endpoint {
            anyhow::ensure!(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "[object_store] endpoint {endpoint:?} is not an http:// or https:// URL"
            );
        }
        let mut config = ObjectStoreConfig::new(self.bucket);
        config.endpoint = self.endpoint;
        config.prefix = self.prefix.unwrap_or_default();
        if let Some(region) = self.region {
            config.region = region;
        }
        config.credentials_file = self.credentials_file;
        if let Some(n) = self.max_requests {
            anyhow::ensure!(n > 0, "[object_store] max_requests must be at least 1");
            config.max_requests = n;
        }
        if let Some(t) = self.request_timeout {
            config.request_timeout = t.get();
        }
        Ok(config)
    }
}

/// The `[limits]` table: bounds on what callers can make the server hold.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Limits {
    /// Distinct instance names the CAS holds.
    instances: Option<usize>,
    /// Finished operations kept for lookups by name.
    finished_operations: Option<usize>,
    /// Bytes of final state (results, inline logs) those may hold.
    finished_operations_bytes: Option<ConfigSize>,
    /// How long a finished operation is kept ("15m", or seconds).
    finished_operations_age: Option<ConfigDuration>,
}

/// Everything the coordinator needs, after flags, file and defaults are merged.
pub struct Settings {
    pub listen: SocketAddr,
    pub storage: StorageConfig,
    pub server: ServerConfig,
    pub pool: PoolConfig,
    /// The config file, re-read for its [auth] table on SIGHUP.
    pub config: Option<PathBuf>,
    /// The worker token, kept across reloads.
    pub worker_token: Option<String>,
    /// How long and how many finished operations are kept.
    pub retention: Retention,
    /// The shared database, if any.
    pub database_url: Option<String>,
}

impl Args {
    /// Merges flags over the config file over defaults.
    pub fn settings(self) -> anyhow::Result<Settings> {
        let file: FileConfig = match &self.config {
            Some(path) => load_toml(path)?,
            None => FileConfig::default(),
        };
        let dir = self.storage.unwrap_or_else(default_state_dir);
        let mut storage = StorageConfig::new(dir);
        if let Some(n) = self.max_disk {
            storage.max_disk = n;
        }
        if let Some(n) = self.max_memory {
            storage.max_memory = n;
        }
        if let Some(section) = file.object_store {
            storage.objects = Some(section.config()?);
        }
        let limits = file.limits.unwrap_or_default();
        if let Some(n) = limits.instances {
            anyhow::ensure!(n > 0, "[limits] instances must be at least 1");
            storage.max_instances = n;
        }
        let defaults = Retention::default();
        let retention = Retention {
            time: limits.finished_operations_age.map_or(defaults.time, ConfigDuration::get),
            count: limits.finished_operations.unwrap_or(defaults.count),
            bytes: limits.finished_operations_bytes.map_or(defaults.bytes, |n| n.bytes() as usize),
        };
        let mut server = ServerConfig::default();
        if let Some(n) = self.max_batch {
            server.max_batch_bytes = n;
        }
        let listen = self.listen.unwrap_or_else(|| "127.0.0.1:8980".parse().expect("valid address"));
        let pool = PoolConfig {
            heartbeat_interval: self.heartbeat.max(std::time::Duration::from_millis(10)),
            ..PoolConfig::default()
        };
        let worker_token = secret(self.worker_token, self.worker_token_file.as_deref())?;
        let database_url = secret(self.database_url, self.database_url_file.as_deref())?;
        let auth = Authenticator::new(file.auth.as_ref(), worker_token.as_deref()).map_err(|why| {
            anyhow::anyhow!("[auth] in {}: {why}", self.config.as_deref().unwrap_or(Path::new("")).display())
        })?;
        server.tls = server_tls(ServerTls {
            cert: self.tls_cert,
            key: self.tls_key,
            client_ca: self.tls_client_ca,
            require_client_cert: self.tls_require_client_cert,
        })?;
        if !listen.ip().is_loopback() && !self.insecure {
            if auth.anonymous_workers() {
                anyhow::bail!(
                    "listening on {listen} without a worker token would let anyone who reaches it register as a \
                     worker and receive (and answer) other people's actions; give --worker-token or \
                     --worker-token-file (or worker keys in [auth]), or --insecure to accept that"
                );
            }
            if auth.anonymous_may_write() {
                anyhow::bail!(
                    "listening on {listen} without an [auth] table in --config would let anyone who reaches it \
                     write the cache and run commands on the workers; configure API keys (docs/SECURITY.md), or \
                     give --insecure to accept that"
                );
            }
            if server.tls.is_none() && auth.counts() != (0, 0) {
                tracing::warn!("API keys on {listen} travel in plaintext without --tls-cert");
            }
        }
        server.auth = Arc::new(auth);
        Ok(Settings { listen, storage, server, pool, config: self.config, worker_token, retention, database_url })
    }
}

/// TLS settings from flags and file.
struct ServerTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    require_client_cert: bool,
}

/// The listener's TLS configuration, with every file read (and named in errors) now.
fn server_tls(tls: ServerTls) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let (cert, key) = match (tls.cert, tls.key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            anyhow::ensure!(
                tls.client_ca.is_none() && !tls.require_client_cert,
                "client certificates (tls_client_ca, tls_require_client_cert) need TLS: give tls_cert and tls_key"
            );
            return Ok(None);
        }
        _ => anyhow::bail!("TLS needs both a certificate and its key (tls_cert and tls_key)"),
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&cert)?, read(&key)?));
    match tls.client_ca {
        Some(ca) => {
            config =
                config.client_ca_root(Certificate::from_pem(read(&ca)?)).client_auth_optional(!tls.require_client_cert);
        }
        None => anyhow::ensure!(!tls.require_client_cert, "tls_require_client_cert needs tls_client_ca"),
    }
    Ok(Some(config))
}

/// Re-reads the [auth] table of the config file on every SIGHUP; a broken
/// file is reported and the table in use stays.
fn reload_on_hangup(settings: &Settings) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let (config, token, auth) = (settings.config.clone(), settings.worker_token.clone(), settings.server.auth.clone());
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let Some(path) = &config else {
                tracing::warn!("SIGHUP, but no --config file to reload");
                continue;
            };
            let reloaded = load_toml::<FileConfig>(path)
                .and_then(|file| auth.replace(file.auth.as_ref(), token.as_deref()).map_err(anyhow::Error::msg));
            match reloaded {
                Ok(()) => {
                    let (keys, certs) = auth.counts();
                    tracing::info!("reloaded [auth] from {}: {keys} keys, {certs} certificates", path.display());
                }
                Err(e) => tracing::error!("kept the old [auth]: {e:#}"),
            }
        }
    });
    Ok(())
}

/// Runs until SIGINT or SIGTERM, then lets calls in flight finish.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let metrics_listen = args.metrics_listen;
    if metrics_listen.is_some() {
        // Before the storage opens: it reports what it holds as it does.
        crate::cmd::ops::install_recorder()?;
    }
    let settings = args.settings()?;
    let _claims = crate::claims::claim("coordinator", &[("storage", &settings.storage.dir)])?;
    let database = match &settings.database_url {
        Some(url) => {
            let database = Database::connect(url).await.context("opening the shared database")?;
            println!("action cache and Remote Asset records in {}", database.describe());
            Some(database)
        }
        None => None,
    };
    let storage_config = settings.storage.clone();
    let storage = tokio::task::spawn_blocking(move || Storage::open_shared(&storage_config, database))
        .await?
        .with_context(|| format!("opening storage in {}", settings.storage.dir.display()))?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal()?;
    reload_on_hangup(&settings)?;
    let scheme = if settings.server.tls.is_some() { "grpcs" } else { "grpc" };
    println!("casbuild coordinator listening on {scheme}://{addr}");
    if let Some(config) = &settings.config {
        println!("settings from {}", config.display());
    }
    println!(
        "storage: {} ({} of {} on disk)",
        settings.storage.dir.display(),
        bytesize::ByteSize(storage.disk().bytes_used()),
        bytesize::ByteSize(settings.storage.max_disk)
    );
    // On a signal, stop accepting calls and let those in flight finish, but
    // do not wait longer than the grace period for clients that keep
    // connections open.
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let storage = Arc::new(storage);
    let workers = WorkerPool::new(settings.pool);
    // Capacity is the workers' to decide; the scheduler only queues.
    let scheduler = Scheduler::new(storage.clone(), workers.clone(), 1 << 20);
    scheduler.set_retention(settings.retention);
    let page = StatusPage {
        storage: storage.clone(),
        scheduler: scheduler.clone(),
        workers: Some(workers.clone()),
        role: "coordinator",
    };
    let ready = crate::cmd::ops::storage_ready(storage.clone());
    crate::cmd::ops::serve_if(metrics_listen, ready, Some(status_page::router(page))).await?;
    let execution = ExecutionConfig { scheduler, workers: Some(workers) };
    let server =
        casbuild_coordinator::serve_with_execution(listener, storage, settings.server, Some(execution), async move {
            shutdown.await;
            signalled.notify_one();
        });
    tokio::select! {
        result = server => result.context("serving")?,
        () = async { stopping.notified().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("calls still open after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
    }
    tracing::info!("casbuild coordinator stopped");
    Ok(())
}

/// How long calls in flight may take to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Installs SIGINT and SIGTERM handlers now and returns a future that
/// resolves on the first of them. Call it before announcing readiness: a
/// handler installed on first poll leaves a window in which a signal sent by
/// whoever saw the announcement still kills the process outright.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
