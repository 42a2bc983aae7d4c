//! A blob store on local disk: the durable tier.
//!
//! Layout under the root:
//!
//! ```text
//! cas/{instance-dir}/{function}/{hash[0..2]}/{hash}-{size}   one file per blob
//! tmp/{uuid}                                                 writes in progress
//! ```
//!
//! Writes go to `tmp/` and are renamed into place only after the bytes have
//! been verified and synced to disk (`fdatasync`), so a reader never sees
//! half a blob, a blob that counts as present survives a power loss, and a
//! crash leaves at most garbage in `tmp/` (cleared at the next open). A
//! store opened as a cache ([`DiskStore::open_cache`]) skips the sync: after
//! a power loss a blob may be torn, and is then found by the hash check below.
//!
//! Every read of a whole blob through [`BlobStore`] verifies its hash. The
//! unverified ways out — [`DiskStore::open_trusted`] (the FUSE mount hands the
//! file to the kernel) and ranged reads of large blobs (a part cannot be
//! checked against the digest of the whole without reading all of it) —
//! trust only what this process wrote or has already checked: a blob found
//! on disk at open (written before a restart, perhaps torn or decayed since)
//! is hashed on its first trusted open, and a file that does not match is
//! deleted and reported absent, so the caller fetches it again.
//!
//! An in-memory index (an LRU of sizes) answers `find_missing` without touching
//! the disk and decides eviction once the byte budget is exceeded. It is rebuilt
//! from the files at open, ordered by modification time, which reads refresh.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use lru::LruCache;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::digest::{Digest, DigestFunction};
use crate::namespace::{instance_dir, Namespaces};
use crate::store::tier_metrics::TierMetrics;
use crate::store::verify::verified;
use crate::store::{chunked, read_range, BlobStore, BlobStream, BlobWriter, StoreError, Verifier, CHUNK_SIZE};

/// Blobs up to this size are read and verified whole before being returned;
/// larger ones are streamed, with the final chunk held back until verified.
const WHOLE_READ_MAX: u64 = 4 << 20;

/// The metrics of disk stores (the coordinator's, a worker's cache).
const DISK: TierMetrics = TierMetrics("disk");

/// A size-bounded, verified, restart-safe blob store on local disk. Cloning
/// gives another handle onto the same files.
#[derive(Clone)]
pub struct DiskStore {
    shared: Arc<Shared>,
    namespace: u32,
}

struct Shared {
    root: PathBuf,
    /// Whether a blob is synced to disk before it counts as present.
    durable: bool,
    index: Mutex<Index>,
}

/// A blob in one namespace.
type BlobKey = (u32, Digest);

struct Index {
    blobs: LruCache<BlobKey, ()>,
    /// Blobs in use by a reader that holds their file open: never evicted.
    pins: HashMap<BlobKey, u32>,
    /// Blobs found on disk at open and not hashed since.
    unverified: HashSet<BlobKey>,
    bytes: u64,
    budget: u64,
    namespaces: Namespaces,
}

impl DiskStore {
    /// Opens (creating if needed) a store under `root` holding at most `budget`
    /// bytes, and indexes the blobs already there. This scans the directory, so
    /// call it from a blocking context.
    pub fn open(root: &Path, budget: u64) -> Result<Self, StoreError> {
        Self::open_as(root, budget, true)
    }

    /// [`DiskStore::open`] for a cache of blobs whose source of truth is
    /// elsewhere (a worker's copy of the CAS): nothing is synced, so a write
    /// costs no `fdatasync`. A crash may then leave blobs torn or empty;
    /// every blob found at open is hashed on its first use anyway, so such a
    /// file is found, deleted and fetched again — never served.
    pub fn open_cache(root: &Path, budget: u64) -> Result<Self, StoreError> {
        Self::open_as(root, budget, false)
    }

