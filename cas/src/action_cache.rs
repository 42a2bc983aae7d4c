//! The action cache: action digest → ActionResult, per instance, on disk.
//!
//! Entries are small protos stored one file each as checksummed records
//! (`entry_files`), synced before a write is acknowledged. An entry that is
//! not a complete record is deleted and treated as a miss.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::digest::{Digest, DigestFunction};
use crate::entry_files::EntryFiles;
use crate::namespace::instance_dir;
use crate::store::StoreError;
use casbuild_proto::reapi::ActionResult;

/// Told of every entry written: the instance and the action digest.
pub type UpdateObserver = Box<dyn Fn(&str, &Digest) + Send + Sync>;

/// A persistent map from action digests to their results.
#[derive(Clone)]
pub struct ActionCache {
    files: EntryFiles,
    observer: Arc<OnceLock<UpdateObserver>>,
}

impl std::fmt::Debug for ActionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionCache").field("root", &self.files.root()).finish()
    }
}

impl ActionCache {
    /// Opens (creating if needed) the cache under `root`, holding at most
    /// `budget` bytes of entries (least recently used go first). Blocking.
    pub fn open(root: &Path, budget: u64) -> Result<Self, StoreError> {
        Ok(ActionCache { files: EntryFiles::open(root, budget)?, observer: Arc::default() })
    }

    /// Bytes the entries take on disk, and how many there are.
    pub fn usage(&self) -> (u64, usize) {
        self.files.usage()
    }

    /// Sets the one observer told of every write (the existence filter);
    /// false if one is set already.
    pub fn observe(&self, observer: UpdateObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// The action digests of every entry of `instance` with `function`. Blocking.
    pub fn keys(&self, instance: &str, function: DigestFunction) -> Vec<Digest> {
        let dir = self.files.root().join("entries").join(instance_dir(instance)).join(function.name());
        let mut keys = Vec::new();
        for shard in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            for entry in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let Some((hash, size)) = name.to_str().and_then(|n| n.split_once('-')) else { continue };
                if let Ok(digest) = Digest::from_hex(function, hash, size.parse().unwrap_or(-1)) {
                    keys.push(digest);
                }
            }
        }
        keys
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
        self.files.write(&self.entry_path(instance, action), result).await?;
        if let Some(observer) = self.observer.get() {
            observer(instance, action);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_persist_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let action = DigestFunction::Sha256.digest_of(b"action");
        let result = ActionResult { exit_code: 3, ..Default::default() };
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        cache.update("a", &action, &result).await.unwrap();
        assert_eq!(cache.get("b", &action).await.unwrap(), None);
        let reopened = ActionCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.get("a", &action).await.unwrap(), Some(result));
    }

    #[tokio::test]
    async fn keys_are_listed_and_writes_observed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        assert!(
            cache.observe(Box::new(move |instance, digest| log.lock().unwrap().push((instance.to_owned(), *digest))))
        );
        let (a, b) = (DigestFunction::Blake3.digest_of(b"a"), DigestFunction::Blake3.digest_of(b"b"));
        cache.update("x", &a, &ActionResult::default()).await.unwrap();
        cache.update("x", &b, &ActionResult::default()).await.unwrap();
        cache.update("y", &a, &ActionResult::default()).await.unwrap();
        let mut keys = cache.keys("x", DigestFunction::Blake3);
        keys.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(keys, expected);
        assert!(cache.keys("x", DigestFunction::Sha256).is_empty());
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(seen.lock().unwrap()[2], ("y".to_owned(), a));
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let action = DigestFunction::Blake3.digest_of(b"action");
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        cache.update("", &action, &ActionResult::default()).await.unwrap();
        std::fs::write(cache.entry_path("", &action), [0xff, 0xff, 0xff]).unwrap();
        assert_eq!(cache.get("", &action).await.unwrap(), None);
        assert!(!cache.entry_path("", &action).exists());
        // A torn (empty) entry is a miss, not an empty successful result.
        cache.update("", &action, &ActionResult::default()).await.unwrap();
        std::fs::write(cache.entry_path("", &action), []).unwrap();
        assert_eq!(cache.get("", &action).await.unwrap(), None);
    }
}
