//! A layer that turns a stalled store into an error: every call, and every
//! chunk of a read, must make progress within the idle timeout. A remote CAS
//! that stops answering then fails the read that waits on it instead of
//! hanging it (and the FUSE request, and the action behind it).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::digest::Digest;
use crate::store::{BlobStore, BlobStream, BlobWriter, SharedStore, StoreError};

/// `inner`, failing with [`StoreError::Unavailable`] where it makes no
/// progress for `idle`.
pub struct IdleTimeout {
    inner: SharedStore,
    idle: Duration,
}

impl IdleTimeout {
    /// Wraps `inner`.
    pub fn new(inner: SharedStore, idle: Duration) -> Self {
        IdleTimeout { inner, idle }
    }

    /// `call`, or an error naming `what` if it takes longer than the timeout.
    async fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.idle, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("{}: no answer for {:?}", what(), self.idle))),
        }
    }
}

#[async_trait]
impl BlobStore for IdleTimeout {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.bounded(|| format!("asking for {} blobs", digests.len()), self.inner.find_missing(digests)).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        let stream = self.bounded(|| format!("reading {digest}"), self.inner.read(digest, offset, limit)).await?;
        let idle = self.idle;
        let stream = futures::stream::unfold(Some(stream), move |state| async move {
            let mut stream = state?;
            match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(stream))),
                Ok(None) => None,
                Err(_) => Some((Err(StoreError::Unavailable(format!("no data for {idle:?}"))), None)),
            }
        });
        Ok(stream.boxed())
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.bounded(|| format!("writing {digest}"), self.inner.begin_write(digest)).await
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        self.bounded(|| format!("writing {digest}"), self.inner.write(digest, data)).await
    }

    async fn read_batch(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes, StoreError>)>, StoreError> {
        self.bounded(|| format!("fetching {} blobs", digests.len()), self.inner.read_batch(digests)).await
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let count = blobs.len();
        self.bounded(|| format!("writing {count} blobs"), self.inner.write_batch(blobs)).await
    }

    async fn write_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError> {
        // Bounded by the inner store's writer calls, not as a whole: a large
        // file may take longer than the idle timeout to send.
        self.inner.write_file(digest, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::MemoryStore;
    use std::sync::Arc;

    /// A store whose reads deliver one chunk and then stall.
    struct Stalls;

    #[async_trait]
    impl BlobStore for Stalls {
        async fn find_missing(&self, _: &[Digest]) -> Result<Vec<Digest>, StoreError> {
            futures::future::pending().await
        }

        async fn read(&self, _: &Digest, _: u64, _: Option<u64>) -> Result<BlobStream, StoreError> {
            let first = futures::stream::once(async { Ok(Bytes::from_static(b"first")) });
            Ok(first.chain(futures::stream::pending()).boxed())
        }

        async fn begin_write(&self, _: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
            futures::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_stalled_call_or_stream_fails_and_a_live_one_passes() {
        let idle = Duration::from_millis(50);
        let digest = DigestFunction::Sha256.digest_of(b"first and more");
        let stalled = IdleTimeout::new(Arc::new(Stalls), idle);
        let missing = stalled.find_missing(&[digest]).await;
        assert!(matches!(missing, Err(StoreError::Unavailable(m)) if m.contains("no answer")));
        let mut stream = stalled.read(&digest, 0, None).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), Bytes::from_static(b"first"));
        assert!(matches!(stream.next().await, Some(Err(StoreError::Unavailable(m))) if m.contains("no data")));
        assert!(stream.next().await.is_none(), "the stream ends after its error");

        let live = IdleTimeout::new(Arc::new(MemoryStore::new(1 << 20)), idle);
        live.write(&digest, Bytes::from_static(b"first and more")).await.unwrap();
        assert_eq!(live.read_all(&digest).await.unwrap(), Bytes::from_static(b"first and more"));
    }
}
