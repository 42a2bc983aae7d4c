//! Instance namespaces: REAPI instance names partition stores, so a blob or
//! action result written under one instance is invisible from another.
//!
//! Stores share one byte budget across all namespaces; each namespace is a
//! cheap handle onto the same store (see `MemoryStore::namespace`).

use std::collections::HashMap;

/// The on-disk directory name of an instance's data. Instance names may hold
/// any characters (slashes included), so all but the default one are hashed.
pub fn instance_dir(instance: &str) -> String {
    if instance.is_empty() {
        "default".to_string()
    } else {
        let hash = blake3::hash(instance.as_bytes());
        format!("i-{}", &hash.to_hex()[..32])
    }
}

/// Gives each namespace (by directory name) a small number for compact keys.
#[derive(Default)]
pub(crate) struct Namespaces {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Namespaces {
    /// The id of `dir`, allocating one on first use.
    pub(crate) fn id(&mut self, dir: &str) -> u32 {
        if let Some(&id) = self.ids.get(dir) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(dir.to_string(), id);
        self.names.push(dir.to_string());
        id
    }

    /// Whether `dir` has an id already.
    pub(crate) fn contains(&self, dir: &str) -> bool {
        self.ids.contains_key(dir)
    }

    /// How many namespaces have ids.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// The directory name of `id`.
    pub(crate) fn dir(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}
