//! Wire types for casbuild: the Remote Execution API v2 and its companions
//! (ByteStream, longrunning, google.rpc, Remote Asset), re-exported from the
//! `bazel-remote-apis` crate, plus casbuild's own protocols (worker, graph,
//! compiler wrapper), which embed REAPI's messages (ADR 0005).
//!
//! Every other crate reaches protobuf types through here, so the REAPI
//! version in use is decided in one place.
//!
//! ```
//! use casbuild_proto::reapi::Digest;
//! let d = Digest { hash: "ab".repeat(32), size_bytes: 3 };
//! assert_eq!(d.size_bytes, 3);
//! ```

pub use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::bytestream;
pub use bazel_remote_apis::google::longrunning;
pub use bazel_remote_apis::google::protobuf;
pub use bazel_remote_apis::google::rpc;

/// The compiler wrapper's protocols: the coordinator's existence filter and
/// the host daemon's messages (`proto/cc.proto`).
pub mod cc {
    #![allow(missing_docs)]
    tonic::include_proto!("casbuild.cc.v1");
}

/// casbuild's build-graph protocol (`proto/graph.proto`).
pub mod graph {
    #![allow(missing_docs)]
    tonic::include_proto!("casbuild.graph.v1");
}

/// casbuild's coordinator ↔ worker protocol (`proto/worker.proto`).
pub mod worker {
    #![allow(missing_docs)]
    // A finished lease's outcome holds a whole ActionResult; it is sent once.
    #![allow(clippy::large_enum_variant)]
    tonic::include_proto!("casbuild.worker.v1");
}

/// The encoded FileDescriptorSet of casbuild's own protocols (and of the
/// REAPI names they import, declared without their fields: see
/// `proto/reapi.proto`), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/casbuild_descriptors.bin"));

pub mod operation;
pub mod trace;

/// `at` as a protobuf Timestamp; None before the Unix epoch.
pub fn timestamp(at: std::time::SystemTime) -> Option<protobuf::Timestamp> {
    let since = at.duration_since(std::time::SystemTime::UNIX_EPOCH).ok()?;
    Some(protobuf::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 })
}

/// A protobuf Timestamp as a time; None when out of range.
pub fn system_time(at: &protobuf::Timestamp) -> Option<std::time::SystemTime> {
    let since = std::time::Duration::new(u64::try_from(at.seconds).ok()?, u32::try_from(at.nanos).ok()?);
    std::time::SystemTime::UNIX_EPOCH.checked_add(since)
}
