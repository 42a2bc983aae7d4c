//! One module per subcommand.

pub mod auth;
pub mod bench;
pub mod cas;
pub mod cc;
pub mod client_args;
pub mod coordinator;
pub mod exec;
pub mod graph;
pub mod mount;
pub mod ops;
pub mod sandbox_args;
pub mod up;
pub mod worker;
