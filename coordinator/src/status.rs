//! Turning storage and parsing errors into gRPC statuses with the codes REAPI
//! clients act on.

use casbuild_cas::digest::{Digest, DigestError};
use casbuild_cas::store::StoreError;
use casbuild_proto::reapi;
use tonic::{Code, Status};

/// The status a client should see for a store error.
pub fn store_status(error: StoreError) -> Status {
    let code = match &error {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::DigestMismatch(_) | StoreError::InvalidArgument(_) => Code::InvalidArgument,
        StoreError::OutOfRange { .. } => Code::OutOfRange,
        StoreError::ResourceExhausted(_) => Code::ResourceExhausted,
        StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::Refused { code, .. } => *code,
        StoreError::Io { .. } => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// A malformed digest or unsupported digest function is the client's fault.
pub fn digest_status(error: DigestError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// Parses a digest from a request, resolving its function from the request's
/// `digest_function` field; a missing digest names the field.
pub fn request_digest(function: i32, digest: Option<&reapi::Digest>, field: &str) -> Result<Digest, Status> {
    let digest = digest.ok_or_else(|| Status::invalid_argument(format!("{field} is missing")))?;
    Digest::from_request(function, digest).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// A `google.rpc.Status` for per-entry results of batch calls.
pub fn rpc_status(status: &Status) -> casbuild_proto::rpc::Status {
    casbuild_proto::rpc::Status { code: status.code() as i32, message: status.message().to_string(), details: vec![] }
}

/// The `google.rpc.Status` meaning success.
pub fn rpc_ok() -> casbuild_proto::rpc::Status {
    casbuild_proto::rpc::Status { code: 0, message: String::new(), details: vec![] }
}

/// `google.rpc.PreconditionFailure`, which the crate of generated REAPI types
/// does not include; the field numbers are those of the published message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailure {
    /// What is wrong.
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// One violated precondition.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Violation {
    /// The kind: REAPI uses "MISSING" for absent blobs.
    #[prost(string, tag = "1")]
    pub r#type: String,
    /// What: `blobs/{hash}/{size}` for a blob.
    #[prost(string, tag = "2")]
    pub subject: String,
    /// Why, for people.
    #[prost(string, tag = "3")]
    pub description: String,
}

/// INVALID_ARGUMENT unless `name` is an acceptable instance name
/// ([`casbuild_cas::resource::check_instance_name`]).
pub fn check_instance(name: &str) -> Result<(), Status> {
    Ok(casbuild_cas::resource::check_instance_name(name)?)
}

/// Most MISSING violations one status lists: a client uploads those and
/// asks again, so a tree of millions of absent files costs a few round trips
/// instead of one unbounded response.
pub const MAX_VIOLATIONS: usize = 5000;

pub use casbuild_cas::digest::some_digests;

/// FAILED_PRECONDITION listing `missing` blobs as REAPI clients expect: one
/// MISSING violation per blob (at most [`MAX_VIOLATIONS`]), subject
/// `blobs/{hash}/{size}`.
pub fn precondition_missing(missing: &[Digest]) -> casbuild_proto::rpc::Status {
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .take(MAX_VIOLATIONS)
            .map(|d| Violation {
                r#type: "MISSING".into(),
                subject: format!("blobs/{}/{}", d.hash_hex(), d.size_bytes),
                description: "the action needs this blob and the CAS does not have it".into(),
            })
            .collect(),
    };
    casbuild_proto::rpc::Status {
        code: Code::FailedPrecondition as i32,
        message: format!("{} input blob(s) missing from the CAS: {}", missing.len(), some_digests(missing)),
        details: vec![casbuild_proto::protobuf::Any {
            type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
            value: prost::Message::encode_to_vec(&failure),
        }],
    }
}

/// A `google.rpc.Status` as the gRPC status of a call, its details carried in
/// the `grpc-status-details-bin` trailer as gRPC clients expect.
pub fn call_status(status: casbuild_proto::rpc::Status) -> Status {
    let code = Code::from_i32(status.code);
    let message = status.message.clone();
    Status::with_details(code, message, prost::Message::encode_to_vec(&status).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_precondition_failure_lists_a_bounded_number_of_blobs() {
        let missing: Vec<Digest> = (0..MAX_VIOLATIONS as u32 + 10)
            .map(|i| casbuild_cas::digest::DigestFunction::Sha256.digest_of(&i.to_le_bytes()))
            .collect();
        let status = precondition_missing(&missing);
        let failure: PreconditionFailure = prost::Message::decode(status.details[0].value.as_slice()).unwrap();
        assert_eq!(failure.violations.len(), MAX_VIOLATIONS);
        assert!(status.message.starts_with(&format!("{} input blob(s) missing", missing.len())), "{}", status.message);
    }
}
