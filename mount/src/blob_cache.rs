//! The worker's local blob cache: the store layers composed for a mount.
//!
//! - Large blobs: a [`TieredStore`] of the local [`DiskStore`] over the CAS
//!   (behind an [`IdleTimeout`]); a blob is promoted (streamed into its cache
//!   file) once for all concurrent openers, then opened through the disk
//!   store's pinned-file escape hatch and handed to the kernel.
//! - Small blobs: read whole (BatchReadBlobs from a remote CAS) into a memory
//!   tier and written to the disk cache behind the reader's back.
//! - Directory protos: read into memory only; the mount keeps them decoded.
//! - Blobs of [`STREAM_MIN`] bytes and more are not waited for whole: a
//!   [`Download`] streams them into their cache file while readers read the
//!   ranges that have arrived (and ranged reads serve reads far ahead).
//!
//! Single-flight ([`Flights`]) joins concurrent requests for one blob, and a
//! fetch completes and fills the cache even if the request that started it
//! gives up. The CAS is any [`CasInstances`]: a remote server for a worker,
//! the coordinator's own storage under `casbuild up`, where the disk tier is
//! the coordinator's and nothing is copied.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use casbuild_cas::digest::Digest;
use casbuild_cas::store::{
    BlobStore, CasInstances, DiskStore, Flights, IdleTimeout, MemoryStore, PinGuard, SharedStore, StoreError,
    TieredStore,
};

use crate::download::Download;

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

/// Blobs this large or larger are streamed into the cache while readers use
/// them, instead of being fetched whole before the open returns.
pub const STREAM_MIN: u64 = 8 << 20;

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

/// An open local copy of a blob: a cache file (pinned while this lives),
/// for small blobs the bytes in memory, or for a large cold blob the download
/// that is streaming it in. None of them for the empty blob.
#[derive(Default)]
pub struct CachedBlob {
    /// The blob's (verified) cache file.
    pub file: Option<File>,
    /// The blob's bytes, for small blobs served from memory.
    pub data: Option<Bytes>,
    /// The blob's fetch in progress: read through it.
    pub download: Option<Arc<Download>>,
    _pin: Option<PinGuard>,
}

impl CachedBlob {
    fn file(file: File, pin: PinGuard) -> Self {
        CachedBlob { file: Some(file), _pin: Some(pin), ..Default::default() }
    }

    fn bytes(data: Bytes) -> Self {
        CachedBlob { data: Some(data), ..Default::default() }
    }

    fn streaming(download: Arc<Download>, pin: PinGuard) -> Self {
        CachedBlob { download: Some(download), _pin: Some(pin), ..Default::default() }
    }
}

/// What a read into memory is for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Use {
    /// A Directory proto: kept in memory only.
    Directory,
    /// A small file: into the memory tier, and to the disk cache behind the reader's back.
    File,
}

/// Local copies of a CAS's blobs.
pub struct BlobCache {
    cas: Arc<dyn CasInstances>,
    instance: String,
    /// The disk tier; its pinned files are what the mount hands out.
    local: DiskStore,
    memory: MemoryStore,
    /// The CAS of `instance`, failing where it stalls for the idle timeout.
    source: SharedStore,
    /// `local` over `source`: how large blobs become local files.
    files: TieredStore,
    reads: Flights<(Digest, Use), Bytes>,
    memory_reads: Arc<AtomicU64>,
    /// Large blobs streaming in, until each is verified (or has failed).
    downloads: Arc<Mutex<HashMap<Digest, Arc<Download>>>>,
    downloads_started: AtomicU64,
    /// Blobs this large or larger are streamed (see [`STREAM_MIN`]).
    stream_min: Arc<AtomicU64>,
    idle_timeout: Duration,
}

impl BlobCache {
    /// A cache of `cas`'s `instance` in `local` (namespaced to the instance);
    /// a fetch fails after `idle_timeout` without progress.
    pub fn new(local: DiskStore, cas: Arc<dyn CasInstances>, instance: &str, idle_timeout: Duration) -> Self {
        BlobCache::with_memory(local, MemoryStore::new(MEMORY_BUDGET), cas, instance, idle_timeout)
    }

