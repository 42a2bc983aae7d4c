//! casbuild's compiler wrapper for make and ninja (`casbuild cc`) and the
//! per-host daemon it talks to (`casbuild daemon`). The binary parses flags
//! and calls in here.
//!
//! - [`args`]: is a command line one compile the cluster can run, and which
//!   flags belong to preprocessing and which to compiling?
//! - [`wrapper`]: preprocess here, hand the action to the daemon, write the
//!   object, or compile locally with a typed [`reason::Local`].
//! - [`daemon`]: the channel to the cluster, an L1 of recent results, the
//!   existence filter, the local-fallback limit and the statistics.
//! - [`socket`]: the wrapper ↔ daemon socket and its framing.

pub mod args;
pub mod daemon;
pub mod reason;
pub mod socket;
pub mod wrapper;

pub use wrapper::{compiler_identity, find_on_path, COMPILER_PROPERTY, MASQUERADE};
