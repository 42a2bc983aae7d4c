//! Why an action could not be run — not a command that failed (that is an
//! ActionResult with its exit code) but an action the runner, an executor or
//! a worker could not run. One type from the runner through the lease
//! protocol to the Execution service, each mapping it to the same gRPC code.

use crate::digest::Digest;

/// Input that breaks a rule — a name, a path, a tree, a field — from a
/// client, a worker or a command: a mistake or an attack, never retried
/// (gRPC INVALID_ARGUMENT). Every check of hostile input returns it; callers
/// add where they found it with [`Invalid::context`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// The same problem, said to be in `what` (`what: problem`).
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        Invalid(format!("{what}: {}", self.0))
    }

    /// The gRPC code a client is told.
    pub fn code(&self) -> tonic::Code {
        tonic::Code::InvalidArgument
    }
}

impl From<Invalid> for ActionError {
    fn from(e: Invalid) -> Self {
        ActionError::Invalid(e.0)
    }
}

impl From<Invalid> for tonic::Status {
    fn from(e: Invalid) -> Self {
        tonic::Status::new(e.code(), e.0)
    }
}

/// Why an action could not be run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Blobs the action needs are not in the CAS (REAPI: FAILED_PRECONDITION,
    /// with a PreconditionFailure listing them).
    #[error("missing from the CAS: {}", crate::digest::some_digests(.0))]
    MissingBlobs(Vec<Digest>),
    /// The Action or Command is malformed (REAPI: INVALID_ARGUMENT).
    #[error("invalid action: {0}")]
    Invalid(String),
    /// A host, the network or a store failed; another try may work
    /// (REAPI: UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
}

impl ActionError {
    /// The gRPC code a client is told.
    pub fn code(&self) -> tonic::Code {
        match self {
            ActionError::MissingBlobs(_) => tonic::Code::FailedPrecondition,
            ActionError::Invalid(_) => tonic::Code::InvalidArgument,
            ActionError::Unavailable(_) => tonic::Code::Unavailable,
        }
    }

    /// The error a code, a message and the missing blobs stand for (the
    /// lease protocol's form); codes other than the two specific ones are
    /// unavailability.
    pub fn from_code(code: tonic::Code, message: String, missing: Vec<Digest>) -> Self {
        match code {
            tonic::Code::FailedPrecondition => ActionError::MissingBlobs(missing),
            tonic::Code::InvalidArgument => ActionError::Invalid(message),
            _ => ActionError::Unavailable(message),
        }
    }

    /// The message without the variant's prefix.
    pub fn message(&self) -> String {
        match self {
            ActionError::MissingBlobs(_) => self.to_string(),
            ActionError::Invalid(m) | ActionError::Unavailable(m) => m.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;

    #[test]
    fn every_error_survives_its_code_form() {
        let missing = vec![DigestFunction::Sha256.digest_of(b"absent")];
        for error in [
            ActionError::MissingBlobs(missing.clone()),
            ActionError::Invalid("no command".into()),
            ActionError::Unavailable("the worker died".into()),
        ] {
            let back = ActionError::from_code(error.code(), error.message(), missing.clone());
            assert_eq!(back, error);
        }
        assert_eq!(ActionError::from_code(tonic::Code::Internal, "x".into(), vec![]).code(), tonic::Code::Unavailable);
    }

    #[test]
    fn invalid_input_carries_where_it_was_found_to_every_caller() {
        let e = Invalid("'..' would leave the input root".into()).context("output path \"../x\"");
        assert_eq!(e.0, "output path \"../x\": '..' would leave the input root");
        let status = tonic::Status::from(e.clone());
        assert_eq!((status.code(), status.message()), (tonic::Code::InvalidArgument, e.0.as_str()));
        assert_eq!(ActionError::from(e.clone()), ActionError::Invalid(e.0.clone()));
        assert_eq!(ActionError::from(e).code(), tonic::Code::InvalidArgument);
    }
}
