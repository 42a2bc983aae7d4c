//! The worker's local blob cache: blobs fetched from the remote CAS once, kept
//! in a size-bounded [`DiskStore`], and opened from there.
//!
//! Concurrent requests for a blob that is not yet local share one fetch
//! (single-flight). A fetch is spawned on the runtime, so it completes and
//! fills the cache even if the request that started it gives up. Fetches that
//! stall (no bytes for the idle timeout) fail instead of hanging.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;

use casbuild_cas::digest::Digest;
use casbuild_cas::store::{BlobStore, BlobStream, DiskStore, MemoryStore, PinGuard, RemoteStore, StoreError};

/// Blobs up to this size are fetched whole with BatchReadBlobs, served from
/// memory and written to the disk cache behind the reader's back; larger
/// ones are streamed through ByteStream straight into their cache file.
const SMALL_BLOB: u64 = 64 << 10;

/// Blobs kept in memory (Directory protos) up to this size are fetched with
/// one BatchReadBlobs; larger ones, which a server's batch limit (4 MiB is
/// usual) would refuse, through ByteStream.
const MAX_BATCH_READ: u64 = 1 << 20;

/// Largest blob kept whole in memory (a Directory proto, ~800,000 entries):
/// its size is the parent's claim, so it is bounded before anything is
/// allocated or streamed.
const MAX_IN_MEMORY: u64 = 64 << 20;

/// Default memory budget for small blobs.
const MEMORY_BUDGET: u64 = 256 << 20;

/// Why a blob could not be made local; cheap to clone for shared waiters.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// The remote CAS does not have the blob.
    #[error("blob {0} is not in the remote CAS")]
    NotFound(String),
    /// The remote could not be reached, stalled, or sent bad bytes.
    #[error("{0}")]
    Failed(String),
}

/// An open local copy of a blob: a cache file (pinned while this lives) or,
/// for small blobs, the bytes in memory. Neither for the empty blob.
pub struct CachedBlob {
    /// The blob's cache file.
    pub file: Option<File>,
    /// The blob's bytes, for small blobs served from memory.
    pub data: Option<Bytes>,
    _pin: Option<PinGuard>,
}

impl CachedBlob {
    fn file(file: File, pin: PinGuard) -> Self {
        CachedBlob { file: Some(file), data: None, _pin: Some(pin) }
    }

    fn bytes(data: Bytes) -> Self {
        CachedBlob { file: None, data: Some(data), _pin: None }
    }
}

/// A fetch in progress: into the local cache (`None`) or, for Directory
/// protos, into memory (`Some`).
type Flight = Shared<BoxFuture<'static, Result<Option<Bytes>, FetchError>>>;

/// Where a flight puts what it fetches.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Dest {
    /// Streamed into the disk cache.
    Cache,
    /// Kept in memory only (Directory protos, which the mount decodes).
    Memory,
    /// Into the memory tier, and written to the disk cache in the background.
    Small,
}

/// Local copies of remote blobs.
pub struct BlobCache {
    local: DiskStore,
    memory: MemoryStore,
    remote: RemoteStore,
    flights: Mutex<HashMap<(Digest, Dest), Flight>>,
    remote_reads: AtomicU64,
    idle_timeout: Duration,
}

impl BlobCache {
    /// A cache of `remote` blobs in `local`; a fetch fails after `idle_timeout`
    /// without progress.
    pub fn new(local: DiskStore, remote: RemoteStore, idle_timeout: Duration) -> Self {
        BlobCache {
            local,
            memory: MemoryStore::new(MEMORY_BUDGET),
            remote,
            flights: Mutex::new(HashMap::new()),
            remote_reads: AtomicU64::new(0),
            idle_timeout,
        }
    }

    /// A cache of the same remote's `instance`, sharing this cache's disk
    /// and memory budgets (blobs are kept per instance).
    pub fn for_instance(&self, instance: &str) -> BlobCache {
        BlobCache {
            local: self.local.namespace(instance),
            memory: self.memory.namespace(instance),
            remote: self.remote.with_instance(instance),
            flights: Mutex::new(HashMap::new()),
            remote_reads: AtomicU64::new(0),
            idle_timeout: self.idle_timeout,
        }
    }

