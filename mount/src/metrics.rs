//! Metrics of the mount: FUSE operations by kind, opens by where the blob
//! was (memory, the disk cache, or fetched from the CAS), how long opens
//! waited for fetches, bytes fetched and fetch errors. Recorded through the
//! `metrics` facade; free when no recorder is installed.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use casbuild_cas::digest::Digest;
use casbuild_cas::store::{BlobStore, BlobStream, BlobWriter, SharedStore, StoreError};
use futures::StreamExt;

/// A FUSE operation the daemon answered.
pub(crate) fn operation(op: &'static str) {
    metrics::counter!("casbuild_mount_operations_total", "op" => op).increment(1);
}

/// An open served from `from`: `memory`, `disk` (the local cache) or `cas`
/// (fetched, or joined a fetch in flight).
pub(crate) fn opened(from: &'static str) {
    metrics::counter!("casbuild_mount_opens_total", "from" => from).increment(1);
}

/// An open or directory read waited since `since` for a fetch from the CAS.
pub(crate) fn waited<T, E>(since: Instant, result: &Result<T, E>) {
    metrics::histogram!("casbuild_mount_fetch_seconds").record(since.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("casbuild_mount_fetch_errors_total").increment(1);
    }
}

fn fetched(bytes: usize) {
    metrics::counter!("casbuild_mount_fetched_bytes_total").increment(bytes as u64);
}

/// The mount's source: counts the bytes read from the CAS through it
/// (each blob's bytes once, however many opens wait for them).
pub(crate) struct Counted(pub SharedStore);

#[async_trait::async_trait]
impl BlobStore for Counted {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.0.find_missing(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        let stream = self.0.read(digest, offset, limit).await?;
        Ok(stream.inspect(|chunk| chunk.iter().for_each(|c| fetched(c.len()))).boxed())
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.0.begin_write(digest).await
    }

    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        self.0.write(digest, data).await
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        let data = self.0.read_all(digest).await?;
        fetched(data.len());
        Ok(data)
    }

    async fn read_batch(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes, StoreError>)>, StoreError> {
        let results = self.0.read_batch(digests).await?;
        results.iter().filter_map(|(_, r)| r.as_ref().ok()).for_each(|data| fetched(data.len()));
        Ok(results)
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        self.0.write_batch(blobs).await
    }

    async fn write_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError> {
        self.0.write_file(digest, path).await
    }
}
