//! Small protos kept one file each under a root — the action cache and the
//! asset store.
//!
//! An entry file is a record: a magic tag, the BLAKE3 hash of the payload,
//! the payload (the encoded proto). Writes go to a temp file that is
//! renamed into place; durable entries (the default) are synced, and their
//! directory after the rename, before the write counts as done, so a crash
//! leaves either the old entry or the new one. Entries opened
//! [`EntryFiles::unsynced`] skip both syncs: a power loss may lose the
//! entries of the last seconds, or leave them empty or torn. A file that is
//! not a complete record (empty or torn by a power loss, decayed, or
//! written by an older casbuild) is deleted and reads as absent — never as
//! an empty, "successful" entry.
//!
//! Entries have a byte budget (their share of the disk budget): the least
//! recently read or written go first beyond it. Recency survives a restart
//! as well as file times tell it (entries are reindexed oldest first).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use prost::Message;

use crate::store::StoreError;

/// A directory of proto entries with a `tmp/` for writes in progress.
#[derive(Clone, Debug)]
pub struct EntryFiles {
    root: PathBuf,
    index: Arc<Mutex<Index>>,
    /// Whether a write is synced before it returns.
    durable: bool,
}

/// What the entries cost on disk, least recently used first.
#[derive(Debug)]
struct Index {
    entries: LruCache<PathBuf, u64>,
    bytes: u64,
    budget: u64,
}

/// What an entry file costs: its bytes rounded up to whole 4 KiB blocks.
fn cost(len: u64) -> u64 {
    len.max(1).div_ceil(4096) * 4096
}

impl Index {
    fn put(&mut self, path: PathBuf, cost: u64) {
        if let Some(old) = self.entries.put(path, cost) {
            self.bytes -= old;
        }
        self.bytes += cost;
    }

    fn forget(&mut self, path: &Path) {
        if let Some(old) = self.entries.pop(path) {
            self.bytes -= old;
        }
    }

    /// The entries to delete so that the rest fit the budget (never `keep`).
    fn over_budget(&mut self, keep: &Path) -> Vec<PathBuf> {
        let mut evicted = Vec::new();
        while self.bytes > self.budget && self.entries.len() > 1 {
            let Some((path, cost)) = self.entries.pop_lru() else { break };
            if path == keep {
                self.entries.put(path, cost);
                self.entries.promote(keep);
                continue;
            }
            self.bytes -= cost;
            evicted.push(path);
        }
        evicted
    }
}

impl EntryFiles {
    /// Opens (creating if needed) `root`, clearing writes a crash left and
    /// indexing the entries there; beyond `budget` bytes the least recently
    /// used are deleted. Blocking.
    pub fn open(root: &Path, budget: u64) -> Result<Self, StoreError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(format!("clear {}", tmp.display()), e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
        let mut found = Vec::new();
        scan(&root.join("entries"), &mut found);
        found.sort_by_key(|(time, _, _)| *time);
        let mut index = Index { entries: LruCache::unbounded(), bytes: 0, budget };
        for (_, path, len) in found {
            index.put(path, cost(len));
        }
        for path in index.over_budget(Path::new("")) {
            let _ = std::fs::remove_file(&path);
        }
        Ok(EntryFiles { root: root.to_path_buf(), index: Arc::new(Mutex::new(index)), durable: true })
    }

    /// Writes return without syncing (for entries whose loss costs only
    /// their recomputation: a torn one still reads as absent).
    pub fn unsynced(mut self) -> Self {
        self.durable = false;
        self
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes the entries take (in whole blocks), and how many there are.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.index();
        (index.bytes, index.entries.len())
    }

