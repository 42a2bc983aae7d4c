//! `casbuild daemon`: the per-host, per-user companion of `casbuild cc`
//! (yadcc's delegate daemon). It keeps the channel to the cluster, an
//! in-memory L1 of recent results, the cluster's existence filter (so a
//! certain miss skips the cache lookup), a limit on local fallback compiles,
//! and the statistics `casbuild cc --show-stats` prints. The wrapper starts
//! it on demand; it exits after a while without requests.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{BlobStore, ConnectOptions, RemoteStore, RemoteStoreOptions};
use casbuild_coordinator::existence::Bloom;
use casbuild_proto::cc::existence_filter_client::ExistenceFilterClient;
use casbuild_proto::cc::get_filter_response::Filter;
use casbuild_proto::cc::{
    daemon_reply, daemon_request, Compile, Compiled, DaemonReply, DaemonRequest, GetFilterRequest, NeededBlobs, Stats,
};
use casbuild_proto::operation::execute_response;
use casbuild_proto::reapi::action_cache_client::ActionCacheClient;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{ActionResult, ExecuteRequest, ExecuteResponse, GetActionResultRequest};
use lru::LruCache;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::reason::{label, Local, LocalKind};
use crate::socket::{receive, send, socket_path};

/// Results kept in the L1.
const L1_ENTRIES: usize = 1024;
/// Largest output kept in the L1.
const L1_MAX_OUTPUT: usize = 4 << 20;
/// Bytes the L1 holds at most (outputs and logs).
const L1_MAX_BYTES: usize = 256 << 20;
/// How long an unreachable cluster is not tried again.
const RETRY_CONNECT: Duration = Duration::from_secs(10);
/// How often the existence filter is refreshed.
const FILTER_REFRESH: Duration = Duration::from_secs(2);

/// How a daemon serves.
pub struct DaemonConfig {
    /// The cluster, as grpc://HOST:PORT (grpcs:// for TLS).
    pub remote: String,
    pub instance: String,
    /// The unix socket to serve [default: the one `casbuild cc` uses for this remote].
    pub socket: Option<PathBuf>,
    /// Local fallback compiles allowed at once [default: the number of CPUs].
    pub local_jobs: Option<usize>,
    /// Exit after this long without requests.
    pub idle: Duration,
    /// TLS material and credential for the cluster.
    pub connect: ConnectOptions,
}

/// The existence filter as last fetched.
struct Known {
    epoch: u64,
    generation: u64,
    bloom: Bloom,
}

struct Daemon {
    remote: String,
    connect: ConnectOptions,
    instance: String,
    store: tokio::sync::Mutex<Option<RemoteStore>>,
    /// Until when not to retry connecting after a failure.
    down_until: Mutex<Option<Instant>>,
    l1: Mutex<L1>,
    filter: Mutex<Option<Known>>,
    stats: Mutex<Stats>,
    local: Arc<Semaphore>,
    last_request: Mutex<Instant>,
    stop: tokio::sync::Notify,
    started: Instant,
}

