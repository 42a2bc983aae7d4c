//! An in-memory LRU blob store with a byte budget: the fast tier.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use lru::LruCache;

use crate::digest::Digest;
use crate::namespace::{instance_dir, Namespaces};
use crate::store::tier_metrics::TierMetrics;
use crate::store::{chunked, read_range, BlobStore, BlobStream, BlobWriter, StoreError, Verifier};

/// The metrics of memory stores.
const MEMORY: TierMetrics = TierMetrics("memory");

/// Blobs kept in memory, least recently used evicted first once the total
/// size passes the budget. Cloning gives another handle onto the same blobs.
#[derive(Clone)]
pub struct MemoryStore {
    core: Arc<Mutex<Core>>,
    namespace: u32,
}

struct Core {
    blobs: LruCache<(u32, Digest), Bytes>,
    bytes: u64,
    budget: u64,
    namespaces: Namespaces,
}

impl MemoryStore {
    /// An empty store holding at most `budget` bytes, in the default namespace.
    pub fn new(budget: u64) -> Self {
        let mut namespaces = Namespaces::default();
        let namespace = namespaces.id(&instance_dir(""));
        let core = Core { blobs: LruCache::unbounded(), bytes: 0, budget, namespaces };
        MemoryStore { core: Arc::new(Mutex::new(core)), namespace }
    }

    /// A handle onto the same memory (and budget) for another instance.
    pub fn namespace(&self, instance: &str) -> Self {
        let namespace = self.lock().namespaces.id(&instance_dir(instance));
        MemoryStore { core: self.core.clone(), namespace }
    }

    /// Bytes held across all namespaces.
    pub fn bytes_used(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        // A panic while holding the lock cannot leave the LRU half-updated in a
        // way that matters for a cache, so poisoning is ignored.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, digest: &Digest) -> Option<Bytes> {
        if digest.is_empty_blob() {
            return Some(Bytes::new());
        }
        self.lock().blobs.get(&(self.namespace, *digest)).cloned()
    }

    fn insert(&self, digest: Digest, data: Bytes) -> Result<(), StoreError> {
        let mut core = self.lock();
        let size = data.len() as u64;
        if size > core.budget {
            return Err(StoreError::ResourceExhausted(format!(
                "blob {digest:?} ({size} bytes) is larger than the memory budget of {} bytes",
                core.budget
            )));
        }
        if core.blobs.put((self.namespace, digest), data).is_none() {
            core.bytes += size;
            MEMORY.stored(size);
        }
        let (mut count, mut bytes) = (0, 0);
        while core.bytes > core.budget {
            match core.blobs.pop_lru() {
                Some((_, evicted)) => {
                    core.bytes -= evicted.len() as u64;
                    (count, bytes) = (count + 1, bytes + evicted.len() as u64);
                }
                None => break,
            }
        }
        MEMORY.evicted(count, bytes);
        MEMORY.holds(core.blobs.len(), core.bytes, core.budget);
        Ok(())
    }
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let mut core = self.lock();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && core.blobs.get(&(self.namespace, **d)).is_none())
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        let data = self.get(digest).ok_or_else(|| StoreError::not_found(digest))?;
        let (start, end) = read_range(digest, offset, limit)?;
        MEMORY.read(end - start);
        Ok(chunked(data, start, end))
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        Ok(Box::new(MemoryWriter {
            store: self.clone(),
            verifier: Verifier::new(*digest),
            digest: *digest,
            buf: BytesMut::new(),
        }))
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        Verifier::check(*digest, &data)?;
        self.insert(*digest, data)
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        self.get(digest).ok_or_else(|| StoreError::not_found(digest))
    }
}

struct MemoryWriter {
    store: MemoryStore,
    digest: Digest,
    verifier: Verifier,
    buf: BytesMut,
}

#[async_trait]
impl BlobWriter for MemoryWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.verifier.update(&chunk)?;
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.verifier.count()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.verifier.finish()?;
        self.store.insert(self.digest, self.buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;

    fn blob(n: u8, len: usize) -> (Digest, Bytes) {
        let data = Bytes::from(vec![n; len]);
        (DigestFunction::Blake3.digest_of(&data), data)
    }

    #[tokio::test]
    async fn evicts_least_recently_used_at_the_budget() {
        let store = MemoryStore::new(300);
        let (a, da) = blob(1, 100);
        let (b, db) = blob(2, 100);
        let (c, dc) = blob(3, 100);
        let (d, dd) = blob(4, 100);
        for (dg, data) in [(a, da), (b, db), (c, dc)] {
            store.write(&dg, data).await.unwrap();
        }
        store.read_all(&a).await.unwrap(); // a is now the most recent
        store.write(&d, dd).await.unwrap();
        assert_eq!(store.find_missing(&[a, b, c, d]).await.unwrap(), vec![b]);
        assert_eq!(store.bytes_used(), 300);
    }

    #[tokio::test]
    async fn namespaces_are_separate_but_share_the_budget() {
        let store = MemoryStore::new(150);
        let other = store.namespace("team/x");
        let (a, da) = blob(1, 100);
        store.write(&a, da.clone()).await.unwrap();
        assert_eq!(other.find_missing(&[a]).await.unwrap(), vec![a]);
        other.write(&a, da).await.unwrap();
        assert_eq!(store.find_missing(&[a]).await.unwrap(), vec![a], "evicted by the other namespace");
    }

    #[tokio::test]
    async fn rejects_wrong_content_and_oversized_blobs() {
        let store = MemoryStore::new(10);
        let (a, _) = blob(1, 5);
        let err = store.write(&a, Bytes::from_static(b"xxxxx")).await.unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch(_)), "{err}");
        let (big, data) = blob(2, 11);
        let err = store.write(&big, data).await.unwrap_err();
        assert!(matches!(err, StoreError::ResourceExhausted(_)), "{err}");
        assert_eq!(store.bytes_used(), 0);
    }
}
