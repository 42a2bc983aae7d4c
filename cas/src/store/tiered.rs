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
///
/// [`TieredStore::read_through`] makes a cache of every size over a store
/// whose partial reads cannot be verified (object storage): every miss is
/// copied up whole, verified, before any of it is served, and writes are
/// teed into the fast tier as they stream.
pub struct TieredStore {
    fast: Arc<dyn BlobStore>,
    slow: Arc<dyn BlobStore>,
    /// Largest blob admitted into the fast tier by reads and writes.
    admit_max: u64,
    /// Whether reads are only ever served from a whole, verified copy.
    read_through: bool,
    promotions: Flights<Digest, ()>,
    copies: Arc<AtomicU64>,
}

impl TieredStore {
    /// Layers `fast` over `slow`; blobs up to `admit_max` bytes are kept in both.
    pub fn new(fast: Arc<dyn BlobStore>, slow: Arc<dyn BlobStore>, admit_max: u64) -> Self {
        TieredStore {
            fast,
            slow,
            admit_max,
            read_through: false,
            promotions: Flights::default(),
            copies: Arc::default(),
        }
    }

    /// Layers `fast` over `slow` as a cache of blobs of every size: a read
    /// that misses `fast` copies the whole blob up (streamed, verified by
    /// `fast`'s writer) and is served from there, and a write goes to both.
    /// Reads never see bytes of `slow` that were not checked against their
    /// digest, even ranged ones.
    pub fn read_through(fast: Arc<dyn BlobStore>, slow: Arc<dyn BlobStore>) -> Self {
        TieredStore { read_through: true, ..TieredStore::new(fast, slow, u64::MAX) }
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
        if self.read_through {
            return self.read_copied_up(digest, offset, limit).await;
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
        if self.read_through {
            let fast = match self.fast.begin_write(digest).await {
                Ok(fast) => Some(fast),
                Err(e) => {
                    tracing::debug!("not caching {digest:?} in the fast tier: {e}");
                    None
                }
            };
            return Ok(Box::new(TeeWriter { digest: *digest, slow, fast }));
        }
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

impl TieredStore {
    /// A read-through miss: the whole blob copied up, then the range read
    /// from the fast tier; if the fast tier cannot keep it (full, or evicted
    /// at once), the whole blob read from the slow tier, verified, and the
    /// range cut from it.
    async fn read_copied_up(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        let (start, end) = read_range(digest, offset, limit)?;
        match self.promote(digest).await {
            Ok(()) => match self.fast.read(digest, offset, limit).await {
                Err(e) if e.is_not_found() => {}
                other => return other,
            },
            Err(e) if e.is_not_found() => return Err(e),
            Err(e) => tracing::debug!("could not copy {digest:?} into the fast tier: {e}"),
        }
        let whole = self.slow.read(digest, 0, None).await?;
        Ok(cut(whole, start, end))
    }
}

/// The bytes `[start, end)` of a stream of a whole blob; the stream is read
/// to its end (so a verifying stream's verdict arrives before the last piece).
fn cut(whole: BlobStream, start: u64, end: u64) -> BlobStream {
    let mut at = 0u64;
    whole
        .filter_map(move |chunk| {
            let out = match chunk {
                Ok(chunk) => {
                    let (from, to) = (at, at + chunk.len() as u64);
                    at = to;
                    let (lo, hi) = (start.max(from), end.min(to));
                    (lo < hi).then(|| Ok(chunk.slice((lo - from) as usize..(hi - from) as usize)))
                }
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(out)
        })
        .boxed()
}

/// A write going to the slow tier and, as it streams, to the fast one; the
/// fast copy is best effort.
struct TeeWriter {
    digest: Digest,
    slow: Box<dyn BlobWriter>,
    fast: Option<Box<dyn BlobWriter>>,
}

#[async_trait]
impl BlobWriter for TeeWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if let Some(fast) = &mut self.fast {
            if let Err(e) = fast.write(chunk.clone()).await {
                tracing::debug!("not caching {:?} in the fast tier: {e}", self.digest);
                self.fast = None;
            }
        }
        self.slow.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.slow.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.slow.commit().await?;
        if let Some(fast) = self.fast {
            if let Err(e) = fast.commit().await {
                tracing::debug!("not caching {:?} in the fast tier: {e}", self.digest);
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
    async fn read_through_serves_ranges_from_a_whole_verified_copy() {
        let slow = MemoryStore::new(64 << 20);
        let data = Bytes::from((0..3 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let digest = DigestFunction::Sha256.digest_of(&data);
        slow.write(&digest, data.clone()).await.unwrap();

        let fast = MemoryStore::new(64 << 20);
        let cache = TieredStore::read_through(Arc::new(fast.clone()), Arc::new(slow.clone()));
        let got = crate::store::collect(cache.read(&digest, (1 << 20) + 7, Some(1 << 20)).await.unwrap(), 0).await;
        assert_eq!(got.unwrap(), data.slice((1 << 20) + 7..(2 << 20) + 7));
        assert_eq!(cache.copies(), 1, "the whole blob was copied up first");
        assert!(fast.find_missing(&[digest]).await.unwrap().is_empty());

        // A fast tier too small to keep it: the range is cut from the whole,
        // verified stream of the slow tier.
        let tiny = TieredStore::read_through(Arc::new(MemoryStore::new(1024)), Arc::new(slow.clone()));
        let got = crate::store::collect(tiny.read(&digest, 5, Some(10)).await.unwrap(), 0).await;
        assert_eq!(got.unwrap(), data.slice(5..15));

        // Writes are teed into the fast tier as they stream.
        let other = Bytes::from(vec![9u8; 2 << 20]);
        let other_d = DigestFunction::Sha256.digest_of(&other);
        let mut writer = cache.begin_write(&other_d).await.unwrap();
        writer.write(other.slice(..1 << 20)).await.unwrap();
        writer.write(other.slice(1 << 20..)).await.unwrap();
        writer.commit().await.unwrap();
        assert!(fast.find_missing(&[other_d]).await.unwrap().is_empty());
        assert!(slow.find_missing(&[other_d]).await.unwrap().is_empty());
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