    fn with_memory(
        local: DiskStore,
        memory: MemoryStore,
        cas: Arc<dyn CasInstances>,
        instance: &str,
        idle_timeout: Duration,
    ) -> Self {
        let local = local.namespace(instance);
        let memory = memory.namespace(instance);
        let timed: SharedStore = Arc::new(IdleTimeout::new(cas.instance(instance), idle_timeout));
        let source: SharedStore = Arc::new(crate::metrics::Counted(timed));
        let files = TieredStore::new(Arc::new(local.clone()), source.clone(), 0);
        BlobCache {
            cas,
            instance: instance.to_owned(),
            local,
            memory,
            source,
            files,
            reads: Flights::default(),
            memory_reads: Arc::default(),
            downloads: Arc::default(),
            downloads_started: AtomicU64::new(0),
            stream_min: Arc::new(AtomicU64::new(STREAM_MIN)),
            idle_timeout,
        }
    }

    /// A cache of the same CAS's `instance`, sharing this cache's disk and
    /// memory budgets (blobs are kept per instance).
    pub fn for_instance(&self, instance: &str) -> BlobCache {
        let mut cache = BlobCache::with_memory(
            self.local.clone(),
            self.memory.clone(),
            self.cas.clone(),
            instance,
            self.idle_timeout,
        );
        cache.stream_min = self.stream_min.clone();
        cache
    }

    /// Streams cold blobs of `bytes` or more (and this cache's other
    /// instances'); larger than any blob fetches every blob whole first.
    pub fn set_stream_min(&self, bytes: u64) {
        self.stream_min.store(bytes.max(SMALL_BLOB + 1), Ordering::Relaxed);
    }

    /// The REAPI instance this cache fetches from.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How many blob reads went to the CAS (each fetch counts once, however
    /// many callers waited for it).
    pub fn remote_reads(&self) -> u64 {
        self.files.copies() + self.memory_reads.load(Ordering::Relaxed) + self.downloads_started.load(Ordering::Relaxed)
    }

    /// The local store, for sizes and inspection.
    pub fn local(&self) -> &DiskStore {
        &self.local
    }

    /// Whether the blob is local or the CAS holds it (for lookups by name).
    pub async fn has(&self, digest: &Digest) -> Result<bool, FetchError> {
        match self.local.find_missing(&[*digest]).await {
            Ok(missing) if missing.is_empty() => Ok(true),
            _ => self.remote_has(digest).await,
        }
    }

    /// Whether the CAS holds `digest`.
    pub async fn remote_has(&self, digest: &Digest) -> Result<bool, FetchError> {
        if digest.is_empty_blob() {
            return Ok(true);
        }
        match self.source.find_missing(&[*digest]).await {
            Ok(missing) => Ok(missing.is_empty()),
            Err(e) => Err(FetchError::Failed(format!("asking the CAS for {digest}: {e}"))),
        }
    }

    /// Opens the local copy of `digest`, fetching it first if needed. The blob
    /// stays pinned in the local cache (never evicted) while the result lives.
    pub async fn open(&self, digest: &Digest) -> Result<CachedBlob, FetchError> {
        if digest.is_empty_blob() {
            return Ok(CachedBlob::default());
        }
        let small = digest.size_bytes <= SMALL_BLOB;
        if small {
            if let Ok(data) = self.memory.read_all(digest).await {
                crate::metrics::opened("memory");
                return Ok(CachedBlob::bytes(data));
            }
        }
        // Pin first, so that a fetched blob cannot be evicted before we open it.
        let pin = self.local.pin(digest);
        if let Some(file) = self.open_local(digest)? {
            crate::metrics::opened("disk");
            return Ok(CachedBlob::file(file, pin));
        }
        crate::metrics::opened("cas");
        let since = Instant::now();
        let fetched = self.fetch(digest, pin).await;
        crate::metrics::waited(since, &fetched);
        fetched
    }

    /// Opens `digest`, which is in neither local tier, fetching it.
    async fn fetch(&self, digest: &Digest, pin: PinGuard) -> Result<CachedBlob, FetchError> {
        let small = digest.size_bytes <= SMALL_BLOB;
        if small {
            return self.read_into_memory(digest, Use::File).await.map(CachedBlob::bytes);
        }
        if digest.size_bytes >= self.stream_min.load(Ordering::Relaxed) {
            return Ok(match self.download(digest).await? {
                Streamed::Running(download) => CachedBlob::streaming(download, pin),
                Streamed::Cached(file) => CachedBlob::file(file, pin),
            });
        }
        self.files.promote(digest).await.map_err(|e| fetch_error(digest, e))?;
        match self.open_local(digest)? {
            Some(file) => Ok(CachedBlob::file(file, pin)),
            None => Err(FetchError::Failed(format!("blob {digest} vanished from the local cache after its fetch"))),
        }
    }

