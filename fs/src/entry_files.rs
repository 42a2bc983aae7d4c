//! Small protos kept one file each under a root — the action cache and the
//! asset store. Writes go to a temp file and are renamed into place, so a
//! crash never leaves half an entry; an entry that no longer decodes is
//! deleted and reads as absent.

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

    /// The entry at `path`, if it exists and decodes.
    pub async fn read<M: Message + Default>(&self, path: &Path) -> Result<Option<M>, StoreError> {
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        };
        match M::decode(bytes.as_slice()) {
            Ok(entry) => Ok(Some(entry)),
            Err(e) => {
                tracing::error!("entry {} does not decode ({e}): removed", path.display());
                let _ = tokio::fs::remove_file(path).await;
                Ok(None)
            }
        }
    }

    /// Stores (or replaces) the entry at `path`.
    pub async fn write<M: Message>(&self, path: &Path, entry: &M) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let bytes = entry.encode_to_vec();
        let dir = path.parent().expect("entry paths have a parent").to_path_buf();
        let write = async {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
            tokio::fs::write(&tmp, &bytes).await.map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
            tokio::fs::rename(&tmp, path)
                .await
                .map_err(|e| StoreError::io(format!("rename into {}", path.display()), e))
        };
        let result = write.await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}
