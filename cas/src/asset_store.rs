//! The Remote Asset store: (URI, qualifiers) → a blob or Directory digest,
//! per instance, persisted one entry per file, with the expiry and the
//! references the pusher gave.

use std::path::Path;
use std::path::PathBuf;

use casbuild_proto::reapi;
use prost::Message;

use crate::database::Database;
use crate::entry_files::EntryFiles;
use crate::namespace::instance_dir;
use crate::store::StoreError;

/// What one (URI, qualifiers) names.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AssetEntry {
    /// The blob, or the root Directory.
    #[prost(message, optional, tag = "1")]
    pub digest: Option<reapi::Digest>,
    /// Whether `digest` is a root Directory (pushed with PushDirectory).
    #[prost(bool, tag = "2")]
    pub directory: bool,
    /// The REAPI DigestFunction number of every digest here.
    #[prost(int32, tag = "3")]
    pub digest_function: i32,
    /// Seconds since the Unix epoch after which the entry is gone; 0: never.
    #[prost(int64, tag = "4")]
    pub expire_at: i64,
    /// When it was pushed, in seconds since the Unix epoch.
    #[prost(int64, tag = "5")]
    pub pushed_at: i64,
    /// Blobs the asset needs besides itself.
    #[prost(message, repeated, tag = "6")]
    pub references_blobs: Vec<reapi::Digest>,
    /// Directory trees the asset needs besides itself.
    #[prost(message, repeated, tag = "7")]
    pub references_directories: Vec<reapi::Digest>,
}

/// The persistent asset map of every instance: files under a directory, or
/// rows of a shared database.
#[derive(Clone, Debug)]
pub enum AssetStore {
    /// One entry file per asset.
    Files(EntryFiles),
    /// One row per asset in the cluster's database.
    Database(Database),
}

/// The identity of an asset: its URI and qualifiers, order-independent.
fn key(uri: &str, qualifiers: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = qualifiers.iter().collect();
    sorted.sort();
    let mut hasher = blake3::Hasher::new();
    for part in std::iter::once(uri).chain(sorted.iter().flat_map(|(n, v)| [n.as_str(), v.as_str()])) {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

impl AssetStore {
    /// Opens (creating if needed) the store under `root`, holding at most
    /// `budget` bytes of entries (least recently used go first). Blocking.
    pub fn open(root: &Path, budget: u64) -> Result<Self, StoreError> {
        Ok(AssetStore::Files(EntryFiles::open(root, budget)?))
    }

    /// Bytes the entries take on disk, and how many there are (none counted
    /// here when they are in a database).
    pub fn usage(&self) -> (u64, usize) {
        match self {
            AssetStore::Files(files) => files.usage(),
            AssetStore::Database(_) => (0, 0),
        }
    }

    fn entry_path(files: &EntryFiles, instance: &str, key: &str) -> PathBuf {
        files.root().join("entries").join(instance_dir(instance)).join(&key[..2]).join(key)
    }

    /// The entry for `uri` with exactly these qualifiers, if any.
    pub async fn get(
        &self,
        instance: &str,
        uri: &str,
        qualifiers: &[(String, String)],
    ) -> Result<Option<AssetEntry>, StoreError> {
        let key = key(uri, qualifiers);
        match self {
            AssetStore::Files(files) => files.read(&Self::entry_path(files, instance, &key)).await,
            AssetStore::Database(database) => {
                let Some(bytes) = database.asset(instance, &key).await? else { return Ok(None) };
                Ok(AssetEntry::decode(bytes.as_slice()).ok())
            }
        }
    }

    /// Stores (or replaces) the entry for `uri` with these qualifiers.
    pub async fn put(
        &self,
        instance: &str,
        uri: &str,
        qualifiers: &[(String, String)],
        entry: &AssetEntry,
    ) -> Result<(), StoreError> {
        let key = key(uri, qualifiers);
        match self {
            AssetStore::Files(files) => files.write(&Self::entry_path(files, instance, &key), entry).await,
            AssetStore::Database(database) => database.put_asset(instance, &key, &entry.encode_to_vec()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifier_order_does_not_matter_but_their_values_do() {
        let q = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(key("u", &q(&[("a", "1"), ("b", "2")])), key("u", &q(&[("b", "2"), ("a", "1")])));
        assert_ne!(key("u", &q(&[("a", "1")])), key("u", &q(&[("a", "2")])));
        assert_ne!(key("u", &[]), key("v", &[]));
        assert_ne!(key("ab", &q(&[("c", "")])), key("a", &q(&[("bc", "")])), "parts are length-prefixed");
    }

    #[tokio::test]
    async fn entries_persist_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let entry = AssetEntry { directory: true, pushed_at: 7, ..Default::default() };
        let store = AssetStore::open(dir.path(), 1 << 20).unwrap();
        store.put("a", "https://x/y.tar", &[], &entry).await.unwrap();
        assert_eq!(store.get("b", "https://x/y.tar", &[]).await.unwrap(), None);
        let reopened = AssetStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.get("a", "https://x/y.tar", &[]).await.unwrap(), Some(entry));
    }
}
