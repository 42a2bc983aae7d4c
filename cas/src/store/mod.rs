//! Blob stores: one small contract, [`BlobStore`], and layers that implement
//! or wrap it.
//!
//! - [`MemoryStore`]: an LRU of blobs with a byte budget.
//! - [`DiskStore`]: sharded files, atomic writes, LRU eviction at a byte budget,
//!   survives restarts, verifies every blob it reads back.
//! - [`TieredStore`]: a fast store over a slow one (memory over disk).
//! - [`RemoteStore`]: a REAPI CAS reached over gRPC (or gRPC over TLS).
//!
//! Every write is verified against its digest before it becomes visible; a
//! reader never sees a blob whose bytes do not hash to its name.

mod channel;
mod disk;
mod memory;
mod remote;
mod tiered;
mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};

use crate::digest::Digest;

pub use channel::{connect_channel, ConnectOptions, RemoteChannel};
pub use disk::{DiskStore, PinGuard};
pub use memory::MemoryStore;
pub use remote::{RemoteStore, RemoteStoreOptions};
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
    /// The backing store (a remote server) could not be reached in time.
    #[error("{0}")]
    Unavailable(String),
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

impl StoreError {
    /// A plain "not in the store".
    pub fn not_found(digest: &Digest) -> Self {
        StoreError::NotFound { digest: *digest, detail: String::new() }
    }

    /// An I/O error, mapping "disk full" to [`StoreError::ResourceExhausted`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc_enospc) if libc_enospc == 28 || libc_enospc == 122 => {
                StoreError::ResourceExhausted(format!("{context}: {source}"))
            }
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
