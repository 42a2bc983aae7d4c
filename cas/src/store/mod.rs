//! Blob stores: one small contract, [`BlobStore`], and layers that implement
//! or wrap it.
//!
//! - [`MemoryStore`]: an LRU of blobs with a byte budget.
//! - [`DiskStore`]: sharded files, atomic writes, LRU eviction at a byte budget,
//!   survives restarts, verifies every blob it reads back.
//! - [`TieredStore`]: a fast store over a slow one (memory over disk, or a
//!   worker's disk cache over its CAS), copying a blob up once however many
//!   callers want it at the same time.
//! - [`RemoteStore`]: a REAPI CAS reached over gRPC (or gRPC over TLS).
//! - [`ObjectBlobStore`]: blobs in an S3-compatible bucket.
//! - [`IdleTimeout`]: fails calls and reads of another store that stop making
//!   progress.
//! - [`Retrying`]: retries calls of another store that fail as unavailable,
//!   with backoff.
//!
//! A whole CAS with its instance names is a [`CasInstances`]: a remote server
//! or a coordinator's own [`crate::storage::Storage`]. Workers and the mount
//! are written against it, so `casbuild up` hands them its store directly.
//!
//! One store exposes its blobs as files, the escape hatch the FUSE mount
//! needs to hand a file to the kernel: [`DiskStore::pin`] and
//! [`DiskStore::open_trusted`]. Nothing else reaches beneath [`BlobStore`].
//!
//! Every write is verified against its digest before it becomes visible; a
//! reader never sees a blob whose bytes do not hash to its name.

mod channel;
mod disk;
mod flights;
mod idle;
mod memory;
mod object;
mod remote;
mod retry;
mod tier_metrics;
mod tiered;
mod verify;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};

use crate::digest::Digest;

pub use channel::{connect_channel, ConnectOptions, RemoteChannel};
pub use disk::{DiskStore, PinGuard};
pub use flights::Flights;
pub use idle::IdleTimeout;
pub use memory::MemoryStore;
pub use object::{ObjectBlobStore, ObjectStoreConfig};
pub use remote::{RemoteStore, RemoteStoreOptions};
pub use retry::{RetryPolicy, Retrying, RetryingCas};
pub use tiered::TieredStore;
pub use verify::Verifier;

/// A blob's bytes, delivered in chunks.
pub type BlobStream = BoxStream<'static, Result<Bytes, StoreError>>;

/// Chunk size used when a store splits a blob into a stream.
pub const CHUNK_SIZE: usize = 1 << 20;

/// A content-addressed blob store.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Returns the digests among `digests` that the store does not hold.
    /// Holding a blob counts as a use for eviction purposes.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError>;

    /// Streams `limit` bytes (all remaining when `None`) starting at `offset`.
    /// Fails with [`StoreError::NotFound`] when the blob is absent and
    /// [`StoreError::OutOfRange`] when `offset` exceeds its size.
    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError>;

    /// Starts writing a blob. Nothing is visible to readers until
    /// [`BlobWriter::commit`] has verified the bytes against `digest`.
    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError>;

    /// Writes a whole blob held in memory.
    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        let mut writer = self.begin_write(digest).await?;
        writer.write(data).await?;
        writer.commit().await
    }

    /// Reads a whole blob into memory.
    async fn read_all(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        collect(self.read(digest, 0, None).await?, digest.size_bytes).await
    }

    /// Reads many small blobs, each with its own outcome (a remote store
    /// packs them into BatchReadBlobs calls).
    async fn read_batch(&self, digests: &[Digest]) -> Result<Vec<(Digest, Result<Bytes, StoreError>)>, StoreError> {
        let mut out = Vec::with_capacity(digests.len());
        for digest in digests {
            out.push((*digest, self.read_all(digest).await));
        }
        Ok(out)
    }

    /// Writes many blobs held in memory (a remote store packs the small ones
    /// into BatchUpdateBlobs calls).
    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        for (digest, data) in blobs {
            self.write(&digest, data).await?;
        }
        Ok(())
    }

    /// Streams one file into the store without holding it in memory.
    async fn write_file(&self, digest: &Digest, path: &Path) -> Result<(), StoreError> {
        use tokio::io::AsyncReadExt;
        let io = |e| StoreError::io(format!("read {}", path.display()), e);
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        let mut writer = self.begin_write(digest).await?;
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let n = file.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            writer.write(Bytes::from(buf)).await?;
        }
        writer.commit().await
    }
}

/// Every instance of one CAS: a remote server, or a coordinator's own storage.
pub trait CasInstances: Send + Sync + 'static {
    /// The blob store of `instance`.
    fn instance(&self, instance: &str) -> SharedStore;
}