    /// The REAPI instance this cache fetches from.
    pub fn instance(&self) -> &str {
        self.remote.instance()
    }

    /// How many blob reads went to the remote CAS (each fetch counts once,
    /// however many callers waited for it).
    pub fn remote_reads(&self) -> u64 {
        self.remote_reads.load(Ordering::Relaxed)
    }

    /// The local store, for sizes and inspection.
    pub fn local(&self) -> &DiskStore {
        &self.local
    }

    /// Whether the blob is local or the remote holds it (for lookups by name).
    pub async fn has(&self, digest: &Digest) -> Result<bool, FetchError> {
        match self.local.find_missing(&[*digest]).await {
            Ok(missing) if missing.is_empty() => Ok(true),
            _ => self.remote_has(digest).await,
        }
    }

    /// Whether the remote holds `digest`.
    pub async fn remote_has(&self, digest: &Digest) -> Result<bool, FetchError> {
        if digest.is_empty_blob() {
            return Ok(true);
        }
        let result = tokio::time::timeout(self.idle_timeout, self.remote.find_missing(&[*digest])).await;
        match result {
            Ok(Ok(missing)) => Ok(missing.is_empty()),
            Ok(Err(e)) => Err(FetchError::Failed(e.to_string())),
            Err(_) => Err(FetchError::Failed(format!("asking the remote CAS for {digest} timed out"))),
        }
    }

    /// Opens the local copy of `digest`, fetching it first if needed. The blob
    /// stays pinned in the local cache (never evicted) while the result lives.
    pub async fn open(self: &Arc<Self>, digest: &Digest) -> Result<CachedBlob, FetchError> {
        if digest.is_empty_blob() {
            return Ok(CachedBlob { file: None, data: None, _pin: None });
        }
        let small = digest.size_bytes <= SMALL_BLOB;
        if small {
            if let Ok(data) = self.memory.read_all(digest).await {
                return Ok(CachedBlob::bytes(data));
            }
        }
        // Pin first, so that a fetched blob cannot be evicted before we open it.
        let pin = self.local.pin(digest);
        if let Some(file) = self.open_local(digest)? {
            return Ok(CachedBlob::file(file, pin));
        }
        if small {
            return match self.fetch(digest, Dest::Small).await? {
                Some(data) => Ok(CachedBlob::bytes(data)),
                None => Err(FetchError::Failed(format!("blob {digest} was not delivered"))),
            };
        }
        self.fetch(digest, Dest::Cache).await?;
        match self.open_local(digest)? {
            Some(file) => Ok(CachedBlob::file(file, pin)),
            None => Err(FetchError::Failed(format!("blob {digest} vanished from the local cache after its fetch"))),
        }
    }

