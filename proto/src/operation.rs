//! How REAPI's Execution service uses `google.longrunning.Operation`: the
//! metadata is an `ExecuteOperationMetadata` and a finished operation's
//! response an `ExecuteResponse`, each packed in an `Any`.

use prost::Message;

use crate::longrunning::{operation, Operation};
use crate::protobuf::Any;
use crate::reapi::ExecuteResponse;

const REAPI: &str = "type.googleapis.com/build.bazel.remote.execution.v2";

/// `message`, a REAPI message named `name` (such as "ExecuteResponse"), packed in an `Any`.
pub fn pack<M: Message>(name: &str, message: &M) -> Any {
    Any { type_url: format!("{REAPI}.{name}"), value: message.encode_to_vec() }
}

/// The ExecuteResponse a finished operation carries.
pub fn execute_response(operation: &Operation) -> Result<ExecuteResponse, String> {
    match &operation.result {
        Some(operation::Result::Response(any)) if any.type_url == format!("{REAPI}.ExecuteResponse") => {
            ExecuteResponse::decode(any.value.as_slice()).map_err(|e| format!("a bad ExecuteResponse: {e}"))
        }
        Some(operation::Result::Response(any)) => Err(format!("a response of type {:?}", any.type_url)),
        Some(operation::Result::Error(status)) => Err(format!("the operation failed: {}", status.message)),
        None => Err("the operation finished without a result".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_response_comes_back_and_other_types_are_refused() {
        let response = ExecuteResponse { cached_result: true, ..Default::default() };
        let mut op = Operation { done: true, ..Default::default() };
        op.result = Some(operation::Result::Response(pack("ExecuteResponse", &response)));
        assert_eq!(execute_response(&op), Ok(response));
        op.result = Some(operation::Result::Response(pack("ActionResult", &crate::reapi::ActionResult::default())));
        assert!(execute_response(&op).unwrap_err().contains("ActionResult"));
        op.result = None;
        assert!(execute_response(&op).is_err());
    }
}
