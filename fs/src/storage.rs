//! The storage a coordinator serves: per-instance CAS views over one memory
//! tier and one disk tier, plus the action cache. This is where the store
//! layers are composed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::action_cache::ActionCache;
use crate::asset_store::AssetStore;
use crate::store::{BlobStore, DiskStore, MemoryStore, StoreError, TieredStore};

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
}

impl StorageConfig {
    /// Defaults for a store under `dir`: 20 GiB of disk, 1 GiB of memory for
    /// blobs up to 1 MiB.
    pub fn new(dir: PathBuf) -> Self {
        StorageConfig { dir, max_disk: 20 << 30, max_memory: 1 << 30, memory_admit_max: 1 << 20 }
    }
}

/// A coordinator's storage.
pub struct Storage {
    memory: MemoryStore,
    disk: DiskStore,
    action_cache: ActionCache,
    assets: AssetStore,
    memory_admit_max: u64,
    instances: Mutex<HashMap<String, Arc<dyn BlobStore>>>,
}

impl Storage {
    /// Opens the tiers under `config.dir`, indexing what is already on disk.
    /// Blocking: scans the disk tier.
    pub fn open(config: &StorageConfig) -> Result<Self, StoreError> {
        Ok(Storage {
            memory: MemoryStore::new(config.max_memory),
            disk: DiskStore::open(&config.dir, config.max_disk)?,
            action_cache: ActionCache::open(&config.dir.join("ac"))?,
            assets: AssetStore::open(&config.dir.join("assets"))?,
            memory_admit_max: config.memory_admit_max,
            instances: Mutex::new(HashMap::new()),
        })
    }

    /// The CAS of `instance`: memory over disk, both namespaced to it.
    pub fn cas(&self, instance: &str) -> Arc<dyn BlobStore> {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances
            .entry(instance.to_string())
            .or_insert_with(|| {
                Arc::new(TieredStore::new(
                    Arc::new(self.memory.namespace(instance)),
                    Arc::new(self.disk.namespace(instance)),
                    self.memory_admit_max,
                ))
            })
            .clone()
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
}