/// Writes whichever of these blobs `store` lacks: `in_memory` as given,
/// `files` read from disk (streamed when large). Returns how many blobs were
/// written.
pub async fn upload_missing(
    store: &dyn BlobStore,
    in_memory: Vec<(Digest, Bytes)>,
    files: &BTreeMap<Digest, PathBuf>,
) -> Result<usize, StoreError> {
    let all: Vec<Digest> = in_memory.iter().map(|(d, _)| *d).chain(files.keys().copied()).collect();
    let missing: HashSet<Digest> = store.find_missing(&all).await?.into_iter().collect();
    let mut small: Vec<(Digest, Bytes)> = in_memory.into_iter().filter(|(d, _)| missing.contains(d)).collect();
    for (digest, path) in files.iter().filter(|(d, _)| missing.contains(d)) {
        if digest.size_bytes <= CHUNK_SIZE as u64 {
            let data =
                tokio::fs::read(path).await.map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
            small.push((*digest, Bytes::from(data)));
        } else {
            store.write_file(digest, path).await?;
        }
    }
    store.write_batch(small).await?;
    Ok(missing.len())
}

/// An in-progress write of one blob. Dropping it without committing discards
/// everything written.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends bytes. Fails at once if they overrun the blob's declared size.
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError>;

    /// Bytes accepted so far.
    fn written(&self) -> u64;

    /// Verifies size and hash and makes the blob visible.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The blob is not in the store (or was found corrupt and removed).
    #[error("blob {digest:?} not found{}", detail_suffix(.detail))]
    NotFound {
        /// The missing blob.
        digest: Digest,
        /// Why, when it is more than plain absence.
        detail: String,
    },
    /// The written bytes do not match the digest they were written under.
    #[error("{0}")]
    DigestMismatch(String),
    /// A read offset past the end of the blob.
    #[error("offset {offset} is past the end of blob {digest:?}")]
    OutOfRange {
        /// The blob read.
        digest: Digest,
        /// The offset asked for.
        offset: u64,
    },
    /// No space left (disk full, or a blob larger than the store's budget).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request cannot be served as asked.
    #[error("{0}")]
    InvalidArgument(String),
    /// The backing store (a remote server) could not be reached in time, or
    /// failed in a way worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// A remote server refused the call for good (authentication,
    /// permission, an unimplemented method...): retrying cannot help.
    #[error("remote CAS: {code:?}: {message}")]
    Refused {
        /// The server's status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// The operation and path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

/// Errors are cloned for every caller that waited on one shared fetch; an
/// I/O error keeps its kind and text.
impl Clone for StoreError {
    fn clone(&self) -> Self {
        match self {
            StoreError::NotFound { digest, detail } => StoreError::NotFound { digest: *digest, detail: detail.clone() },
            StoreError::DigestMismatch(m) => StoreError::DigestMismatch(m.clone()),
            StoreError::OutOfRange { digest, offset } => StoreError::OutOfRange { digest: *digest, offset: *offset },
            StoreError::ResourceExhausted(m) => StoreError::ResourceExhausted(m.clone()),
            StoreError::InvalidArgument(m) => StoreError::InvalidArgument(m.clone()),
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Refused { code, message } => StoreError::Refused { code: *code, message: message.clone() },
            StoreError::Io { context, source } => StoreError::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

impl StoreError {
    /// A plain "not in the store".
    pub fn not_found(digest: &Digest) -> Self {
        StoreError::NotFound { digest: *digest, detail: String::new() }
    }

    /// An I/O error, mapping "disk full" to [`StoreError::ResourceExhausted`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => StoreError::ResourceExhausted(format!("{context}: {source}")),
            _ => StoreError::Io { context, source },
        }
    }

    /// Whether this is [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// The byte range `[start, end)` a read of `size` bytes at `offset`/`limit` covers.
pub fn read_range(digest: &Digest, offset: u64, limit: Option<u64>) -> Result<(u64, u64), StoreError> {
    let size = digest.size_bytes;
    if offset > size {
        return Err(StoreError::OutOfRange { digest: *digest, offset });
    }
    let end = match limit {
        Some(limit) => size.min(offset.saturating_add(limit)),
        None => size,
    };
    Ok((offset, end))
}

/// A stream of `data[start..end]` cut into [`CHUNK_SIZE`] pieces (no copies).
pub fn chunked(data: Bytes, start: u64, end: u64) -> BlobStream {
    let data = data.slice(start as usize..end as usize);
    let chunks: Vec<Result<Bytes, StoreError>> =
        (0..data.len()).step_by(CHUNK_SIZE).map(|at| Ok(data.slice(at..data.len().min(at + CHUNK_SIZE)))).collect();
    futures::stream::iter(chunks).boxed()
}

/// Collects a stream into one buffer; a single-chunk stream is returned
/// without copying.
pub async fn collect(mut stream: BlobStream, expected: u64) -> Result<Bytes, StoreError> {
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk?);
    }
    if chunks.len() == 1 {
        return Ok(chunks.remove(0));
    }
    let mut buf = BytesMut::with_capacity(expected as usize);
    for chunk in chunks {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// A shared, type-erased store.
pub type SharedStore = Arc<dyn BlobStore>;
