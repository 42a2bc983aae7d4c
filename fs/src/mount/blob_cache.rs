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

use crate::digest::Digest;
use crate::store::{BlobStore, DiskStore, PinGuard, RemoteStore, StoreError};

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

/// An open local copy of a blob, pinned in the cache while this lives.
pub struct CachedBlob {
    /// The blob's file; `None` for the empty blob, which has none.
    pub file: Option<File>,
    _pin: Option<PinGuard>,
}

type Flight = Shared<BoxFuture<'static, Result<(), FetchError>>>;

/// Local copies of remote blobs.
pub struct BlobCache {
    local: DiskStore,
    remote: RemoteStore,
    flights: Mutex<HashMap<Digest, Flight>>,
    remote_reads: AtomicU64,
    idle_timeout: Duration,
}

impl BlobCache {
    /// A cache of `remote` blobs in `local`; a fetch fails after `idle_timeout`
    /// without progress.
    pub fn new(local: DiskStore, remote: RemoteStore, idle_timeout: Duration) -> Self {
        BlobCache { local, remote, flights: Mutex::new(HashMap::new()), remote_reads: AtomicU64::new(0), idle_timeout }
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
            return Ok(CachedBlob { file: None, _pin: None });
        }
        // Pin first, so that a fetched blob cannot be evicted before we open it.
        let pin = self.local.pin(digest);
        if let Some(file) = self.open_local(digest)? {
            return Ok(CachedBlob { file: Some(file), _pin: Some(pin) });
        }
        self.fetch(digest).await?;
        match self.open_local(digest)? {
            Some(file) => Ok(CachedBlob { file: Some(file), _pin: Some(pin) }),
            None => Err(FetchError::Failed(format!("blob {digest} vanished from the local cache after its fetch"))),
        }
    }

    /// The bytes of a small blob (a Directory), via the local cache.
    pub async fn read_small(self: &Arc<Self>, digest: &Digest) -> Result<Bytes, FetchError> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        for _ in 0..3 {
            match self.local.read_all(digest).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.is_not_found() => self.fetch(digest).await?,
                Err(e) => return Err(FetchError::Failed(e.to_string())),
            }
        }
        Err(FetchError::Failed(format!("blob {digest} was evicted from the local cache as soon as it arrived")))
    }

    fn open_local(&self, digest: &Digest) -> Result<Option<File>, FetchError> {
        self.local.open_trusted(digest).map_err(|e| FetchError::Failed(e.to_string()))
    }

    /// Fetches `digest` into the local store, joining a fetch in progress.
    async fn fetch(self: &Arc<Self>, digest: &Digest) -> Result<(), FetchError> {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights
                .entry(*digest)
                .or_insert_with(|| {
                    let cache = self.clone();
                    let digest = *digest;
                    let task = tokio::spawn(async move {
                        let result = cache.download(&digest).await;
                        cache.flights.lock().unwrap_or_else(|e| e.into_inner()).remove(&digest);
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

    async fn download(&self, digest: &Digest) -> Result<(), FetchError> {
        self.remote_reads.fetch_add(1, Ordering::Relaxed);
        let failed = |e: StoreError| match e {
            StoreError::NotFound { .. } => FetchError::NotFound(digest.to_string()),
            other => FetchError::Failed(format!("fetching {digest}: {other}")),
        };
        let stalled = || FetchError::Failed(format!("fetching {digest}: no data for {:?}", self.idle_timeout));
        let mut stream = tokio::time::timeout(self.idle_timeout, self.remote.read(digest, 0, None))
            .await
            .map_err(|_| stalled())?
            .map_err(failed)?;
        let mut writer = self.local.begin_write(digest).await.map_err(failed)?;
        loop {
            match tokio::time::timeout(self.idle_timeout, stream.next()).await {
                Err(_) => return Err(stalled()),
                Ok(None) => break,
                Ok(Some(chunk)) => writer.write(chunk.map_err(failed)?).await.map_err(failed)?,
            }
        }
        writer.commit().await.map_err(failed)
    }
}