    fn open_as(root: &Path, budget: u64, durable: bool) -> Result<Self, StoreError> {
        let cas = root.join("cas");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&cas).map_err(|e| StoreError::io(format!("create {}", cas.display()), e))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(format!("clear {}", tmp.display()), e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;

        let mut namespaces = Namespaces::default();
        let mut found = scan(&cas, &mut namespaces)?;
        found.sort_by_key(|(_, mtime)| *mtime);
        let mut index = Index {
            blobs: LruCache::unbounded(),
            pins: HashMap::new(),
            unverified: HashSet::new(),
            bytes: 0,
            budget,
            namespaces,
        };
        for (key, _) in found {
            index.blobs.put(key, ());
            index.unverified.insert(key);
            index.bytes += key.1.size_bytes;
        }
        let namespace = index.namespaces.id(&instance_dir(""));
        let shared = Shared { root: root.to_path_buf(), durable, index: Mutex::new(index) };
        let store = DiskStore { shared: Arc::new(shared), namespace };
        let mut index = store.lock();
        store.evict_over_budget(&mut index);
        DISK.holds(index.blobs.len(), index.bytes, index.budget);
        drop(index);
        Ok(store)
    }

    /// A handle onto the same files (and budget) for another instance.
    pub fn namespace(&self, instance: &str) -> Self {
        let namespace = self.lock().namespaces.id(&instance_dir(instance));
        DiskStore { shared: self.shared.clone(), namespace }
    }

    /// Whether `instance` has a namespace already (blobs on disk, or a view
    /// handed out), and how many namespaces there are.
    pub fn namespace_known(&self, instance: &str) -> (bool, usize) {
        let index = self.lock();
        (index.namespaces.contains(&instance_dir(instance)), index.namespaces.len())
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.lock().budget
    }

    /// Bytes held across all namespaces.
    pub fn bytes_used(&self) -> u64 {
        self.lock().bytes
    }

    /// Where the blob's file lives (whether or not it exists); for tools and tests.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let index = self.lock();
        self.blob_path(&index, self.namespace, digest)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.shared.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blob_path(&self, index: &Index, namespace: u32, digest: &Digest) -> PathBuf {
        let hash = digest.hash_hex();
        self.shared
            .root
            .join("cas")
            .join(index.namespaces.dir(namespace))
            .join(digest.function.name())
            .join(&hash[..2])
            .join(format!("{hash}-{}", digest.size_bytes))
    }