/// Locks a mutex, recovering from a panicked holder.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub async fn run(args: DaemonConfig) -> anyhow::Result<()> {
    let socket = args.socket.clone().unwrap_or_else(|| socket_path(&args.remote, &args.instance));
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // One daemon per socket: the lock is held for the daemon's life.
    let lock_path = socket.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err(_) => {
            eprintln!("casbuild daemon: another daemon serves {}", socket.display());
            return Ok(());
        }
    };
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let local_jobs = args.local_jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let connect = args.connect.clone();
    let daemon = Arc::new(Daemon {
        remote: args.remote.clone(),
        connect,
        instance: args.instance.clone(),
        store: tokio::sync::Mutex::new(None),
        down_until: Mutex::new(None),
        l1: Mutex::new(L1 { entries: LruCache::new(NonZeroUsize::new(L1_ENTRIES).expect("non-zero")), bytes: 0 }),
        filter: Mutex::new(None),
        stats: Mutex::new(Stats { remote: args.remote.clone(), ..Default::default() }),
        local: Arc::new(Semaphore::new(local_jobs.max(1))),
        last_request: Mutex::new(Instant::now()),
        stop: tokio::sync::Notify::new(),
        started: Instant::now(),
    });
    eprintln!("casbuild daemon for {} on {} ({local_jobs} local jobs)", args.remote, socket.display());
    // The filter first (briefly), so the first compiles already use it.
    match tokio::time::timeout(Duration::from_secs(2), daemon.refresh_filter()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("casbuild daemon: no existence filter yet: {e:#}"),
        Err(_) => eprintln!("casbuild daemon: no existence filter yet: {} is slow", args.remote),
    }
    let refresher = daemon.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(FILTER_REFRESH).await;
            if let Err(e) = refresher.refresh_filter().await {
                tracing::debug!("existence filter: {e:#}");
            }
        }
    });
    let idle = args.idle.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.context("accepting")?;
                let daemon = daemon.clone();
                tokio::spawn(async move { daemon.serve(stream).await });
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let quiet = lock(&daemon.last_request).elapsed();
                if quiet > idle && daemon.local.available_permits() == local_jobs.max(1) {
                    eprintln!("casbuild daemon: idle for {} s, exiting", quiet.as_secs());
                    break;
                }
            }
            _ = daemon.stop.notified() => {
                eprintln!("casbuild daemon: asked to stop");
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

impl Daemon {
    async fn serve(self: Arc<Self>, mut stream: UnixStream) {
        loop {
            let request = match receive::<DaemonRequest>(&mut stream).await {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!("a wrapper connection: {e}");
                    return;
                }
            };
            *lock(&self.last_request) = Instant::now();
            let Some(request) = request.request else { return };
            let answer = match request {
                daemon_request::Request::Compile(compile) => self.compile(compile).await,
                daemon_request::Request::LocalSlot(slot) => {
                    let kind = slot.reason.as_ref().map_or(LocalKind::Unspecified, |r| Local::from_proto(r).kind);
                    *lock(&self.stats).local_fallbacks.entry(label(kind).to_owned()).or_default() += 1;
                    metrics::counter!("casbuild_cc_local_fallbacks_total", "reason" => label(kind)).increment(1);
                    let Ok(_permit) = self.local.clone().acquire_owned().await else { return };
                    if send(&mut stream, &reply(daemon_reply::Reply::Granted(true))).await.is_err() {
                        return;
                    }
                    // Held until the wrapper's compile ends and it hangs up.
                    let _ = receive::<DaemonRequest>(&mut stream).await;
                    return;
                }
                daemon_request::Request::Stats(get) => {
                    let mut stats = lock(&self.stats);
                    let mut snapshot = stats.clone();
                    snapshot.uptime_secs = self.started.elapsed().as_secs();
                    snapshot.has_filter = lock(&self.filter).is_some();
                    if get.zero {
                        *stats = Stats { remote: self.remote.clone(), ..Default::default() };
                    }
                    daemon_reply::Reply::Stats(snapshot)
                }
                daemon_request::Request::Note(note) => {
                    let kind = note.reason.as_ref().map_or(LocalKind::Unspecified, |r| Local::from_proto(r).kind);
                    *lock(&self.stats).not_sent.entry(label(kind).to_owned()).or_default() += 1;
                    metrics::counter!("casbuild_cc_not_sent_total", "reason" => label(kind)).increment(1);
                    daemon_reply::Reply::Ok(true)
                }
                daemon_request::Request::Shutdown(_) => {
                    // Answer first: stopping ends the process.
                    let _ = send(&mut stream, &reply(daemon_reply::Reply::Ok(true))).await;
                    self.stop.notify_one();
                    return;
                }
            };
            if send(&mut stream, &reply(answer)).await.is_err() {
                return;
            }
        }
    }

    /// The channel to the cluster, connecting when there is none.
    async fn store(&self) -> anyhow::Result<RemoteStore> {
        let mut store = self.store.lock().await;
        if let Some(store) = store.as_ref() {
            return Ok(store.clone());
        }
        // After a failed attempt, fail fast for a while: a build against a
        // dead cluster must not wait for a connect timeout on every compile.
        if let Some(until) = *lock(&self.down_until) {
            if Instant::now() < until {
                anyhow::bail!("{} was unreachable moments ago", self.remote);
            }
        }
        let options = RemoteStoreOptions {
            instance: self.instance.clone(),
            timeout: Duration::from_secs(120),
            connect: self.connect.clone(),
            ..Default::default()
        };
        let connected = tokio::time::timeout(Duration::from_secs(5), RemoteStore::connect(&self.remote, options))
            .await
            .map_err(|_| anyhow::anyhow!("{} did not answer within 5 s", self.remote))
            .and_then(|r| r.map_err(anyhow::Error::from));
        match connected {
            Ok(connected) => {
                *store = Some(connected.clone());
                *lock(&self.down_until) = None;
                Ok(connected)
            }
            Err(e) => {
                *lock(&self.down_until) = Some(Instant::now() + RETRY_CONNECT);
                Err(e)
            }
        }
    }

    async fn refresh_filter(&self) -> anyhow::Result<()> {
        let store = self.store().await?;
        let (epoch, generation) = lock(&self.filter).as_ref().map_or((0, 0), |k| (k.epoch, k.generation));
        let mut client = ExistenceFilterClient::new(store.channel()).max_decoding_message_size(64 << 20);
        let request = GetFilterRequest { instance_name: self.instance.clone(), epoch, generation };
        let response = client.get_filter(request).await?.into_inner();
        let mut known = lock(&self.filter);
        match response.filter {
            Some(Filter::Full(bloom)) => {
                let bloom = Bloom::from_wire(bloom).context("a malformed filter")?;
                *known = Some(Known { epoch: response.epoch, generation: response.generation, bloom });
            }
            Some(Filter::Added(added)) => {
                if let Some(known) = known.as_mut().filter(|k| k.epoch == response.epoch) {
                    for key in &added.keys {
                        known.bloom.insert(key);
                    }
                    known.generation = response.generation;
                }
            }
            None => {}
        }
        Ok(())
    }

    async fn compile(&self, compile: Compile) -> daemon_reply::Reply {
        if !compile.resent {
            lock(&self.stats).compile_requests += 1;
            count("casbuild_cc_compile_requests_total", 1);
            if let Some(hit) = lock(&self.l1).entries.get(&compile.action_hash).cloned() {
                lock(&self.stats).l1_hits += 1;
                count("casbuild_cc_l1_hits_total", 1);
                return daemon_reply::Reply::Compiled(Compiled { source: "l1".into(), ..hit });
            }
        }
        match self.compile_remotely(&compile).await {
            Ok(Remote::NeedBlobs(hashes)) => daemon_reply::Reply::NeedBlobs(NeededBlobs { hashes }),
            Ok(Remote::Compiled(compiled)) => {
                if compiled.exit_code == 0 && compiled.output.len() <= L1_MAX_OUTPUT {
                    lock(&self.l1).put(compile.action_hash.clone(), compiled.clone());
                }
                daemon_reply::Reply::Compiled(compiled)
            }
            Err(why) => daemon_reply::Reply::Fallback(why.to_proto()),
        }
    }

    /// The compile on the cluster; why not, as the wrapper reports it.
    async fn compile_remotely(&self, compile: &Compile) -> Result<Remote, Local> {
        let unreachable =
            |e: anyhow::Error| Local::new(LocalKind::ClusterUnreachable, format!("cluster unreachable: {e:#}"));
        let store = self.store().await.map_err(unreachable)?;
        self.compile_on(&store, compile)
            .await
            .map_err(|e| Local::new(LocalKind::Infrastructure, format!("infrastructure failure: {e:#}")))
    }

    async fn compile_on(&self, store: &RemoteStore, compile: &Compile) -> anyhow::Result<Remote> {
        let function = DigestFunction::Blake3;
        let action = Digest::from_hex(function, &compile.action_hash, compile.action_size).context("bad request")?;
        let certainly_new = lock(&self.filter).as_ref().is_some_and(|k| !k.bloom.may_contain(&action.hash));
        if compile.resent {
            // Looked up already, on the first send.
        } else if certainly_new {
            lock(&self.stats).filter_skipped_lookups += 1;
            count("casbuild_cc_filter_skipped_lookups_total", 1);
        } else if let Some(result) = self.lookup(store, &action).await? {
            if let Ok(compiled) = self.fetch(store, &result, compile, "remote cache").await {
                lock(&self.stats).remote_hits += 1;
                count("casbuild_cc_remote_hits_total", 1);
                return Ok(Remote::Compiled(compiled));
            }
        }
        let absent = self.upload(store, compile).await.context("uploading")?;
        if !absent.is_empty() {
            return Ok(Remote::NeedBlobs(absent));
        }
        let response = self.execute(store, &action).await?;
        let status = response.status.unwrap_or_default();
        if status.code != 0 {
            anyhow::bail!("the cluster could not run it: {}", status.message);
        }
        let result = response.result.context("no result")?;
        let source = if response.cached_result { "remote cache" } else { "executed" };
        let mut compiled = self.fetch(store, &result, compile, source).await?;
        compiled.message = response.message;
        let mut stats = lock(&self.stats);
        if response.cached_result {
            stats.remote_hits += 1;
            count("casbuild_cc_remote_hits_total", 1);
        } else {
            stats.executed_remotely += 1;
            stats.remote_compile_errors += u64::from(result.exit_code != 0);
            count("casbuild_cc_executed_remotely_total", 1);
            count("casbuild_cc_remote_compile_errors_total", u64::from(result.exit_code != 0));
        }
        Ok(Remote::Compiled(compiled))
    }

    async fn lookup(&self, store: &RemoteStore, action: &Digest) -> anyhow::Result<Option<ActionResult>> {
        let request = GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            digest_function: action.function.to_proto() as i32,
            ..Default::default()
        };
        match ActionCacheClient::new(store.channel()).get_action_result(request).await {
            Ok(result) => Ok(Some(result.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => anyhow::bail!("cache lookup: {}", status.message()),
        }
    }

    /// Uploads the blobs the cluster lacks; returns the hashes of those it
    /// lacks but the request carried no contents for (nothing is uploaded then).
    async fn upload(&self, store: &RemoteStore, compile: &Compile) -> anyhow::Result<Vec<String>> {
        let blobs: Vec<(Digest, &[u8])> = compile
            .blobs
            .iter()
            .map(|b| Ok((Digest::from_hex(DigestFunction::Blake3, &b.hash, b.size_bytes)?, b.data.as_slice())))
            .collect::<anyhow::Result<_>>()?;
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let missing: HashSet<Digest> = store.find_missing(&digests).await?.into_iter().collect();
        let needed: Vec<(Digest, &[u8])> = blobs.into_iter().filter(|(d, _)| missing.contains(d)).collect();
        let absent: Vec<String> =
            needed.iter().filter(|(d, data)| data.len() as u64 != d.size_bytes).map(|(d, _)| d.hash_hex()).collect();
        if !absent.is_empty() {
            return Ok(absent);
        }
        let bytes: u64 = needed.iter().map(|(d, _)| d.size_bytes).sum();
        store.write_batch(needed.into_iter().map(|(d, data)| (d, Bytes::copy_from_slice(data))).collect()).await?;
        lock(&self.stats).bytes_uploaded += bytes;
        count("casbuild_cc_uploaded_bytes_total", bytes);
        Ok(Vec::new())
    }

    async fn execute(&self, store: &RemoteStore, action: &Digest) -> anyhow::Result<ExecuteResponse> {
        let request = ExecuteRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            digest_function: action.function.to_proto() as i32,
            ..Default::default()
        };
        let mut stream = ExecutionClient::new(store.channel()).execute(request).await?.into_inner();
        while let Some(operation) = stream.message().await? {
            if !operation.done {
                continue;
            }
            return execute_response(&operation).map_err(anyhow::Error::msg);
        }
        anyhow::bail!("the Execute stream ended early")
    }

    /// The logs and (for a success) the output file of `result`.
    async fn fetch(
        &self,
        store: &RemoteStore,
        result: &ActionResult,
        compile: &Compile,
        source: &str,
    ) -> anyhow::Result<Compiled> {
        let function = DigestFunction::Blake3;
        let read = |d: &Option<casbuild_proto::reapi::Digest>| {
            let digest = d.as_ref().and_then(|d| Digest::from_proto(function, d).ok());
            async move {
                match digest {
                    Some(digest) if !digest.is_empty_blob() => {
                        Ok::<_, anyhow::Error>(store.read_all(&digest).await?.to_vec())
                    }
                    _ => Ok(Vec::new()),
                }
            }
        };
        let stdout = read(&result.stdout_digest).await?;
        let stderr = read(&result.stderr_digest).await?;
        let mut output = Vec::new();
        if result.exit_code == 0 {
            let file = result
                .output_files
                .iter()
                .find(|f| f.path == compile.output_path)
                .context("the compile succeeded but produced no output file")?;
            output = read(&file.digest).await?;
        }
        Ok(Compiled {
            exit_code: result.exit_code,
            stdout,
            stderr,
            output,
            message: String::new(),
            source: source.to_owned(),
        })
    }
}

