//! The Execution and Operations services of `casbuild up`, driven with a
//! plain gRPC client: concurrency, deduplication, missing inputs, operation
//! lookup, cancellation. Needs root (the local worker mounts FUSE).

mod common;

use std::collections::{HashMap, HashSet};

use casbuild_cas::digest::Digest;
use casbuild_proto::longrunning::operations_client::OperationsClient;
use casbuild_proto::longrunning::{CancelOperationRequest, GetOperationRequest};
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::WaitExecutionRequest;
use common::execute::{
    execute, execute_request, operations, output_digest, response_of, shell_action, shell_action_over,
    shell_action_with, upload, upload_in, F,
};
use common::{needs_root, processes_with, Coordinator};
use prost::Message;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_executes_of_fifty_actions_run_each_action_once() {
    if !needs_root("five_hundred_executes_of_fifty_actions_run_each_action_once", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(dir.path());
    // Each action writes random bytes: had it run twice, waiters would see different outputs.
    let mut actions = Vec::new();
    for i in 0..50 {
        let (digest, blobs) = shell_action(&format!("sleep 0.2; head -c 32 /dev/urandom > out # {i}"));
        upload(&server, blobs).await;
        actions.push(digest);
    }
    let channel = server.channel().await;
    let calls: Vec<_> = (0..500)
        .map(|i| {
            let action = actions[i % 50];
            let mut client = ExecutionClient::new(channel.clone());
            tokio::spawn(async move {
                let stream = client.execute(execute_request(&action, false)).await.unwrap().into_inner();
                (action, operations(stream).await)
            })
        })
        .collect();
    let mut outputs: HashMap<Digest, HashSet<String>> = HashMap::new();
    for call in calls {
        let (action, ops) = tokio::time::timeout(std::time::Duration::from_secs(300), call).await.unwrap().unwrap();
        let response = response_of(ops.last().unwrap());
        assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{response:?}");
        outputs.entry(action).or_default().insert(output_digest(&response));
    }
    assert_eq!(outputs.len(), 50);
    for (action, seen) in &outputs {
        assert_eq!(seen.len(), 1, "action {action} ran more than once: {seen:?}");
    }

    // Later Executes are cache hits; skip_cache_lookup runs the action again.
    let mut client = ExecutionClient::new(channel.clone());
    let hit = execute(&mut client, execute_request(&actions[0], false)).await;
    assert!(hit.cached_result);
    assert!(outputs[&actions[0]].contains(&output_digest(&hit)));
    let rerun = execute(&mut client, execute_request(&actions[0], true)).await;
    assert!(!rerun.cached_result);
    assert!(!outputs[&actions[0]].contains(&output_digest(&rerun)), "skip_cache_lookup runs it again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_inputs_unknown_operations_and_cancellation() {
    if !needs_root("missing_inputs_unknown_operations_and_cancellation", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(dir.path());
    let channel = server.channel().await;
    let mut execution = ExecutionClient::new(channel.clone());
    let mut operations_client = OperationsClient::new(channel.clone());

    // A missing Command: FAILED_PRECONDITION naming it, as Bazel expects.
    // (The input root is the empty Directory, which every CAS holds.)
    let (action, blobs) = shell_action("echo never > out");
    let command = blobs[0].0;
    upload(&server, blobs.into_iter().filter(|(d, _)| *d == action).collect()).await;
    let ops = operations(execution.execute(execute_request(&action, false)).await.unwrap().into_inner()).await;
    let response = response_of(ops.last().unwrap());
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{}", status.message);
    let failure =
        casbuild_coordinator::status::PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(failure.violations.len(), 1, "{failure:?}");
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(failure.violations[0].subject, format!("blobs/{}/{}", command.hash_hex(), command.size_bytes));

    // An action that has never been uploaded at all.
    let absent = F.digest_of(b"no such action");
    let ops = operations(execution.execute(execute_request(&absent, false)).await.unwrap().into_inner()).await;
    assert_eq!(response_of(ops.last().unwrap()).status.unwrap().code, Code::FailedPrecondition as i32);

    // Unknown operation names are NOT_FOUND everywhere.
    let name = "operations/does-not-exist".to_string();
    let err = operations_client.get_operation(GetOperationRequest { name: name.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = execution.wait_execution(WaitExecutionRequest { name }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A long action: watched by name from a second stream, then cancelled.
    let (slow, blobs) = shell_action("sleep 300; echo late > out");
    upload(&server, blobs).await;
    let mut stream = execution.execute(execute_request(&slow, false)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.done && first.name.starts_with("operations/"));
    let got = operations_client.get_operation(GetOperationRequest { name: first.name.clone() }).await.unwrap();
    assert_eq!(got.into_inner().name, first.name);
    let waiter =
        execution.wait_execution(WaitExecutionRequest { name: first.name.clone() }).await.unwrap().into_inner();
    operations_client.cancel_operation(CancelOperationRequest { name: first.name.clone() }).await.unwrap();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(30), operations(stream)).await.unwrap();
    let cancelled = response_of(rest.last().unwrap());
    assert_eq!(cancelled.status.unwrap().code, Code::Cancelled as i32);
    let waited = tokio::time::timeout(std::time::Duration::from_secs(30), operations(waiter)).await.unwrap();
    assert!(waited.last().unwrap().done, "WaitExecution sees the same end");
    // The cancelled command itself is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_with("sleep 300; echo late").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the cancelled command is still running");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_run_in_their_own_instance() {
    if !needs_root("actions_run_in_their_own_instance", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(dir.path());
    let mut client = ExecutionClient::new(server.channel().await);
    let (action, blobs) = shell_action("echo in-team-a > out");
    upload_in(&server, "team/a", blobs).await;
    let mut request = execute_request(&action, false);
    request.instance_name = "team/a".into();
    let response = execute(&mut client, request).await;
    assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{response:?}");
    assert!(!output_digest(&response).is_empty());
    // The default instance has none of those blobs.
    let response = execute(&mut client, execute_request(&action, false)).await;
    assert_eq!(response.status.unwrap().code, Code::FailedPrecondition as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_do_not_cache_actions_are_not_cached() {
    if !needs_root("failures_and_do_not_cache_actions_are_not_cached", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(dir.path());
    let mut client = ExecutionClient::new(server.channel().await);
    let (failing, blobs) = shell_action("head -c 16 /dev/urandom > out; exit 3");
    upload(&server, blobs).await;
    let (uncached, blobs) = shell_action_with("head -c 16 /dev/urandom > out", true);
    upload(&server, blobs).await;
    for action in [failing, uncached] {
        let mut outputs = Vec::new();
        for _ in 0..2 {
            let response = execute(&mut client, execute_request(&action, false)).await;
            assert!(!response.cached_result, "{response:?}");
            outputs.push(output_digest(&response));
        }
        assert_ne!(outputs[0], outputs[1], "ran twice");
    }
}

/// `casbuild up` with one slot honours REAPI priorities too (its scheduler
/// admits queued actions to the local worker by priority, not FIFO).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_queued_actions_by_priority() {
    if !needs_root("up_runs_queued_actions_by_priority", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up_with(dir.path(), &["--slots", "1"]);
    common::execute::assert_runs_by_priority(&server).await;
}

/// Bytes in regular files under `dir`, each inode once, not descending into
/// `skip` (the FUSE mount).
fn bytes_on_disk(dir: &std::path::Path, skip: &std::path::Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() && path != skip {
            total += bytes_on_disk(&path, skip, seen);
        } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            total += meta.len();
        }
    }
    total
}

/// `casbuild up`'s worker reads the coordinator's store through its mount:
/// a tree uploaded once and read whole by an action is on disk once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_keeps_each_blob_once_on_disk() {
    if !needs_root("up_keeps_each_blob_once_on_disk", true) {
        return;
    }
    use casbuild_proto::reapi::{Directory, FileNode};
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(dir.path());
    // 16 files of 256 KiB: each far above what the mount keeps in memory.
    let mut root = Directory::default();
    let mut tree_bytes = 0;
    for i in 0..16u64 {
        let data = bytes::Bytes::from(common::bytes(i + 1, 256 << 10));
        let digest = F.digest_of(&data);
        tree_bytes += data.len() as u64;
        let name = format!("f{i:02}");
        root.files.push(FileNode { name, digest: Some(digest.to_proto()), ..Default::default() });
        upload(&server, vec![(digest, data)]).await;
    }
    let (action_digest, blobs) = shell_action_over("cat f* | wc -c > out", &root, false);
    upload(&server, blobs).await;

    let mut client = ExecutionClient::new(server.channel().await);
    let response = execute(&mut client, execute_request(&action_digest, true)).await;
    assert_eq!(response.result.as_ref().map(|r| r.exit_code), Some(0), "{response:?}");
    let on_disk = bytes_on_disk(dir.path(), &dir.path().join("cas"), &mut HashSet::new());
    assert!(on_disk >= tree_bytes, "the tree is stored: {on_disk} bytes on disk for a {tree_bytes}-byte tree");
    assert!(
        on_disk < tree_bytes + tree_bytes / 4,
        "{on_disk} bytes on disk for a {tree_bytes}-byte tree read whole: blobs are kept more than once"
    );
}