    /// Removes least recently used blobs until the total fits the budget,
    /// skipping pinned ones (the total may stay over budget while they are).
    fn evict_over_budget(&self, index: &mut Index) {
        if index.bytes <= index.budget {
            return;
        }
        let mut excess = index.bytes - index.budget;
        let mut victims = Vec::new();
        for (key, ()) in index.blobs.iter().rev() {
            if excess == 0 {
                break;
            }
            if !index.pins.contains_key(key) {
                victims.push(*key);
                excess = excess.saturating_sub(key.1.size_bytes);
            }
        }
        let (count, bytes) = (victims.len() as u64, victims.iter().map(|k| k.1.size_bytes).sum());
        for key in victims {
            index.blobs.pop(&key);
            index.bytes -= key.1.size_bytes;
            let path = self.blob_path(index, key.0, &key.1);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("evicting {}: {e}", path.display());
            }
        }
        DISK.evicted(count, bytes);
    }

    /// Keeps `digest` from being evicted until the guard is dropped; pins nest.
    /// A blob may be pinned before it is written, so that it cannot be evicted
    /// between arriving and being opened.
    pub fn pin(&self, digest: &Digest) -> PinGuard {
        *self.lock().pins.entry((self.namespace, *digest)).or_insert(0) += 1;
        PinGuard { store: self.clone(), digest: *digest }
    }

    /// Forgets a blob whose file is gone or corrupt, deleting what is left.
    fn discard(&self, digest: &Digest) {
        let mut index = self.lock();
        if index.blobs.pop(&(self.namespace, *digest)).is_some() {
            index.bytes -= digest.size_bytes;
        }
        let path = self.blob_path(&index, self.namespace, digest);
        let _ = std::fs::remove_file(path);
    }

    /// Opens a blob's file for a caller that serves its bytes itself (the FUSE
    /// mount hands the file to the kernel). The length is checked; the hash
    /// was verified when this process wrote the blob, and re-hashing on every
    /// open would make warm reads as slow as cold ones. A blob from before
    /// the store was opened is hashed once, here, before it is trusted; a
    /// corrupt one is deleted and reported absent. `Ok(None)` when absent.
    pub fn open_trusted(&self, digest: &Digest) -> Result<Option<File>, StoreError> {
        if digest.is_empty_blob() {
            return Ok(None);
        }
        let Some(mut file) = self.open_blob(digest)? else { return Ok(None) };
        let key = (self.namespace, *digest);
        if self.lock().unverified.contains(&key) {
            if !matches_digest(&mut file, digest)? {
                let _ = self.corrupt(digest);
                return Ok(None);
            }
            self.lock().unverified.remove(&key);
        }
        Ok(Some(file))
    }

    /// Opens a blob for reading, checking its length; `Ok(None)` when absent.
    fn open_blob(&self, digest: &Digest) -> Result<Option<File>, StoreError> {
        let path = {
            let mut index = self.lock();
            if index.blobs.get(&(self.namespace, *digest)).is_none() {
                return Ok(None);
            }
            self.blob_path(&index, self.namespace, digest)
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.discard(digest);
                return Ok(None);
            }
            Err(e) => return Err(StoreError::io(format!("open {}", path.display()), e)),
        };
        let len = file.metadata().map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?.len();
        if len != digest.size_bytes {
            tracing::error!("{} has {len} bytes, not {}: removed", path.display(), digest.size_bytes);
            self.discard(digest);
            return Ok(None);
        }
        // Refresh the time the restart scan orders blobs by; failing is harmless.
        let _ = file.set_modified(SystemTime::now());
        Ok(Some(file))
    }

    fn corrupt(&self, digest: &Digest) -> StoreError {
        self.lock().unverified.remove(&(self.namespace, *digest));
        tracing::error!("blob {digest:?} on disk does not match its digest: removed");
        self.discard(digest);
        StoreError::NotFound { digest: *digest, detail: "its file on disk was corrupt and has been removed".into() }
    }

    /// Reads and verifies a whole (small) blob.
    fn read_whole(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        let mut file = self.open_blob(digest)?.ok_or_else(|| StoreError::not_found(digest))?;
        let mut data = Vec::with_capacity(digest.size_bytes as usize);
        file.read_to_end(&mut data).map_err(|e| StoreError::io(format!("read blob {digest:?}"), e))?;
        if Verifier::check(*digest, &data).is_err() {
            return Err(self.corrupt(digest));
        }
        Ok(Bytes::from(data))
    }

    /// Writes, syncs (if durable) and removes a small file where blobs are
    /// written: whether the store takes writes right now.
    pub fn probe_writable(&self) -> Result<(), StoreError> {
        let path = self.new_temp_path();
        let result = File::create(&path)
            .and_then(|mut file| file.write_all(b"probe").and_then(|()| self.sync(&file)))
            .map_err(|e| StoreError::io(format!("write {}", path.display()), e));
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Syncs a written file's data, unless this store is a cache.
    fn sync(&self, file: &File) -> std::io::Result<()> {
        if self.shared.durable {
            file.sync_data()
        } else {
            Ok(())
        }
    }

    /// Moves a verified temp file into place and indexes it. The renaming
    /// happens outside the index lock, which every lookup takes: a slow
    /// metadata operation must not stall readers. Two writers of one blob may
    /// both rename (same bytes; the later file replaces the earlier, whose
    /// readers keep their handle); it is indexed once. The blob is pinned
    /// meanwhile, so an eviction (of a copy another writer indexed) can never
    /// delete the file this one has just put in place.
    fn publish(&self, tmp: &Path, digest: &Digest) -> Result<(), StoreError> {
        let _publishing = self.pin(digest);
        let key = (self.namespace, *digest);
        let path = {
            let index = self.lock();
            if index.blobs.peek(&key).is_some() {
                return Ok(()); // another writer won; the caller removes its temp file
            }
            self.blob_path(&index, self.namespace, digest)
        };
        let dir = path.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        std::fs::rename(tmp, &path).map_err(|e| StoreError::io(format!("rename into {}", path.display()), e))?;
        let mut index = self.lock();
        if index.blobs.put(key, ()).is_none() {
            index.bytes += digest.size_bytes;
            DISK.stored(digest.size_bytes);
        }
        self.evict_over_budget(&mut index);
        DISK.holds(index.blobs.len(), index.bytes, index.budget);
        Ok(())
    }

    /// Starts writing `digest` and opens a second handle on the file being
    /// written, for a reader that follows the write (the mount serves a cold
    /// file while it streams in). Every `write` of the returned writer is in
    /// the file when it returns, so the bytes below `written()` can be read
    /// through the handle. None of them is verified until `commit`, which
    /// fails and removes the file if the whole blob does not match; the
    /// handle stays readable after the commit moves the file into place.
    pub async fn begin_followed_write(&self, digest: &Digest) -> Result<(Box<dyn BlobWriter>, File), StoreError> {
        let writer = self.writer(digest, false).await?;
        let path = writer.tmp.clone();
        let reader =
            blocking(move || File::open(&path).map_err(|e| StoreError::io(format!("open {}", path.display()), e)))
                .await?;
        Ok((Box::new(writer), reader))
    }

    /// A writer into a new temp file; `gather` lets it collect small chunks
    /// into larger disk writes.
    async fn writer(&self, digest: &Digest, gather: bool) -> Result<DiskWriter, StoreError> {
        self.check_budget(digest)?;
        let tmp = self.new_temp_path();
        let path = tmp.clone();
        let file =
            blocking(move || File::create(&path).map_err(|e| StoreError::io(format!("create {}", path.display()), e)))
                .await?;
        Ok(DiskWriter {
            store: self.clone(),
            digest: *digest,
            tmp,
            state: Some((file, Verifier::new(*digest))),
            pending: BytesMut::new(),
            gather,
            written: 0,
        })
    }

    fn new_temp_path(&self) -> PathBuf {
        self.shared.root.join("tmp").join(uuid::Uuid::new_v4().to_string())
    }

    fn check_budget(&self, digest: &Digest) -> Result<(), StoreError> {
        let budget = self.lock().budget;
        if digest.size_bytes > budget {
            return Err(StoreError::ResourceExhausted(format!(
                "blob {digest:?} ({} bytes) is larger than the disk budget of {budget} bytes",
                digest.size_bytes
            )));
        }
        Ok(())
    }

    /// Sends a blob's file in chunks; stops early when the reader goes away.
    /// Chunks are read into fresh vectors (no zeroing) that later convert to
    /// protobuf bytes fields without a copy.
    fn send_chunks(file: File, digest: Digest, start: u64, end: u64, tx: mpsc::Sender<Result<Bytes, StoreError>>) {
        use std::io::Seek;
        let mut file = file;
        if let Err(e) = file.seek(std::io::SeekFrom::Start(start)) {
            let _ = tx.blocking_send(Err(StoreError::io(format!("seek in blob {digest:?}"), e)));
            return;
        }
        let mut file = file.take(u64::MAX);
        let mut left = end - start;
        loop {
            let mut buf = Vec::with_capacity(CHUNK_SIZE);
            file.set_limit(left.min(CHUNK_SIZE as u64));
            match file.read_to_end(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    left -= n as u64;
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(StoreError::io(format!("read blob {digest:?}"), e)));
                    return;
                }
            }
        }
    }
}

