//! The action cache: action digest → ActionResult, per instance, on disk.
//!
//! Entries are small protos stored one file each, written to a temp file and
//! renamed into place, so a crash never leaves half an entry. An entry that no
//! longer decodes is deleted and treated as a miss.

use std::path::{Path, PathBuf};

use casbuild_proto::reapi::ActionResult;
use prost::Message;

use crate::digest::Digest;
use crate::namespace::instance_dir;
use crate::store::StoreError;

/// A persistent map from action digests to their results.
#[derive(Clone, Debug)]
pub struct ActionCache {
    root: PathBuf,
}

impl ActionCache {
    /// Opens (creating if needed) the cache under `root`. Blocking.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(format!("clear {}", tmp.display()), e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
        Ok(ActionCache { root: root.to_path_buf() })
    }

    fn entry_path(&self, instance: &str, action: &Digest) -> PathBuf {
        let hash = action.hash_hex();
        self.root
            .join("entries")
            .join(instance_dir(instance))
            .join(action.function.name())
            .join(&hash[..2])
            .join(format!("{hash}-{}", action.size_bytes))
    }

    /// The stored result of `action` in `instance`, if any.
    pub async fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>, StoreError> {
        let path = self.entry_path(instance, action);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        };
        match ActionResult::decode(bytes.as_slice()) {
            Ok(result) => Ok(Some(result)),
            Err(e) => {
                tracing::error!("action cache entry {} does not decode ({e}): removed", path.display());
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
        }
    }

    /// Stores (or replaces) the result of `action` in `instance`.
    pub async fn update(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<(), StoreError> {
        let path = self.entry_path(instance, action);
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let bytes = result.encode_to_vec();
        let dir = path.parent().expect("entry paths have a parent").to_path_buf();
        let write = async {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
            tokio::fs::write(&tmp, &bytes).await.map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
            tokio::fs::rename(&tmp, &path)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;

    #[tokio::test]
    async fn entries_persist_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let action = DigestFunction::Sha256.digest_of(b"action");
        let result = ActionResult { exit_code: 3, ..Default::default() };
        let cache = ActionCache::open(dir.path()).unwrap();
        cache.update("a", &action, &result).await.unwrap();
        assert_eq!(cache.get("b", &action).await.unwrap(), None);
        let reopened = ActionCache::open(dir.path()).unwrap();
        assert_eq!(reopened.get("a", &action).await.unwrap(), Some(result));
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let action = DigestFunction::Blake3.digest_of(b"action");
        let cache = ActionCache::open(dir.path()).unwrap();
        cache.update("", &action, &ActionResult::default()).await.unwrap();
        std::fs::write(cache.entry_path("", &action), [0xff, 0xff, 0xff]).unwrap();
        assert_eq!(cache.get("", &action).await.unwrap(), None);
        assert!(!cache.entry_path("", &action).exists());
    }
}