    /// The bytes of a Directory proto, fetched into memory (verified, and
    /// shared by concurrent callers). Directories are not written to the disk
    /// cache: the mount keeps them decoded, and a file per directory would
    /// cost more than the round trip.
    pub async fn read_directory(&self, digest: &Digest) -> Result<Bytes, FetchError> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        let since = Instant::now();
        let read = self.read_into_memory(digest, Use::Directory).await;
        crate::metrics::waited(since, &read);
        read
    }

    /// The download of `digest` in progress, or a new one, or the cached
    /// file when a download finished since the caller looked.
    async fn download(&self, digest: &Digest) -> Result<Streamed, FetchError> {
        let lock = || self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(download) = lock().get(digest) {
            return Ok(Streamed::Running(download.clone()));
        }
        let (writer, file) = self.local.begin_followed_write(digest).await.map_err(|e| fetch_error(digest, e))?;
        let mut downloads = lock();
        // Either way our writer removes its temp file.
        if let Some(download) = downloads.get(digest) {
            return Ok(Streamed::Running(download.clone())); // another opener won
        }
        // A download leaves the map only once its blob is committed, so
        // under the lock, no entry and no file means no copy anywhere.
        if let Some(cached) = self.open_local(digest)? {
            return Ok(Streamed::Cached(cached));
        }
        let (running, key) = (self.downloads.clone(), *digest);
        let download = Download::start(*digest, writer, file, self.source.clone(), move |_| {
            running.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        });
        downloads.insert(*digest, download.clone());
        self.downloads_started.fetch_add(1, Ordering::Relaxed);
        Ok(Streamed::Running(download))
    }

    fn open_local(&self, digest: &Digest) -> Result<Option<File>, FetchError> {
        self.local.open_trusted(digest).map_err(|e| FetchError::Failed(e.to_string()))
    }

    /// Reads `digest` whole, joining a read in progress; a small file is also
    /// kept in the memory tier and written to the disk cache.
    async fn read_into_memory(&self, digest: &Digest, usage: Use) -> Result<Bytes, FetchError> {
        let (source, reads, digest) = (self.source.clone(), self.memory_reads.clone(), *digest);
        let (memory, local) = (self.memory.clone(), self.local.clone());
        let work = async move {
            // An opener that missed the memory tier just before an earlier
            // read of this blob finished finds it there now: no second fetch.
            if usage == Use::File {
                if let Ok(data) = memory.read_all(&digest).await {
                    return Ok(data);
                }
            }
            reads.fetch_add(1, Ordering::Relaxed);
            let data = read_whole(&source, &digest).await?;
            if usage == Use::File {
                if let Err(e) = memory.write(&digest, data.clone()).await {
                    tracing::warn!("caching {digest} in memory: {e}");
                }
                let copy = data.clone();
                tokio::spawn(async move {
                    if let Err(e) = local.write(&digest, copy).await {
                        tracing::warn!("writing {digest} to the disk cache: {e}");
                    }
                });
            }
            Ok(data)
        };
        self.reads.run((digest, usage), work).await.map_err(|e| fetch_error(&digest, e))
    }
}

/// A large blob for an opener: being streamed, or already in the cache.
enum Streamed {
    Running(Arc<Download>),
    Cached(File),
}

/// A blob read whole into memory: one BatchReadBlobs call when small enough,
/// else streamed (verified as it arrives by the store that reads it).
async fn read_whole(source: &SharedStore, digest: &Digest) -> Result<Bytes, StoreError> {
    if digest.size_bytes > MAX_IN_MEMORY {
        return Err(StoreError::InvalidArgument(format!(
            "blob {digest} is over the {MAX_IN_MEMORY}-byte limit of a read into memory"
        )));
    }
    if digest.size_bytes > MAX_BATCH_READ {
        return source.read_all(digest).await;
    }
    match source.read_batch(&[*digest]).await?.pop() {
        Some((_, result)) => result,
        None => Err(StoreError::not_found(digest)),
    }
}

