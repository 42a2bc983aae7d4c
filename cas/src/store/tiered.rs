//! A fast store in front of a slow one: memory over disk, or disk over remote.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::digest::Digest;
use crate::store::{chunked, read_range, BlobStore, BlobStream, BlobWriter, Flights, StoreError};

/// Reads try the fast tier first; a blob read from the slow tier is copied up
/// when it is small enough. Writes go to the slow tier (the one that must keep
/// it) and small blobs to the fast tier as well. [`TieredStore::promote`]
/// copies a blob of any size up, streamed, once for all concurrent callers:
/// how a worker's disk cache fills from its CAS.
pub struct TieredStore {
    fast: Arc<dyn BlobStore>,
    slow: Arc<dyn BlobStore>,
    /// Largest blob admitted into the fast tier by reads and writes.
    admit_max: u64,
    promotions: Flights<Digest, ()>,
    copies: Arc<AtomicU64>,
}

impl TieredStore {
    /// Layers `fast` over `slow`; blobs up to `admit_max` bytes are kept in both.
    pub fn new(fast: Arc<dyn BlobStore>, slow: Arc<dyn BlobStore>, admit_max: u64) -> Self {
        TieredStore { fast, slow, admit_max, promotions: Flights::default(), copies: Arc::default() }
    }

    /// Makes `digest` present in the fast tier, streaming it from the slow one
    /// unless it is there already. Concurrent calls for one blob share one
    /// copy, which completes even if its callers give up.
    pub async fn promote(&self, digest: &Digest) -> Result<(), StoreError> {
        if self.fast.find_missing(&[*digest]).await?.is_empty() {
            return Ok(());
        }
        let (fast, slow, digest, copies) = (self.fast.clone(), self.slow.clone(), *digest, self.copies.clone());
        self.promotions
            .run(digest, async move {
                copies.fetch_add(1, Ordering::Relaxed);
                let mut stream = slow.read(&digest, 0, None).await?;
                let mut writer = fast.begin_write(&digest).await?;
                while let Some(chunk) = stream.next().await {
                    writer.write(chunk?).await?;
                }
                writer.commit().await
            })
            .await
    }

    /// How many copies [`TieredStore::promote`] started (one per blob however
    /// many callers waited for it).
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl BlobStore for TieredStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let not_fast = self.fast.find_missing(digests).await?;
        if not_fast.is_empty() {
            return Ok(not_fast);
        }
        self.slow.find_missing(&not_fast).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        match self.fast.read(digest, offset, limit).await {
            Err(e) if e.is_not_found() => {}
            other => return other,
        }
        if digest.size_bytes > self.admit_max {
            return self.slow.read(digest, offset, limit).await;
        }
        let (start, end) = read_range(digest, offset, limit)?;
        let data = self.slow.read_all(digest).await?;
        if let Err(e) = self.fast.write(digest, data.clone()).await {
            tracing::debug!("not promoting {digest:?}: {e}");
        }
        Ok(chunked(data, start, end))
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        let slow = self.slow.begin_write(digest).await?;
        let copy = (digest.size_bytes <= self.admit_max).then(|| (self.fast.clone(), BytesMut::new()));
        Ok(Box::new(TieredWriter { digest: *digest, slow, copy }))
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        self.slow.write(digest, data.clone()).await?;
        if digest.size_bytes <= self.admit_max {
            if let Err(e) = self.fast.write(digest, data).await {
                tracing::debug!("not caching {digest:?} in the fast tier: {e}");
            }
        }
        Ok(())
    }
}

struct TieredWriter {
    digest: Digest,
    slow: Box<dyn BlobWriter>,
    /// The fast tier and the bytes for it, for blobs small enough to admit.
    copy: Option<(Arc<dyn BlobStore>, BytesMut)>,
}

#[async_trait]
impl BlobWriter for TieredWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if let Some((_, buf)) = &mut self.copy {
            buf.extend_from_slice(&chunk);
        }
        self.slow.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.slow.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.slow.commit().await?;
        if let Some((fast, buf)) = self.copy {
            if let Err(e) = fast.write(&self.digest, buf.freeze()).await {
                tracing::debug!("not caching {:?} in the fast tier: {e}", self.digest);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::{DiskStore, MemoryStore};

    #[tokio::test]
    async fn small_blobs_are_promoted_and_large_ones_stream_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryStore::new(1 << 20);
        let disk = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let tiered = TieredStore::new(Arc::new(memory.clone()), Arc::new(disk.clone()), 1024);

        let small = Bytes::from_static(b"small blob");
        let small_d = DigestFunction::Blake3.digest_of(&small);
        disk.write(&small_d, small.clone()).await.unwrap();
        assert_eq!(memory.find_missing(&[small_d]).await.unwrap(), vec![small_d]);
        assert_eq!(tiered.read_all(&small_d).await.unwrap(), small);
        assert!(memory.find_missing(&[small_d]).await.unwrap().is_empty(), "promoted");

        let large = Bytes::from(vec![7u8; 4096]);
        let large_d = DigestFunction::Sha256.digest_of(&large);
        tiered.write(&large_d, large.clone()).await.unwrap();
        assert_eq!(memory.bytes_used(), small.len() as u64, "large blob kept out of memory");
        assert_eq!(tiered.read_all(&large_d).await.unwrap(), large);
        assert!(tiered.find_missing(&[small_d, large_d]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_promotions_of_a_blob_copy_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let source = MemoryStore::new(64 << 20);
        let disk = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let data = Bytes::from(vec![3u8; 5 << 20]);
        let digest = DigestFunction::Sha256.digest_of(&data);
        source.write(&digest, data.clone()).await.unwrap();
        let tiered = Arc::new(TieredStore::new(Arc::new(disk.clone()), Arc::new(source), 0));
        let callers: Vec<_> = (0..6)
            .map(|_| {
                let tiered = tiered.clone();
                tokio::spawn(async move { tiered.promote(&digest).await })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap().unwrap();
        }
        assert_eq!(tiered.copies(), 1, "one copy for six callers");
        assert_eq!(disk.read_all(&digest).await.unwrap(), data);
        tiered.promote(&digest).await.unwrap();
        assert_eq!(tiered.copies(), 1, "a present blob is not copied again");

        let absent = DigestFunction::Sha256.digest_of(b"absent");
        assert!(tiered.promote(&absent).await.unwrap_err().is_not_found());
    }
}
