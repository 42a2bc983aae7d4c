//! Executing actions through the REAPI Execution service from tests: building
//! and uploading shell actions, and reading Operation streams.

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::longrunning::Operation;
use casbuild_proto::reapi::command::EnvironmentVariable;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{
    batch_update_blobs_request, Action, BatchUpdateBlobsRequest, Command, Directory, ExecuteRequest, ExecuteResponse,
};
use prost::Message;
use tonic::transport::Channel;

use super::Coordinator;

pub const F: DigestFunction = DigestFunction::Sha256;

pub fn blob<M: Message>(message: &M) -> (Digest, Bytes) {
    let bytes = Bytes::from(message.encode_to_vec());
    (F.digest_of(&bytes), bytes)
}

/// An Action running `script` with `sh`, its output `out`, and the blobs to upload.
pub fn shell_action(script: &str) -> (Digest, Vec<(Digest, Bytes)>) {
    shell_action_with(script, false)
}

/// [`shell_action`], optionally marked `do_not_cache`.
pub fn shell_action_with(script: &str, do_not_cache: bool) -> (Digest, Vec<(Digest, Bytes)>) {
    shell_action_over(script, &Directory::default(), do_not_cache)
}

/// [`shell_action_with`] over the input root `root` (whose own blobs the
/// caller uploads).
pub fn shell_action_over(script: &str, root: &Directory, do_not_cache: bool) -> (Digest, Vec<(Digest, Bytes)>) {
    let command = Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable { name: "PATH".into(), value: "/usr/bin:/bin".into() }],
        output_paths: vec!["out".into()],
        ..Default::default()
    };
    let (command_digest, command_bytes) = blob(&command);
    let (root_digest, root_bytes) = blob(root);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root_digest.to_proto()),
        do_not_cache,
        ..Default::default()
    };
    let (action_digest, action_bytes) = blob(&action);
    (action_digest, vec![(command_digest, command_bytes), (root_digest, root_bytes), (action_digest, action_bytes)])
}

pub async fn upload(server: &Coordinator, blobs: Vec<(Digest, Bytes)>) {
    upload_in(server, "", blobs).await
}

/// Uploads blobs into `instance`.
pub async fn upload_in(server: &Coordinator, instance: &str, blobs: Vec<(Digest, Bytes)>) {
    let requests = blobs
        .into_iter()
        .map(|(d, data)| batch_update_blobs_request::Request {
            digest: Some(d.to_proto()),
            data: data.to_vec(),
            compressor: 0,
        })
        .collect();
    let response = server
        .cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests,
            digest_function: F.to_proto() as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.responses.iter().all(|r| r.status.as_ref().is_none_or(|s| s.code == 0)));
}

pub fn execute_request(action: &Digest, skip_cache_lookup: bool) -> ExecuteRequest {
    ExecuteRequest {
        action_digest: Some(action.to_proto()),
        skip_cache_lookup,
        digest_function: F.to_proto() as i32,
        ..Default::default()
    }
}

/// Every Operation of an Execute (or WaitExecution) stream, to the last.
pub async fn operations(mut stream: tonic::Streaming<Operation>) -> Vec<Operation> {
    let mut all = Vec::new();
    while let Some(op) = stream.message().await.unwrap() {
        all.push(op);
    }
    all
}

/// Executes `request` and returns the final ExecuteResponse.
pub async fn execute(client: &mut ExecutionClient<Channel>, request: ExecuteRequest) -> ExecuteResponse {
    let stream = client.execute(request).await.unwrap().into_inner();
    response_of(operations(stream).await.last().expect("an Execute stream ends with an operation"))
}

/// The ExecuteResponse a finished Operation carries, decoded as a client does.
pub fn response_of(op: &Operation) -> ExecuteResponse {
    assert!(op.done, "the last operation is done");
    casbuild_proto::operation::execute_response(op).unwrap_or_else(|e| panic!("no ExecuteResponse: {e}"))
}

pub fn output_digest(response: &ExecuteResponse) -> String {
    let result = response.result.as_ref().expect("a result");
    result.output_files[0].digest.as_ref().unwrap().hash.clone()
}

/// With one slot busy with a blocker, actions of priorities 5, 1 and 3
/// arriving in that order start in the order 1, 3, 5 (lower values first).
pub async fn assert_runs_by_priority(server: &Coordinator) {
    use casbuild_proto::reapi::ExecutionPolicy;
    use std::time::Duration;
    let channel = server.channel().await;
    let (blocker, blobs) = shell_action("sleep 1; echo blocker > out");
    upload(server, blobs).await;
    let mut client = ExecutionClient::new(channel.clone());
    let blocking = client.execute(execute_request(&blocker, false)).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut calls = Vec::new();
    for priority in [5, 1, 3] {
        let (action, blobs) = shell_action(&format!("date +%s%N > out # priority {priority}"));
        upload(server, blobs).await;
        let mut request = execute_request(&action, false);
        request.execution_policy = Some(ExecutionPolicy { priority });
        let mut client = ExecutionClient::new(channel.clone());
        let stream = client.execute(request).await.unwrap().into_inner();
        calls.push((priority, tokio::spawn(operations(stream))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    operations(blocking).await;
    let mut started = Vec::new();
    for (priority, call) in calls {
        let ops = tokio::time::timeout(Duration::from_secs(60), call).await.unwrap().unwrap();
        let response = response_of(ops.last().unwrap());
        let meta = response.result.unwrap().execution_metadata.unwrap();
        let at = meta.execution_start_timestamp.unwrap();
        started.push((at.seconds, at.nanos, priority));
    }
    started.sort();
    let order: Vec<i32> = started.iter().map(|s| s.2).collect();
    assert_eq!(order, [1, 3, 5], "lower priority values run first");
}