/// A store error while fetching `digest`, as the mount reports it.
fn fetch_error(digest: &Digest, e: StoreError) -> FetchError {
    match e {
        StoreError::NotFound { .. } => FetchError::NotFound(digest.to_string()),
        other => FetchError::Failed(format!("fetching {digest}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use async_trait::async_trait;
    use casbuild_cas::digest::DigestFunction;
    use casbuild_cas::store::{BlobStream, BlobWriter};

    use super::*;

    /// A CAS whose reads are counted and take a while, so that concurrent
    /// openers of one blob overlap.
    struct SlowCas {
        inner: SharedStore,
        reads: AtomicU64,
    }

    #[async_trait]
    impl BlobStore for SlowCas {
        async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
            self.inner.find_missing(digests).await
        }

        async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.inner.read(digest, offset, limit).await
        }

        async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
            self.inner.begin_write(digest).await
        }
    }

    /// Every instance is the one slow store.
    struct OneInstance(Arc<SlowCas>);

    impl CasInstances for OneInstance {
        fn instance(&self, _instance: &str) -> SharedStore {
            self.0.clone()
        }
    }

    fn contents(cached: &CachedBlob) -> Vec<u8> {
        match (&cached.data, &cached.file) {
            (Some(data), _) => data.to_vec(),
            (None, Some(file)) => {
                let mut file: &File = file;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
                bytes
            }
            (None, None) => Vec::new(),
        }
    }

    #[tokio::test]
    async fn concurrent_opens_of_a_blob_fetch_it_once_and_later_opens_stay_local() {
        let function = DigestFunction::Sha256;
        let remote = Arc::new(SlowCas { inner: Arc::new(MemoryStore::new(64 << 20)), reads: AtomicU64::new(0) });
        let small = Bytes::from(vec![7u8; 1000]);
        let large = Bytes::from((0..(3u32 << 20)).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let (small_digest, large_digest) = (function.digest_of(&small), function.digest_of(&large));
        remote.inner.write(&small_digest, small.clone()).await.unwrap();
        remote.inner.write(&large_digest, large.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let local = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let cache = BlobCache::new(local, Arc::new(OneInstance(remote.clone())), "", Duration::from_secs(30));

        for (digest, bytes) in [(small_digest, &small), (large_digest, &large)] {
            let opens = futures::future::join_all((0..16).map(|_| cache.open(&digest))).await;
            for open in &opens {
                assert_eq!(&contents(open.as_ref().unwrap()), bytes);
            }
        }
        assert_eq!(remote.reads.load(Ordering::SeqCst), 2, "sixteen opens of each of two blobs, two fetches");
        assert_eq!(cache.remote_reads(), 2);

        // Both are local now: the large one on disk, the small one in memory.
        for digest in [small_digest, large_digest] {
            cache.open(&digest).await.unwrap();
        }
        assert_eq!(remote.reads.load(Ordering::SeqCst), 2);
        assert!(cache.local().find_missing(&[large_digest]).await.unwrap().is_empty());

        // A blob the CAS lacks is NotFound for every waiter, and nothing is cached.
        let absent = function.digest_of(b"absent");
        let opens = futures::future::join_all((0..4).map(|_| cache.open(&absent))).await;
        assert!(opens.iter().all(|o| matches!(o, Err(FetchError::NotFound(_)))));
        assert_eq!(cache.local().find_missing(&[absent]).await.unwrap(), vec![absent]);
    }

    /// An opener that found no cached copy while a download was finishing
    /// gets the committed file instead of starting a second download.
    #[tokio::test]
    async fn a_download_that_finished_meanwhile_is_not_started_again() {
        let function = DigestFunction::Sha256;
        let remote = Arc::new(SlowCas { inner: Arc::new(MemoryStore::new(64 << 20)), reads: AtomicU64::new(0) });
        let large = Bytes::from((0..(3u32 << 20)).map(|i| (i % 241) as u8).collect::<Vec<u8>>());
        let digest = function.digest_of(&large);
        remote.inner.write(&digest, large.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let local = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let cache = BlobCache::new(local, Arc::new(OneInstance(remote.clone())), "", Duration::from_secs(30));
        cache.set_stream_min(1 << 20);

        let first = cache.open(&digest).await.unwrap();
        first.download.as_ref().expect("streamed").finished().await.unwrap();
        drop(first);
        // What an opener does after its own look at the cache came too early.
        let Streamed::Cached(file) = cache.download(&digest).await.unwrap() else {
            panic!("a second download of a committed blob")
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).unwrap();
        assert_eq!(bytes, large);
        assert_eq!(remote.reads.load(Ordering::SeqCst), 1, "one fetch");
        assert_eq!(cache.remote_reads(), 1);
    }
}