/// Keeps one blob of a [`DiskStore`] from eviction while it lives.
pub struct PinGuard {
    store: DiskStore,
    digest: Digest,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut index = self.store.lock();
        let key = (self.store.namespace, self.digest);
        if let Some(count) = index.pins.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                index.pins.remove(&key);
                self.store.evict_over_budget(&mut index);
            }
        }
    }
}

/// Finds every blob file under `cas/` with its modification time. Files whose name or
/// length is wrong are deleted.
fn scan(cas: &Path, namespaces: &mut Namespaces) -> Result<Vec<(BlobKey, SystemTime)>, StoreError> {
    let mut found = Vec::new();
    let read_dir = |path: &Path| -> Result<Vec<std::fs::DirEntry>, StoreError> {
        std::fs::read_dir(path)
            .and_then(|entries| entries.collect())
            .map_err(|e| StoreError::io(format!("scan {}", path.display()), e))
    };
    for ns_entry in read_dir(cas)? {
        let namespace = namespaces.id(&ns_entry.file_name().to_string_lossy());
        for fn_entry in read_dir(&ns_entry.path())? {
            let Ok(function) = fn_entry.file_name().to_string_lossy().parse::<DigestFunction>() else { continue };
            for shard in read_dir(&fn_entry.path())? {
                for file in read_dir(&shard.path())? {
                    let name = file.file_name().to_string_lossy().into_owned();
                    let meta =
                        file.metadata().map_err(|e| StoreError::io(format!("stat {}", file.path().display()), e))?;
                    let digest = name
                        .split_once('-')
                        .and_then(|(hash, size)| Digest::from_hex(function, hash, size.parse().ok()?).ok());
                    match digest {
                        Some(digest) if meta.len() == digest.size_bytes => {
                            found.push(((namespace, digest), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                        }
                        _ => {
                            tracing::warn!("removing stray file {}", file.path().display());
                            let _ = std::fs::remove_file(file.path());
                        }
                    }
                }
            }
        }
    }
    Ok(found)
}

/// Whether `file`'s contents hash to `digest` (read from the start; the
/// file is rewound after).
fn matches_digest(file: &mut File, digest: &Digest) -> Result<bool, StoreError> {
    use std::io::Seek;
    let fail = |e| StoreError::io(format!("verify blob {digest:?}"), e);
    let actual = crate::local_tree::hash_open_file(file, digest.function).map_err(fail)?;
    file.rewind().map_err(fail)?;
    Ok(actual == *digest)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::io("disk task", std::io::Error::other(e.to_string())))?
}

#[async_trait]
impl BlobStore for DiskStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let mut index = self.lock();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && index.blobs.get(&(self.namespace, **d)).is_none())
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
        if digest.is_empty_blob() {
            return Ok(chunked(Bytes::new(), 0, 0));
        }
        let (start, end) = read_range(digest, offset, limit)?;
        let digest = *digest;
        let store = self.clone();
        // Counted when asked for: a reader that stops early still took the file.
        DISK.read(end - start);
        if digest.size_bytes <= WHOLE_READ_MAX {
            let data = blocking(move || store.read_whole(&digest)).await?;
            return Ok(chunked(data, start, end));
        }
        // A part is served from a file verified when written or hashed once
        // since; the whole blob is hashed as it is read.
        let whole = start == 0 && end == digest.size_bytes;
        let opener = store.clone();
        let file = blocking(move || if whole { opener.open_blob(&digest) } else { opener.open_trusted(&digest) })
            .await?
            .ok_or_else(|| StoreError::not_found(&digest))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || DiskStore::send_chunks(file, digest, start, end, tx));
        let stream = ReceiverStream::new(rx).boxed();
        if !whole {
            return Ok(stream);
        }
        Ok(verified(stream, digest, move || store.corrupt(&digest)))
    }

    async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        Ok(Box::new(self.writer(digest, true).await?))
    }

    /// One blocking task for the whole blob: verify, write, rename.
    async fn write(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        Verifier::check(*digest, &data)?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        self.check_budget(digest)?;
        let (store, digest, tmp) = (self.clone(), *digest, self.new_temp_path());
        blocking(move || {
            let result = File::create(&tmp)
                .and_then(|mut file| file.write_all(&data).and_then(|()| store.sync(&file)))
                .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))
                .and_then(|()| store.publish(&tmp, &digest));
            let _ = std::fs::remove_file(&tmp);
            result
        })
        .await
    }
}

