//! The action cache: action digest → ActionResult, per instance.
//!
//! Kept on disk by default: small protos stored one file each as checksummed
//! records (`entry_files`); an entry that is not a complete record is
//! deleted and treated as a miss. Entries are not synced to disk: a power
//! loss may lose the last seconds of them (their actions run again), never
//! serve a torn one, and an action run is spared two fsyncs (the blobs an
//! entry names are synced by the store as they are written). With a
//! shared database ([`Database`]) every coordinator of a cluster reads and
//! writes the same entries there instead.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use prost::Message;

use crate::database::Database;
use crate::digest::{Digest, DigestFunction};
use crate::entry_files::EntryFiles;
use crate::namespace::instance_dir;
use crate::store::StoreError;
use casbuild_proto::reapi::ActionResult;

/// Told of every entry written: the instance and the action digest.
pub type UpdateObserver = Box<dyn Fn(&str, &Digest) + Send + Sync>;

/// Where the entries are.
#[derive(Clone, Debug)]
enum Backend {
    Files(EntryFiles),
    Database(Database),
}

/// A persistent map from action digests to their results.
#[derive(Clone)]
pub struct ActionCache {
    backend: Backend,
    observer: Arc<OnceLock<UpdateObserver>>,
}

impl std::fmt::Debug for ActionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionCache").field("backend", &self.backend).finish()
    }
}

impl ActionCache {
    /// Opens (creating if needed) the cache under `root`, holding at most
    /// `budget` bytes of entries (least recently used go first). Blocking.
    pub fn open(root: &Path, budget: u64) -> Result<Self, StoreError> {
        let files = EntryFiles::open(root, budget)?.unsynced();
        Ok(ActionCache { backend: Backend::Files(files), observer: Arc::default() })
    }

    /// The cache kept in a shared database.
    pub fn on_database(database: Database) -> Self {
        ActionCache { backend: Backend::Database(database), observer: Arc::default() }
    }

    /// The shared database the entries are in, if they are in one.
    pub fn database(&self) -> Option<&Database> {
        match &self.backend {
            Backend::Database(database) => Some(database),
            Backend::Files(_) => None,
        }
    }

    /// Bytes the entries take, and how many there are.
    pub async fn usage(&self) -> Result<(u64, usize), StoreError> {
        match &self.backend {
            Backend::Files(files) => Ok(files.usage()),
            Backend::Database(database) => database.action_cache_usage().await,
        }
    }

    /// Sets the one observer told of every write (the existence filter);
    /// false if one is set already.
    pub fn observe(&self, observer: UpdateObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// The action digests of every entry of `instance` with `function`.
    pub async fn keys(&self, instance: &str, function: DigestFunction) -> Result<Vec<Digest>, StoreError> {
        match &self.backend {
            Backend::Files(files) => {
                let dir = files.root().join("entries").join(instance_dir(instance)).join(function.name());
                tokio::task::spawn_blocking(move || file_keys(&dir, function))
                    .await
                    .map_err(|e| StoreError::io("listing the action cache", std::io::Error::other(e)))
            }
            Backend::Database(database) => database.action_keys(instance, function).await,
        }
    }

    fn entry_path(files: &EntryFiles, instance: &str, action: &Digest) -> PathBuf {
        let hash = action.hash_hex();
        files
            .root()
            .join("entries")
            .join(instance_dir(instance))
            .join(action.function.name())
            .join(&hash[..2])
            .join(format!("{hash}-{}", action.size_bytes))
    }

    /// The stored result of `action` in `instance`, if any.
    pub async fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>, StoreError> {
        match &self.backend {
            Backend::Files(files) => files.read(&Self::entry_path(files, instance, action)).await,
            Backend::Database(database) => {
                let Some(bytes) = database.action_result(instance, action).await? else { return Ok(None) };
                match ActionResult::decode(bytes.as_slice()) {
                    Ok(result) => Ok(Some(result)),
                    Err(e) => {
                        tracing::warn!(action = ?action, "undecodable action cache row in {}: {e}", database.describe());
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Stores (or replaces) the result of `action` in `instance`.
    pub async fn update(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Files(files) => files.write(&Self::entry_path(files, instance, action), result).await?,
            Backend::Database(database) => {
                database.put_action_result(instance, action, &result.encode_to_vec()).await?
            }
        }
        if let Some(observer) = self.observer.get() {
            observer(instance, action);
        }
        Ok(())
    }
}

/// The digests named by the entry files under one instance's function directory.
fn file_keys(dir: &Path, function: DigestFunction) -> Vec<Digest> {
    let mut keys = Vec::new();
    for shard in std::fs::read_dir(dir).into_iter().flatten().flatten() {
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
        let mut keys = cache.keys("x", DigestFunction::Blake3).await.unwrap();
        keys.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(keys, expected);
        assert!(cache.keys("x", DigestFunction::Sha256).await.unwrap().is_empty());
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(seen.lock().unwrap()[2], ("y".to_owned(), a));
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let action = DigestFunction::Blake3.digest_of(b"action");
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        cache.update("", &action, &ActionResult::default()).await.unwrap();
        let Backend::Files(files) = &cache.backend else { unreachable!() };
        let path = ActionCache::entry_path(files, "", &action);
        std::fs::write(&path, [0xff, 0xff, 0xff]).unwrap();
        assert_eq!(cache.get("", &action).await.unwrap(), None);
        assert!(!path.exists());
        // A torn (empty) entry is a miss, not an empty successful result.
        cache.update("", &action, &ActionResult::default()).await.unwrap();
        std::fs::write(&path, []).unwrap();
        assert_eq!(cache.get("", &action).await.unwrap(), None);
    }
}
