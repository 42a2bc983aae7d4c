//! The storage a coordinator serves: per-instance CAS views over one memory
//! tier and one disk tier (and, when configured, an S3-compatible bucket
//! behind them), plus the action cache. This is where the store
//! layers are composed.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;

use crate::action_cache::ActionCache;
use crate::asset_store::AssetStore;
use crate::database::Database;
use crate::digest::{Digest, DigestFunction};
use crate::store::{
    BlobStore, BlobStream, BlobWriter, CasInstances, DiskStore, MemoryStore, ObjectBlobStore, ObjectStoreConfig,
    SharedStore, StoreError, TieredStore,
};

/// Sizes and places of the storage tiers.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Directory holding blobs (`cas/`) and action results (`ac/`).
    pub dir: PathBuf,
    /// Byte budget of the disk tier.
    pub max_disk: u64,
    /// Byte budget of the memory tier.
    pub max_memory: u64,
    /// Largest blob kept in the memory tier.
    pub memory_admit_max: u64,
    /// Distinct instance names the CAS holds at most; calls naming a new
    /// one beyond it fail with RESOURCE_EXHAUSTED.
    pub max_instances: usize,
    /// An S3-compatible bucket that keeps every blob; the disk tier is then
    /// a read-through, write-through cache of it.
    pub objects: Option<ObjectStoreConfig>,
}

impl StorageConfig {
    /// Defaults for a store under `dir`: 20 GiB of disk, 1 GiB of memory for
    /// blobs up to 1 MiB.
    pub fn new(dir: PathBuf) -> Self {
        StorageConfig {
            dir,
            max_disk: 20 << 30,
            max_memory: 1 << 30,
            memory_admit_max: 1 << 20,
            max_instances: 10_000,
            objects: None,
        }
    }
}

/// A coordinator's storage.
pub struct Storage {
    memory: MemoryStore,
    disk: DiskStore,
    objects: Option<ObjectBlobStore>,
    action_cache: ActionCache,
    assets: AssetStore,
    memory_admit_max: u64,
    max_instances: usize,
    /// Recently used per-instance views (cheap to rebuild: a view is two
    /// namespace handles).
    instances: Mutex<LruCache<String, Arc<dyn BlobStore>>>,
}

/// Entries get 1/ENTRY_SHARE of the disk budget; blobs the rest.
pub const ENTRY_SHARE: u64 = 16;

/// How many per-instance views are kept built.
const VIEWS: usize = 1024;

impl Storage {
    /// Opens the tiers under `config.dir`, indexing what is already on disk.
    /// Blocking: scans the disk tier.
    pub fn open(config: &StorageConfig) -> Result<Self, StoreError> {
        Storage::open_shared(config, None)
    }

    /// [`Storage::open`], keeping the action cache and the Remote Asset
    /// records in `database` (shared by a cluster's coordinators) when given.
    pub fn open_shared(config: &StorageConfig, database: Option<Database>) -> Result<Self, StoreError> {
        // One disk budget: blobs, and a share for action-cache (3/4) and
        // Remote Asset (1/4) entries.
        let entries = config.max_disk / ENTRY_SHARE;
        let (action_cache, assets) = match database {
            Some(database) => (ActionCache::on_database(database.clone()), AssetStore::Database(database)),
            None => (
                ActionCache::open(&config.dir.join("ac"), entries / 4 * 3)?,
                AssetStore::open(&config.dir.join("assets"), entries / 4)?,
            ),
        };
        Ok(Storage {
            memory: MemoryStore::new(config.max_memory),
            disk: DiskStore::open(&config.dir, config.max_disk - entries)?,
            objects: config.objects.as_ref().map(ObjectBlobStore::open).transpose()?,
            action_cache,
            assets,
            memory_admit_max: config.memory_admit_max,
            max_instances: config.max_instances,
            instances: Mutex::new(LruCache::new(NonZeroUsize::new(VIEWS).expect("non-zero"))),
        })
    }

