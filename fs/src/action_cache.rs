//! The action cache: action digest → ActionResult, per instance, on disk.
//!
//! Entries are small protos stored one file each, written to a temp file and
//! renamed into place, so a crash never leaves half an entry. An entry that no
//! longer decodes is deleted and treated as a miss.

use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::entry_files::EntryFiles;
use crate::namespace::instance_dir;
use crate::store::StoreError;
use casbuild_proto::reapi::ActionResult;

/// A persistent map from action digests to their results.
#[derive(Clone, Debug)]
pub struct ActionCache {
    files: EntryFiles,
}

impl ActionCache {
    /// Opens (creating if needed) the cache under `root`. Blocking.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Ok(ActionCache { files: EntryFiles::open(root)? })
    }

    fn entry_path(&self, instance: &str, action: &Digest) -> PathBuf {
        let hash = action.hash_hex();
        self.files
            .root()
            .join("entries")
            .join(instance_dir(instance))
            .join(action.function.name())
            .join(&hash[..2])
            .join(format!("{hash}-{}", action.size_bytes))
    }

    /// The stored result of `action` in `instance`, if any.
    pub async fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>, StoreError> {
        self.files.read(&self.entry_path(instance, action)).await
    }

    /// Stores (or replaces) the result of `action` in `instance`.
    pub async fn update(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<(), StoreError> {
        self.files.write(&self.entry_path(instance, action), result).await
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
