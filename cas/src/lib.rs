//! Content-addressed storage for casbuild: digests, ByteStream resource names,
//! blob stores that compose into tiers, and the action cache. The FUSE
//! filesystem over them is the `casbuild-mount` crate.
//!
//! ```
//! use casbuild_cas::digest::DigestFunction;
//! use casbuild_cas::store::{BlobStore, MemoryStore};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = MemoryStore::new(1 << 20);
//! let digest = DigestFunction::Blake3.digest_of(b"hello");
//! store.write(&digest, "hello".into()).await.unwrap();
//! assert_eq!(store.read_all(&digest).await.unwrap(), "hello");
//! # });
//! ```

pub mod action;
pub mod action_cache;
pub mod asset_store;
pub mod database;
pub mod digest;
pub mod entry_files;
pub mod error;
pub mod input_root;
pub mod local_tree;
pub mod namespace;
pub mod resource;
pub mod storage;
pub mod store;
pub mod tree;

pub use digest::{Digest, DigestFunction};