/// Writes into a temp file, hashing on the way; `commit` renames it into place.
struct DiskWriter {
    store: DiskStore,
    digest: Digest,
    tmp: PathBuf,
    /// The temp file and hash state; out on loan while a flush runs.
    state: Option<(File, Verifier)>,
    /// Small chunks gathered into one disk write.
    pending: BytesMut,
    /// Whether small chunks are gathered (not when a reader follows the write).
    gather: bool,
    written: u64,
}

impl DiskWriter {
    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = self.pending.split().freeze();
        self.flush_chunk(data).await
    }

    /// Hashes and writes `data` on a blocking thread.
    async fn flush_chunk(&mut self, data: Bytes) -> Result<(), StoreError> {
        let (mut file, mut verifier) =
            self.state.take().ok_or_else(|| StoreError::InvalidArgument("write after a failed write".into()))?;
        let tmp = self.tmp.clone();
        let state = blocking(move || {
            verifier.update(&data)?;
            file.write_all(&data).map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
            Ok((file, verifier))
        })
        .await?;
        self.state = Some(state);
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for DiskWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let total = self.written + chunk.len() as u64;
        if total > self.digest.size_bytes {
            return Err(StoreError::InvalidArgument(format!(
                "blob {:?}: received {total} bytes, more than its size {}",
                self.digest, self.digest.size_bytes
            )));
        }
        self.written = total;
        if !self.gather || (self.pending.is_empty() && chunk.len() >= CHUNK_SIZE / 2) {
            // Large chunks go to disk as they are, without gathering.
            return self.flush_chunk(chunk).await;
        }
        self.pending.extend_from_slice(&chunk);
        if self.pending.len() >= CHUNK_SIZE {
            self.flush().await?;
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.flush().await?;
        let (file, verifier) =
            self.state.take().ok_or_else(|| StoreError::InvalidArgument("commit after a failed write".into()))?;
        verifier.finish()?;
        if self.digest.is_empty_blob() {
            return Ok(());
        }
        let store = self.store.clone();
        let digest = self.digest;
        let tmp = self.tmp.clone();
        blocking(move || {
            // On disk before it counts as present.
            store.sync(&file).map_err(|e| StoreError::io(format!("sync {}", tmp.display()), e))?;
            drop(file);
            store.publish(&tmp, &digest)
        })
        .await
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        // After a successful commit the temp file has been renamed away.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::collect;

    fn blob(seed: u8, len: usize) -> (Digest, Bytes) {
        let data: Bytes = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into();
        (DigestFunction::Blake3.digest_of(&data), data)
    }

    #[tokio::test]
    async fn blobs_survive_reopen_in_lru_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = blob(1, 1000);
        let (b, db) = blob(2, 1000);
        {
            let store = DiskStore::open(dir.path(), 10_000).unwrap();
            store.write(&a, da.clone()).await.unwrap();
            store.write(&b, db.clone()).await.unwrap();
            // Make `a` clearly older on disk than `b`.
            let old = SystemTime::now() - std::time::Duration::from_secs(3600);
            File::open(store.path_of(&a)).unwrap().set_modified(old).unwrap();
        }
        let store = DiskStore::open(dir.path(), 1500).unwrap();
        assert_eq!(store.bytes_used(), 1000, "the older blob was evicted to fit the smaller budget");
        assert_eq!(store.find_missing(&[a, b]).await.unwrap(), vec![a]);
        assert_eq!(store.read_all(&b).await.unwrap(), db);
    }

    #[tokio::test]
    async fn pinned_blobs_are_not_evicted_until_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 2500).unwrap();
        let (a, da) = blob(4, 1000);
        let (b, db) = blob(5, 1000);
        let (c, dc) = blob(6, 1000);
        let pin = store.pin(&a);
        store.write(&a, da).await.unwrap();
        store.write(&b, db).await.unwrap();
        store.write(&c, dc).await.unwrap();
        assert_eq!(store.find_missing(&[a, b, c]).await.unwrap(), vec![b], "the oldest unpinned blob went");
        drop(pin);
        store.find_missing(&[c]).await.unwrap();
        let (d, dd) = blob(7, 1000);
        store.write(&d, dd).await.unwrap();
        assert_eq!(store.find_missing(&[a, c, d]).await.unwrap(), vec![a], "unpinned, a is evictable again");
        assert_eq!(store.bytes_used(), 2000);
    }

    #[tokio::test]
    async fn a_corrupt_small_blob_is_removed_and_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let (a, da) = blob(3, 4096);
        store.write(&a, da).await.unwrap();
        let path = store.path_of(&a);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = store.read_all(&a).await.unwrap_err();
        assert!(err.is_not_found() && err.to_string().contains("corrupt"), "{err}");
        assert!(!path.exists());
        assert_eq!(store.find_missing(&[a]).await.unwrap(), vec![a]);
    }

    #[tokio::test]
    async fn a_corrupt_large_blob_never_reaches_the_reader_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let (a, da) = blob(4, (WHOLE_READ_MAX + 3 * CHUNK_SIZE as u64 + 17) as usize);
        store.write(&a, da.clone()).await.unwrap();
        // A good read of a middle range.
        let part = collect(store.read(&a, 5_000_000, Some(10)).await.unwrap(), 10).await.unwrap();
        assert_eq!(part, da.slice(5_000_000..5_000_010));
        let path = store.path_of(&a);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let mut stream = store.read(&a, 0, None).await.unwrap();
        let mut received = 0;
        let mut failed = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => received += c.len(),
                Err(e) => failed = Some(e),
            }
        }
        assert!(received < da.len(), "the last chunk is withheld");
        assert!(failed.expect("the read fails").is_not_found());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn bad_writes_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let (a, da) = blob(5, 100);
        // Overrun.
        let mut w = store.begin_write(&a).await.unwrap();
        let err = w.write(Bytes::from(vec![0u8; 101])).await.unwrap_err();
        assert!(err.to_string().contains("more than its size"), "{err}");
        drop(w);
        // Ends early.
        let mut w = store.begin_write(&a).await.unwrap();
        w.write(da.slice(..50)).await.unwrap();
        let err = w.commit().await.unwrap_err();
        assert!(err.to_string().contains("ended before"), "{err}");
        // Wrong content.
        let err = store.write(&a, Bytes::from(vec![0u8; 100])).await.unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch(_)), "{err}");
        assert_eq!(store.find_missing(&[a]).await.unwrap(), vec![a]);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "temp files removed");
        // Larger than the whole budget.
        let small = DiskStore::open(&dir.path().join("small"), 10).unwrap();
        let err = small.write(&a, da).await.unwrap_err();
        assert!(matches!(err, StoreError::ResourceExhausted(_)), "{err}");
    }

    #[tokio::test]
    async fn concurrent_writers_of_one_blob_leave_one_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let (a, da) = blob(6, 3 << 20);
        let writers: Vec<_> = (0..16)
            .map(|_| {
                let (store, da) = (store.clone(), da.clone());
                tokio::spawn(async move { store.write(&a, da).await })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(store.bytes_used(), da.len() as u64);
        assert_eq!(store.read_all(&a).await.unwrap(), da);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn blobs_from_before_a_restart_are_hashed_before_they_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = blob(8, 5000);
        let (b, db) = blob(9, 5000);
        let (c, dc) = blob(12, 5000);
        // The durable store, and a cache that never syncs: what a crash can
        // leave in either is found before it is served.
        for durable in [true, false] {
            let root = dir.path().join(durable.to_string());
            let open = |root: &Path, budget| DiskStore::open_as(root, budget, durable);
            {
                let store = open(&root, 1 << 30).unwrap();
                store.write(&a, da.clone()).await.unwrap();
                store.write(&b, db.clone()).await.unwrap();
                store.write(&c, dc.clone()).await.unwrap();
                // Written by this process: trusted without hashing.
                let mut bytes = std::fs::read(store.path_of(&b)).unwrap();
                bytes[7] ^= 1;
                std::fs::write(store.path_of(&b), bytes).unwrap();
                // An unsynced file after a power loss: its name, no data.
                std::fs::write(store.path_of(&c), b"").unwrap();
            }
            // After the restart all are suspect; `b` decayed (same length), `c` is empty.
            let store = open(&root, 1 << 30).unwrap();
            let mut file = store.open_trusted(&a).unwrap().expect("a is intact");
            let mut read = Vec::new();
            file.read_to_end(&mut read).unwrap();
            assert_eq!(read, da, "a verified file is handed out from its start");
            for bad in [b, c] {
                assert!(store.open_trusted(&bad).unwrap().is_none(), "a corrupt blob is reported absent");
                assert!(!store.path_of(&bad).exists());
            }
            assert_eq!(store.find_missing(&[a, b, c]).await.unwrap().len(), 2);
        }
    }

    #[tokio::test]
    async fn ranged_reads_of_large_blobs_read_only_their_range_and_trust_only_checked_files() {
        let dir = tempfile::tempdir().unwrap();
        let size = WHOLE_READ_MAX as usize + (3 << 20);
        let (a, da) = blob(10, size);
        let (b, db) = blob(11, size);
        {
            let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
            store.write(&a, da.clone()).await.unwrap();
            store.write(&b, db.clone()).await.unwrap();
            for (start, len) in [(0, 10), (size as u64 - 7, 7), (5 << 20, (1 << 20) + 3)] {
                let stream = store.read(&a, start, Some(len)).await.unwrap();
                let got: Vec<u8> = stream.map(|c| c.unwrap().to_vec()).collect::<Vec<_>>().await.concat();
                assert_eq!(got, &da[start as usize..(start + len) as usize], "{len} bytes at {start}");
            }
            // Decay behind the store's back.
            let mut bytes = std::fs::read(store.path_of(&b)).unwrap();
            bytes[size - 1] ^= 1;
            std::fs::write(store.path_of(&b), bytes).unwrap();
        }
        // After a restart a part is served only from a file hashed first.
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        let refused = store.read(&b, 0, Some(10)).await.err().expect("the decayed blob is refused");
        assert!(refused.is_not_found(), "{refused}");
        let got: Vec<u8> =
            store.read(&a, 3, Some(4)).await.unwrap().map(|c| c.unwrap().to_vec()).collect::<Vec<_>>().await.concat();
        assert_eq!(got, &da[3..7]);
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_cleared_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = blob(7, 64);
        {
            let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
            store.write(&a, da).await.unwrap();
            std::fs::write(dir.path().join("tmp/half-written"), b"x").unwrap();
            // A truncated blob file, as a power loss could leave.
            std::fs::write(store.path_of(&a), b"short").unwrap();
        }
        let store = DiskStore::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.find_missing(&[a]).await.unwrap(), vec![a]);
        assert_eq!(store.bytes_used(), 0);
    }
}
