//! Small protos kept one file each under a root — the action cache and the
//! asset store.
//!
//! An entry file is a record: a magic tag, the BLAKE3 hash of the payload,
//! the payload (the encoded proto). Writes go to a temp file that is synced,
//! renamed into place, and its directory synced, before the write counts as
//! done; so a crash leaves either the old entry or the new one. A file that
//! is not a complete record (empty or torn by a power loss, decayed, or
//! written by an older casbuild) is deleted and reads as absent — never as
//! an empty, "successful" entry.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::store::StoreError;

/// A directory of proto entries with a `tmp/` for writes in progress.
#[derive(Clone, Debug)]
pub struct EntryFiles {
    root: PathBuf,
}

impl EntryFiles {
    /// Opens (creating if needed) `root`, clearing writes a crash left. Blocking.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(format!("clear {}", tmp.display()), e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
        Ok(EntryFiles { root: root.to_path_buf() })
    }

    /// The root entries live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entry at `path`, if it exists and is a complete record.
    pub async fn read<M: Message + Default>(&self, path: &Path) -> Result<Option<M>, StoreError> {
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        };
        match unframe(&bytes).and_then(|payload| M::decode(payload).map_err(|e| e.to_string())) {
            Ok(entry) => Ok(Some(entry)),
            Err(e) => {
                tracing::error!("entry {} is not a complete record ({e}): removed", path.display());
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
        let write = move || -> Result<(), StoreError> {
            use std::io::Write;
            let dir = path.parent().expect("entry paths have a parent");
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
            let written = std::fs::File::create(&tmp)
                .and_then(|mut file| file.write_all(&record).and_then(|()| file.sync_data()))
                .and_then(|()| std::fs::rename(&tmp, &path))
                // The rename itself is durable once the directory is synced.
                .and_then(|()| std::fs::File::open(dir)?.sync_all());
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written.map_err(|e| StoreError::io(format!("write {}", path.display()), e))
        };
        tokio::task::spawn_blocking(write)
            .await
            .map_err(|e| StoreError::io("entry write task", std::io::Error::other(e.to_string())))?
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
