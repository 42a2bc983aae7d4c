//! Fetching an input root's files before anything opens them.
//!
//! The runner knows, from an earlier run of the same command, which files it
//! is likely to open (its access profile). A [`Prefetch`] walks those paths in
//! a freshly registered input root and makes each file's blob local, several
//! at a time, while the command starts up; the command's own opens then join
//! the fetches in flight or find the blobs cached. Nothing here is logged in
//! the root's access log, and nothing the command sees changes: a path that
//! does not exist, is not a file, or would take the prefetch over its byte
//! bound is skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::blob_cache::{BlobCache, FetchError};
use crate::filesystem::MountState;
use crate::inodes::{Node, NodeKind};

/// How much one prefetch may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchLimits {
    /// The most bytes of file contents it asks for (files already local count
    /// too); a file that does not fit is skipped.
    pub max_bytes: u64,
    /// Paths resolved and fetched at once.
    pub concurrency: usize,
}

impl Default for PrefetchLimits {
    fn default() -> Self {
        PrefetchLimits { max_bytes: 256 << 20, concurrency: 16 }
    }
}

/// What a prefetch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Files made local (or found local).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Paths that name nothing, or no regular file, in this input root.
    pub missing: u64,
    /// Files left out because they would have taken it over its byte bound.
    pub over_bound: u64,
    /// Files or directories whose fetch failed (the command's own open will
    /// try again and report it).
    pub failed: u64,
}

/// A prefetch running in the background; stops when dropped.
pub struct Prefetch {
    task: Option<JoinHandle<PrefetchStats>>,
}

impl Prefetch {
    /// Waits until every path has been handled and says what was done.
    pub async fn finish(mut self) -> PrefetchStats {
        let task = self.task.take().expect("a prefetch is finished once");
        task.await.unwrap_or_default()
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            // Fetches already started still complete into the cache.
            task.abort();
        }
    }
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    bytes: AtomicU64,
    missing: AtomicU64,
    over_bound: AtomicU64,
    failed: AtomicU64,
    /// Bytes promised to files so far, against the bound.
    reserved: AtomicU64,
}

/// Starts fetching `paths` (relative to the input root `root`) on the
/// mount's runtime.
pub(crate) fn start(state: Arc<MountState>, root: Arc<Node>, paths: Vec<String>, limits: PrefetchLimits) -> Prefetch {
    let runtime = state.runtime.clone();
    let task = runtime.spawn(async move {
        let counters = Counters::default();
        futures::stream::iter(paths)
            .for_each_concurrent(limits.concurrency.max(1), |path| {
                let (state, root, counters) = (&state, &root, &counters);
                async move { fetch_one(state, root, &path, limits.max_bytes, counters).await }
            })
            .await;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        PrefetchStats {
            files: load(&counters.files),
            bytes: load(&counters.bytes),
            missing: load(&counters.missing),
            over_bound: load(&counters.over_bound),
            failed: load(&counters.failed),
        }
    });
    Prefetch { task: Some(task) }
}

async fn fetch_one(state: &MountState, root: &Arc<Node>, path: &str, max_bytes: u64, counters: &Counters) {
    let node = match resolve(state, root, path).await {
        Ok(Some(node)) => node,
        Ok(None) => return bump(&counters.missing),
        Err(e) => {
            tracing::debug!("prefetching {path:?}: {e}");
            return bump(&counters.failed);
        }
    };
    let (NodeKind::File(file), Some(scope)) = (&node.kind, &node.scope) else { return bump(&counters.missing) };
    let size = file.digest.size_bytes;
    let fits = counters
        .reserved
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| used.checked_add(size).filter(|&t| t <= max_bytes));
    if fits.is_err() {
        return bump(&counters.over_bound);
    }
    match warm(&scope.cache, &file.digest).await {
        Ok(()) => {
            bump(&counters.files);
            counters.bytes.fetch_add(size, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!("prefetching {path:?}: {e}");
            bump(&counters.failed);
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Makes `digest` local, waiting for a streamed download to complete.
async fn warm(cache: &BlobCache, digest: &casbuild_cas::digest::Digest) -> Result<(), FetchError> {
    let blob = cache.open(digest).await?;
    if let Some(download) = &blob.download {
        download.finished().await.map_err(FetchError::Failed)?;
    }
    Ok(())
}

/// The node at `path` below `root`, loading directories on the way; `None`
/// when a component is missing or not a directory. Symlinks are not followed:
/// the command's own lookups resolve them.
async fn resolve(state: &MountState, root: &Arc<Node>, path: &str) -> Result<Option<Arc<Node>>, FetchError> {
    let mut node = root.clone();
    for name in path.split('/').filter(|c| !c.is_empty()) {
        let NodeKind::Dir(dir) = &node.kind else { return Ok(None) };
        let children = state.children(&node, dir).await?;
        let Some(child) = children.get(name).and_then(|ino| state.inodes.get(ino)) else { return Ok(None) };
        node = child;
    }
    Ok(Some(node))
}