/// Recent results, bounded by count and by bytes.
struct L1 {
    entries: LruCache<String, Compiled>,
    bytes: usize,
}

fn size(compiled: &Compiled) -> usize {
    compiled.output.len() + compiled.stdout.len() + compiled.stderr.len()
}

impl L1 {
    fn put(&mut self, key: String, compiled: Compiled) {
        self.bytes += size(&compiled);
        if let Some((_, old)) = self.entries.push(key, compiled) {
            self.bytes -= size(&old);
        }
        while self.bytes > L1_MAX_BYTES {
            match self.entries.pop_lru() {
                Some((_, old)) => self.bytes -= size(&old),
                None => break,
            }
        }
    }
}

/// What the cluster made of a compile.
enum Remote {
    Compiled(Compiled),
    /// It lacks blobs the request carried no contents for.
    NeedBlobs(Vec<String>),
}

fn reply(reply: daemon_reply::Reply) -> DaemonReply {
    DaemonReply { reply: Some(reply) }
}

/// One of the events `casbuild cc --show-stats` counts, also as a metric
/// (`--metrics-listen`); the metrics are not zeroed by `--zero-stats`.
fn count(name: &'static str, n: u64) {
    metrics::counter!(name).increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_l1_stays_within_its_byte_budget_dropping_the_oldest() {
        let mut l1 = L1 { entries: LruCache::new(NonZeroUsize::new(L1_ENTRIES).unwrap()), bytes: 0 };
        let object = |n: u8| Compiled { output: vec![n; 4 << 20], ..Default::default() };
        for n in 0..100u8 {
            l1.put(format!("action-{n}"), object(n));
        }
        assert!(l1.bytes <= L1_MAX_BYTES, "{} bytes held", l1.bytes);
        assert_eq!(l1.entries.len(), L1_MAX_BYTES / (4 << 20));
        assert!(l1.entries.get("action-99").is_some() && l1.entries.get("action-0").is_none());
        l1.put("action-99".into(), Compiled::default());
        assert_eq!(l1.bytes, (L1_MAX_BYTES / (4 << 20) - 1) * (4 << 20), "a replaced entry's bytes are released");
    }
}