    /// The CAS of `instance`: memory over disk, both namespaced to it. A new
    /// instance beyond [`StorageConfig::max_instances`] gets a store that
    /// refuses every call, so no call can grow the server's per-instance state
    /// without bound.
    pub fn cas(&self, instance: &str) -> Arc<dyn BlobStore> {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(view) = instances.get(instance) {
            return view.clone();
        }
        let (known, count) = self.disk.namespace_known(instance);
        if !known && count >= self.max_instances {
            return Arc::new(TooManyInstances(self.max_instances));
        }
        let disk: Arc<dyn BlobStore> = Arc::new(self.disk.namespace(instance));
        let below_memory = match &self.objects {
            Some(objects) => Arc::new(TieredStore::read_through(disk, Arc::new(objects.namespace(instance)))),
            None => disk,
        };
        let view: Arc<dyn BlobStore> =
            Arc::new(TieredStore::new(Arc::new(self.memory.namespace(instance)), below_memory, self.memory_admit_max));
        instances.put(instance.to_owned(), view.clone());
        view
    }

    /// The action cache (instances are a parameter of its calls).
    pub fn action_cache(&self) -> &ActionCache {
        &self.action_cache
    }

    /// The Remote Asset map (instances are a parameter of its calls).
    pub fn assets(&self) -> &AssetStore {
        &self.assets
    }

    /// The disk tier, for inspection (sizes, file paths).
    pub fn disk(&self) -> &DiskStore {
        &self.disk
    }

    /// The memory tier, for inspection.
    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// Whether the disk tier takes writes now (a small file written, synced
    /// and removed). Blocking.
    pub fn probe_writable(&self) -> Result<(), StoreError> {
        self.disk.probe_writable()
    }

    /// Whether the bucket, when blobs are kept in one, takes writes now: a
    /// small fixed blob is written to it (idempotent: it is content-addressed).
    pub async fn probe_bucket(&self) -> Result<(), StoreError> {
        let Some(objects) = &self.objects else { return Ok(()) };
        const PROBE: &[u8] = b"casbuild storage probe";
        objects.write(&DigestFunction::Sha256.digest_of(PROBE), Bytes::from_static(PROBE)).await
    }
}

impl CasInstances for Storage {
    fn instance(&self, instance: &str) -> SharedStore {
        self.cas(instance)
    }
}

/// The CAS view of an instance the server has no room for.
struct TooManyInstances(usize);

impl TooManyInstances {
    fn error(&self) -> StoreError {
        StoreError::ResourceExhausted(format!(
            "this server already holds {} instance names; use an existing instance",
            self.0
        ))
    }
}

#[async_trait]
impl BlobStore for TooManyInstances {
    async fn find_missing(&self, _digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        Err(self.error())
    }

    async fn read(&self, _digest: &Digest, _offset: u64, _limit: Option<u64>) -> Result<BlobStream, StoreError> {
        Err(self.error())
    }

    async fn begin_write(&self, _digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
        Err(self.error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn instance_names_beyond_the_bound_are_refused_and_known_ones_keep_working() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StorageConfig::new(dir.path().to_path_buf());
        config.max_instances = 3; // the default instance and two more
        let digest = DigestFunction::Blake3.digest_of(b"blob");
        {
            let storage = Storage::open(&config).unwrap();
            storage.cas("a").write(&digest, Bytes::from_static(b"blob")).await.unwrap();
            storage.cas("b").find_missing(&[digest]).await.unwrap();
            let err = storage.cas("c").find_missing(&[digest]).await.unwrap_err();
            assert!(matches!(&err, StoreError::ResourceExhausted(m) if m.contains("3 instance names")), "{err:?}");
            assert!(storage.cas("").find_missing(&[digest]).await.is_ok());
            assert!(storage.cas("a").find_missing(&[digest]).await.unwrap().is_empty());
        }
        // After a restart the instances that hold blobs still count and still work.
        let storage = Storage::open(&config).unwrap();
        assert!(storage.cas("a").find_missing(&[digest]).await.unwrap().is_empty());
        assert!(storage.cas("c").find_missing(&[digest]).await.is_ok(), "b left no blobs, so c has room now");
        assert!(storage.cas("b").find_missing(&[digest]).await.is_err());
    }
}
