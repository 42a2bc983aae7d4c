//! A layer that retries calls of another store that fail as
//! [`StoreError::Unavailable`] (a server restarting, a dropped connection, a
//! call past its deadline), with exponential backoff and jitter, a bounded
//! number of times. Every other error is final at once: a missing blob stays
//! missing, a refused write stays refused.
//!
//! Calls are retried whole: CAS writes are idempotent, and a read is retried
//! until its stream opens. A stream that breaks part-way is not resumed here
//! (a resumed ranged read would need its own verification); the reader sees
//! the error and a later read starts again.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::digest::Digest;
use crate::store::{BlobStore, BlobStream, BlobWriter, CasInstances, SharedStore, StoreError};

/// How often and how patiently to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Calls made at most, the first included.
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub first_delay: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts over about 1.5 s: enough for a restarting server or a
    /// dropped connection, short enough that a dead server fails a build soon.
    fn default() -> Self {
        RetryPolicy { attempts: 5, first_delay: Duration::from_millis(100), max_delay: Duration::from_secs(5) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first): the doubled
    /// delay, capped, scaled by a random factor in [0.5, 1) so that many
    /// clients failing together do not retry together.
    fn delay(&self, retry: u32) -> Duration {
        let doubled = self.first_delay.saturating_mul(1u32 << retry.min(16)).min(self.max_delay);
        let jitter = 0.5 + f64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 512.0;
        doubled.mul_f64(jitter)
    }
}

/// `inner`, with calls that fail as unavailable retried under `policy`.
pub struct Retrying {
    inner: SharedStore,
    policy: RetryPolicy,
}

impl Retrying {
    /// Wraps `inner`.
    pub fn new(inner: SharedStore, policy: RetryPolicy) -> Self {
        Retrying { inner, policy }
    }

    async fn retry<T, F, Fut>(&self, what: impl Fn() -> String, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut retry = 0;
        loop {
            match call().await {
                Err(StoreError::Unavailable(why)) if retry + 1 < self.policy.attempts => {
                    let delay = self.policy.delay(retry);
                    tracing::debug!("{}: {why}; retrying in {delay:?}", what());
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                Err(StoreError::Unavailable(why)) if retry > 0 => {
                    return Err(StoreError::Unavailable(format!("{why} (after {} attempts)", retry + 1)));
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl BlobStore for Retrying {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.retry(|| format!("asking for {} blobs", digests.len()), || self.inner.find_missing(digests)).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        self.retry(|| format!("reading {digest}"), || self.inner.read(digest, offset, limit)).await
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.retry(|| format!("writing {digest}"), || self.inner.begin_write(digest)).await
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        self.retry(|| format!("writing {digest}"), || self.inner.write(digest, data.clone())).await
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        self.retry(|| format!("reading {digest}"), || self.inner.read_all(digest)).await
    }

    async fn read_batch(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes, StoreError>)>, StoreError> {
        self.retry(|| format!("reading {} blobs", digests.len()), || self.inner.read_batch(digests)).await
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let count = blobs.len();
        self.retry(|| format!("writing {count} blobs"), || self.inner.write_batch(blobs.clone())).await
    }

    async fn write_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError> {
        self.retry(|| format!("writing {digest} from {}", path.display()), || self.inner.write_file(digest, path)).await
    }
}

/// Every instance of a CAS, each behind [`Retrying`].
pub struct RetryingCas {
    inner: Arc<dyn CasInstances>,
    policy: RetryPolicy,
}

impl RetryingCas {
    /// Wraps every instance store of `inner`.
    pub fn new(inner: Arc<dyn CasInstances>, policy: RetryPolicy) -> Self {
        RetryingCas { inner, policy }
    }
}

impl CasInstances for RetryingCas {
    fn instance(&self, instance: &str) -> SharedStore {
        Arc::new(Retrying::new(self.inner.instance(instance), self.policy.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::MemoryStore;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A memory store whose first `failures` calls of each kind fail with `error`.
    struct Flaky {
        inner: MemoryStore,
        failures: u32,
        calls: AtomicU32,
        error: fn() -> StoreError,
    }

    impl Flaky {
        fn gate(&self) -> Result<(), StoreError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err((self.error)());
            }
            Ok(())
        }
    }

    #[async_trait]
    impl BlobStore for Flaky {
        async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
            self.gate()?;
            self.inner.find_missing(digests).await
        }

        async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
            self.gate()?;
            self.inner.read(digest, offset, limit).await
        }

        async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
            self.gate()?;
            self.inner.begin_write(digest).await
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy { attempts: 4, first_delay: Duration::from_millis(1), max_delay: Duration::from_millis(4) }
    }

    fn flaky(failures: u32, error: fn() -> StoreError) -> Arc<Flaky> {
        Arc::new(Flaky { inner: MemoryStore::new(1 << 20), failures, calls: AtomicU32::new(0), error })
    }

    fn unavailable() -> StoreError {
        StoreError::Unavailable("connection reset".into())
    }

    #[tokio::test]
    async fn unavailable_calls_are_retried_until_they_succeed() {
        let data = Bytes::from_static(b"retried blob");
        let digest = DigestFunction::Sha256.digest_of(&data);
        let store = flaky(3, unavailable);
        store.inner.write(&digest, data.clone()).await.unwrap();
        let retrying = Retrying::new(store.clone(), policy());
        assert_eq!(retrying.read_all(&digest).await.unwrap(), data);
        assert_eq!(store.calls.load(Ordering::SeqCst), 4, "three failures, then the read");
        assert!(retrying.find_missing(&[digest]).await.unwrap().is_empty(), "later calls pass at once");
    }

    #[tokio::test]
    async fn retries_end_after_the_last_attempt_and_say_how_many() {
        let store = flaky(100, unavailable);
        let retrying = Retrying::new(store.clone(), policy());
        let digest = DigestFunction::Sha256.digest_of(b"x");
        match retrying.find_missing(&[digest]).await {
            Err(StoreError::Unavailable(why)) => assert_eq!(why, "connection reset (after 4 attempts)"),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn other_errors_are_final_at_once() {
        let digest = DigestFunction::Sha256.digest_of(b"absent");
        let store = flaky(1, || StoreError::InvalidArgument("refused".into()));
        let retrying = Retrying::new(store.clone(), policy());
        assert!(matches!(
            retrying.write(&digest, Bytes::from_static(b"absent")).await,
            Err(StoreError::InvalidArgument(_))
        ));
        assert_eq!(store.calls.load(Ordering::SeqCst), 1, "not retried");
        assert!(retrying.read_all(&digest).await.unwrap_err().is_not_found(), "absent is absent");
        assert_eq!(store.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let policy =
            RetryPolicy { attempts: 10, first_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        for (retry, full) in [(0, 100), (1, 200), (2, 400), (3, 800), (4, 1000), (9, 1000)] {
            let delay = policy.delay(retry);
            let full = Duration::from_millis(full);
            assert!(delay >= full / 2 && delay < full, "retry {retry}: {delay:?}");
        }
    }
}
