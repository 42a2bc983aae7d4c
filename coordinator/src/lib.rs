//! The casbuild coordinator: a REAPI v2 server over `casbuild-cas` storage.
//!
//! It serves Capabilities, ContentAddressableStorage, ByteStream and the
//! ActionCache — enough for any REAPI client to use it as a remote cache —
//! with instance names as separate namespaces.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use casbuild_cas::storage::{Storage, StorageConfig};
//! let storage = Arc::new(Storage::open(&StorageConfig::new("/var/cache/casbuild".into()))?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8980").await?;
//! casbuild_coordinator::serve(listener, storage, Default::default(), std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod action_cache;
mod asset;
pub mod auth;
mod bytestream;
mod capabilities;
mod cas;
mod compression;
mod execution;
pub mod existence;
mod gate;
pub mod graph;
pub mod metrics;
pub mod scheduler;
mod server;
mod shared_operations;
mod sri;
pub mod status;
pub mod status_page;
pub mod workers;

pub use bytestream::SESSION_IDLE;
pub use scheduler::{ActionError, ActionExecutor, ActionRequest, Executed, Scheduler, Started};
pub use server::{serve, serve_with_execution, ExecutionConfig, ServerConfig};
pub use workers::{PoolConfig, WorkerPool};
