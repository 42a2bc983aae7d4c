//! Sandboxed execution of REAPI actions over the /cas mount: Linux namespaces,
//! an overlay working tree, limits and a timeout.

pub mod beneath;
pub mod cgroup;
pub mod outputs;
pub mod profiles;
pub mod runner;
pub mod sandbox;
pub mod scratch;
pub mod seccomp;
pub mod worker;