    /// The bytes of a Directory proto, fetched into memory (verified, and
    /// shared by concurrent callers). Directories are not written to the disk
    /// cache: the mount keeps them decoded, and a file per directory would
    /// cost more than the round trip.
    pub async fn read_directory(self: &Arc<Self>, digest: &Digest) -> Result<Bytes, FetchError> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        match self.fetch(digest, Dest::Memory).await? {
            Some(bytes) => Ok(bytes),
            None => Err(FetchError::Failed(format!("directory {digest} was not delivered"))),
        }
    }

    fn open_local(&self, digest: &Digest) -> Result<Option<File>, FetchError> {
        self.local.open_trusted(digest).map_err(|e| FetchError::Failed(e.to_string()))
    }

    /// Fetches `digest`, joining a fetch in progress.
    async fn fetch(self: &Arc<Self>, digest: &Digest, into: Dest) -> Result<Option<Bytes>, FetchError> {
        let key = (*digest, into);
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights
                .entry(key)
                .or_insert_with(|| {
                    let cache = self.clone();
                    let task = tokio::spawn(async move {
                        let result = match into {
                            Dest::Cache => cache.download(&key.0).await.map(|()| None),
                            Dest::Memory => cache.download_to_memory(&key.0).await.map(Some),
                            Dest::Small => cache.download_small(&key.0).await.map(Some),
                        };
                        cache.flights.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                        result
                    });
                    async move { task.await.unwrap_or_else(|e| Err(FetchError::Failed(format!("fetch task: {e}")))) }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        flight.await
    }

    async fn download_to_memory(&self, digest: &Digest) -> Result<Bytes, FetchError> {
        self.remote_reads.fetch_add(1, Ordering::Relaxed);
        if digest.size_bytes > MAX_IN_MEMORY {
            return Err(FetchError::Failed(format!(
                "blob {digest} is over the {MAX_IN_MEMORY}-byte limit of a directory read into memory"
            )));
        }
        if digest.size_bytes <= MAX_BATCH_READ {
            return self.fetch_small(digest).await;
        }
        // Too large for one BatchReadBlobs (a Directory of tens of thousands
        // of entries): streamed through ByteStream, verified as it arrives.
        let mut stream = self.open_stream(digest).await?;
        let mut data = bytes::BytesMut::with_capacity(digest.size_bytes as usize);
        while let Some(chunk) = self.next_chunk(&mut stream, digest).await? {
            data.extend_from_slice(&chunk);
        }
        Ok(data.freeze())
    }

    /// A small blob into memory, then (not awaited) into the disk cache.
    async fn download_small(self: &Arc<Self>, digest: &Digest) -> Result<Bytes, FetchError> {
        let data = self.download_to_memory(digest).await?;
        if let Err(e) = self.memory.write(digest, data.clone()).await {
            tracing::warn!("caching {digest} in memory: {e}");
        }
        let (local, digest, copy) = (self.local.clone(), *digest, data.clone());
        tokio::spawn(async move {
            if let Err(e) = local.write(&digest, copy).await {
                tracing::warn!("writing {digest} to the disk cache: {e}");
            }
        });
        Ok(data)
    }

    /// One blob with one unary BatchReadBlobs call, verified by the store.
    async fn fetch_small(&self, digest: &Digest) -> Result<Bytes, FetchError> {
        let failed = |e: StoreError| fetch_error(digest, e);
        match tokio::time::timeout(self.idle_timeout, self.remote.read_batch(&[*digest])).await {
            Err(_) => Err(FetchError::Failed(format!("fetching {digest}: no answer for {:?}", self.idle_timeout))),
            Ok(Err(e)) => Err(failed(e)),
            Ok(Ok(mut found)) => match found.pop() {
                Some((_, result)) => result.map_err(failed),
                None => Err(FetchError::NotFound(digest.to_string())),
            },
        }
    }

    async fn download(&self, digest: &Digest) -> Result<(), FetchError> {
        self.remote_reads.fetch_add(1, Ordering::Relaxed);
        let mut stream = self.open_stream(digest).await?;
        let mut writer = self.local.begin_write(digest).await.map_err(|e| fetch_error(digest, e))?;
        while let Some(chunk) = self.next_chunk(&mut stream, digest).await? {
            writer.write(chunk).await.map_err(|e| fetch_error(digest, e))?;
        }
        writer.commit().await.map_err(|e| fetch_error(digest, e))
    }

    /// A ByteStream read of the whole blob, verified as it arrives.
    async fn open_stream(&self, digest: &Digest) -> Result<BlobStream, FetchError> {
        match tokio::time::timeout(self.idle_timeout, self.remote.read(digest, 0, None)).await {
            Err(_) => Err(self.stalled(digest)),
            Ok(result) => result.map_err(|e| fetch_error(digest, e)),
        }
    }

    /// The next chunk of `stream`; a stall past the idle timeout fails.
    async fn next_chunk(&self, stream: &mut BlobStream, digest: &Digest) -> Result<Option<Bytes>, FetchError> {
        match tokio::time::timeout(self.idle_timeout, stream.next()).await {
            Err(_) => Err(self.stalled(digest)),
            Ok(None) => Ok(None),
            Ok(Some(chunk)) => chunk.map(Some).map_err(|e| fetch_error(digest, e)),
        }
    }

    fn stalled(&self, digest: &Digest) -> FetchError {
        FetchError::Failed(format!("fetching {digest}: no data for {:?}", self.idle_timeout))
    }
}

/// A store error while fetching `digest`, as the mount reports it.
fn fetch_error(digest: &Digest, e: StoreError) -> FetchError {
    match e {
        StoreError::NotFound { .. } => FetchError::NotFound(digest.to_string()),
        other => FetchError::Failed(format!("fetching {digest}: {other}")),
    }
}