    /// The root entries live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entry at `path`, if it exists and is a complete record.
    pub async fn read<M: Message + Default>(&self, path: &Path) -> Result<Option<M>, StoreError> {
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index().forget(path);
                return Ok(None);
            }
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        };
        match unframe(&bytes).and_then(|payload| M::decode(payload).map_err(|e| e.to_string())) {
            Ok(entry) => {
                self.index().entries.promote(path);
                Ok(Some(entry))
            }
            Err(e) => {
                tracing::error!("entry {} is not a complete record ({e}): removed", path.display());
                self.index().forget(path);
                let _ = tokio::fs::remove_file(path).await;
                Ok(None)
            }
        }
    }

    /// Stores (or replaces) the entry at `path`.
    pub async fn write<M: Message>(&self, path: &Path, entry: &M) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let record = frame(&entry.encode_to_vec());
        let path = path.to_path_buf();
        let (index, durable) = (self.index.clone(), self.durable);
        let write = move || -> Result<(), StoreError> {
            use std::io::Write;
            let dir = path.parent().expect("entry paths have a parent");
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
            let written = std::fs::File::create(&tmp)
                .and_then(|mut file| {
                    file.write_all(&record).and_then(|()| if durable { file.sync_data() } else { Ok(()) })
                })
                .and_then(|()| std::fs::rename(&tmp, &path))
                // The rename itself is durable once the directory is synced.
                .and_then(|()| if durable { std::fs::File::open(dir)?.sync_all() } else { Ok(()) });
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written.map_err(|e| StoreError::io(format!("write {}", path.display()), e))?;
            let evicted = {
                let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
                index.put(path.clone(), cost(record.len() as u64));
                index.over_budget(&path)
            };
            for old in evicted {
                let _ = std::fs::remove_file(&old);
            }
            Ok(())
        };
        tokio::task::spawn_blocking(write)
            .await
            .map_err(|e| StoreError::io("entry write task", std::io::Error::other(e.to_string())))?
    }
}

/// Every entry file under `dir`, with its modification time and length.
fn scan(dir: &Path, found: &mut Vec<(std::time::SystemTime, PathBuf, u64)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            scan(&entry.path(), found);
        } else if meta.is_file() {
            found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), entry.path(), meta.len()));
        }
    }
}

/// Tags an entry record (and its format version).
const MAGIC: &[u8; 8] = b"casbent1";

/// A record of `payload`: magic, BLAKE3 of the payload, payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(MAGIC.len() + 32 + payload.len());
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(blake3::hash(payload).as_bytes());
    record.extend_from_slice(payload);
    record
}

/// The payload of a complete record.
fn unframe(record: &[u8]) -> Result<&[u8], String> {
    let rest = record.strip_prefix(MAGIC.as_slice()).ok_or("no record header")?;
    if rest.len() < 32 {
        return Err("the record is cut short".into());
    }
    let (hash, payload) = rest.split_at(32);
    if blake3::hash(payload).as_bytes() != hash {
        return Err("the record's checksum does not match".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_beyond_the_budget_go_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let files = EntryFiles::open(dir.path(), 3 * 4096).unwrap();
        let path = |n: u32| dir.path().join("entries").join(format!("{n}"));
        let entry = |n: u32| casbuild_proto::reapi::Digest { hash: format!("entry {n}"), size_bytes: n.into() };
        for n in 0..3 {
            files.write(&path(n), &entry(n)).await.unwrap();
        }
        // Reading 0 makes 1 the least recently used.
        assert!(files.read::<casbuild_proto::reapi::Digest>(&path(0)).await.unwrap().is_some());
        files.write(&path(3), &entry(3)).await.unwrap();
        let present: Vec<bool> = (0..4).map(|n| path(n).exists()).collect();
        assert_eq!(present, [true, false, true, true]);
        assert_eq!(files.usage(), (3 * 4096, 3));
        assert!(files.read::<casbuild_proto::reapi::Digest>(&path(1)).await.unwrap().is_none());

        // Reopened with a smaller budget, the oldest files go.
        drop(files);
        let files = EntryFiles::open(dir.path(), 2 * 4096).unwrap();
        assert_eq!(files.usage(), (2 * 4096, 2));
        assert!(path(3).exists());
    }

    #[test]
    fn only_complete_records_are_read_back() {
        let record = frame(b"payload");
        assert_eq!(unframe(&record).unwrap(), b"payload");
        assert_eq!(unframe(&frame(b"")).unwrap(), b"");
        assert!(unframe(b"").is_err(), "an empty (torn) file is not an empty entry");
        assert!(unframe(&record[..record.len() - 1]).is_err());
        let mut flipped = record.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unframe(&flipped).is_err());
    }
}
