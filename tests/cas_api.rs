//! The CAS and capabilities RPCs against a real coordinator process.

mod common;

use casbuild_proto::reapi::{
    batch_update_blobs_request, compressor, digest_function, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory,
    DirectoryNode, FileNode, FindMissingBlobsRequest, GetCapabilitiesRequest, GetTreeRequest,
};
use common::{bytes, sha256, Coordinator};
use futures::StreamExt;
use prost::Message;
use tonic::Code;

fn update(digest: &casbuild_cas::Digest, data: Vec<u8>) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request { digest: Some(digest.to_proto()), data, compressor: 0 }
}

#[tokio::test]
async fn capabilities_announce_both_digest_functions_zstd_and_the_batch_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &["--max-batch", "2MiB"]);
    let caps = server
        .capabilities()
        .await
        .get_capabilities(GetCapabilitiesRequest { instance_name: String::new() })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert!(cache.digest_functions.contains(&(digest_function::Value::Sha256 as i32)));
    assert!(cache.digest_functions.contains(&(digest_function::Value::Blake3 as i32)));
    assert_eq!(cache.max_batch_total_size_bytes, 2 << 20);
    assert!(cache.supported_compressors.contains(&(compressor::Value::Zstd as i32)));
    assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert_eq!(caps.low_api_version.unwrap().major, 2);
}

#[tokio::test]
async fn batch_update_find_missing_and_batch_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let mut cas = server.cas().await;
    let blobs: Vec<Vec<u8>> = (0..50).map(|i| bytes(i, 100 + i as usize * 37)).collect();
    let digests: Vec<_> = blobs.iter().map(|b| sha256(b)).collect();
    let absent = sha256(b"never uploaded");

    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().chain([&absent]).map(|d| d.to_proto()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 51);

    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: digests.iter().zip(&blobs).map(|(d, b)| update(d, b.clone())).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.responses.iter().all(|r| r.status.as_ref().unwrap().code == 0));

    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().chain([&absent]).map(|d| d.to_proto()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![absent.to_proto()]);

    let read = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: digests.iter().chain([&absent]).map(|d| d.to_proto()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (i, entry) in read.responses.iter().enumerate() {
        if i < 50 {
            assert_eq!(entry.data, blobs[i]);
        } else {
            assert_eq!(entry.status.as_ref().unwrap().code, Code::NotFound as i32);
        }
    }
}

#[tokio::test]
async fn zstd_batch_upload_and_compressed_batch_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let mut cas = server.cas().await;
    let data = b"compressible ".repeat(2000);
    let digest = sha256(&data);
    let packed = zstd::bulk::compress(&data, 3).unwrap();
    let mut entry = update(&digest, packed);
    entry.compressor = compressor::Value::Zstd as i32;
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest { requests: vec![entry], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses[0].status.as_ref().unwrap().code, 0);
    let read = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![digest.to_proto()],
            acceptable_compressors: vec![compressor::Value::Zstd as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let entry = &read.responses[0];
    assert_eq!(entry.compressor, compressor::Value::Zstd as i32);
    assert!(entry.data.len() < data.len());
    assert_eq!(zstd::bulk::decompress(&entry.data, data.len()).unwrap(), data);
}

#[tokio::test]
async fn bad_batch_input_gets_clear_errors_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &["--max-batch", "1MiB"]);
    let mut cas = server.cas().await;

    // Content that does not match its digest: per-entry INVALID_ARGUMENT naming the digest.
    let claimed = sha256(b"the real content");
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![update(&claimed, b"other content!!!".to_vec())],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = response.responses[0].status.as_ref().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(status.message.contains(&claimed.hash_hex()), "{}", status.message);

    // Size that does not match.
    let data = b"sized".to_vec();
    let mut wrong_size = sha256(&data);
    wrong_size.size_bytes = 6;
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest { requests: vec![update(&wrong_size, data)], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses[0].status.as_ref().unwrap().code, Code::InvalidArgument as i32);

    // Over the announced batch limit: the whole call is refused.
    let big = bytes(1, 600 << 10);
    let big2 = bytes(2, 600 << 10);
    let err = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![update(&sha256(&big), big.clone()), update(&sha256(&big2), big2)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("batch limit"), "{}", err.message());

    // Malformed digests and unknown digest functions.
    let cases = [
        (casbuild_proto::reapi::Digest { hash: "xyz".into(), size_bytes: 1 }, 0, "no supported function"),
        (casbuild_proto::reapi::Digest { hash: "g".repeat(64), size_bytes: 1 }, 0, "not lowercase hex"),
        (casbuild_proto::reapi::Digest { hash: "a".repeat(64), size_bytes: -4 }, 0, "negative"),
        (
            casbuild_proto::reapi::Digest { hash: "a".repeat(40), size_bytes: 1 },
            digest_function::Value::Sha1 as i32,
            "not supported",
        ),
        (casbuild_proto::reapi::Digest { hash: "a".repeat(64), size_bytes: 1 }, 77, "not a known"),
    ];
    for (digest, function, want) in cases {
        let err = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![digest],
                digest_function: function,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(want), "{} should mention {want}", err.message());
    }
    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![claimed.to_proto()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1, "nothing was stored under the mismatched digest");
}

#[tokio::test]
async fn instances_are_separate_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let mut cas = server.cas().await;
    let data = b"instance scoped".to_vec();
    let digest = sha256(&data);
    cas.batch_update_blobs(BatchUpdateBlobsRequest {
        instance_name: "team/a".into(),
        requests: vec![update(&digest, data)],
        ..Default::default()
    })
    .await
    .unwrap();
    for (instance, expect_missing) in [("team/a", 0), ("team/b", 1), ("", 1)] {
        let missing = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: instance.into(),
                blob_digests: vec![digest.to_proto()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(missing.missing_blob_digests.len(), expect_missing, "instance {instance:?}");
    }
}

/// Uploads a chain of `depth` nested directories, each holding `width` files
/// and the next one; returns the root digest and how many Directory protos exist.
async fn upload_tree(server: &Coordinator, depth: usize, width: usize) -> (casbuild_cas::Digest, usize) {
    let mut cas = server.cas().await;
    let mut requests = Vec::new();
    let mut child: Option<casbuild_cas::Digest> = None;
    for level in 0..depth {
        let mut dir = Directory::default();
        for i in 0..width {
            let content = format!("level {level} file {i}").into_bytes();
            let digest = sha256(&content);
            requests.push(update(&digest, content));
            dir.files.push(FileNode {
                name: format!("f{i:03}"),
                digest: Some(digest.to_proto()),
                ..Default::default()
            });
        }
        if let Some(c) = child {
            dir.directories.push(DirectoryNode { name: "sub".into(), digest: Some(c.to_proto()) });
        }
        let bytes = dir.encode_to_vec();
        let digest = sha256(&bytes);
        requests.push(update(&digest, bytes));
        child = Some(digest);
    }
    cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();
    (child.unwrap(), depth)
}

#[tokio::test]
async fn get_tree_pages_through_a_deep_tree() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let (root, count) = upload_tree(&server, 25, 3).await;
    let mut cas = server.cas().await;
    let mut all = Vec::new();
    let mut token = String::new();
    let mut calls = 0;
    loop {
        calls += 1;
        let mut stream = cas
            .get_tree(GetTreeRequest {
                root_digest: Some(root.to_proto()),
                page_size: 4,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Read only the first page of each call, then resume by token.
        let page = stream.next().await.unwrap().unwrap();
        assert!(page.directories.len() <= 4);
        all.extend(page.directories);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(all.len(), count);
    assert_eq!(calls, count.div_ceil(4));
    assert_eq!(sha256(&all[0].encode_to_vec()), root, "breadth-first from the root");

    // A token this server did not issue.
    let err = cas
        .get_tree(GetTreeRequest {
            root_digest: Some(root.to_proto()),
            page_token: "bogus".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A root that is not there.
    let err = cas
        .get_tree(GetTreeRequest { root_digest: Some(sha256(b"no such dir").to_proto()), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn get_tree_refuses_malformed_directories() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let mut cas = server.cas().await;
    let file = |name: &str| FileNode { name: name.into(), digest: Some(sha256(b"").to_proto()), ..Default::default() };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x0a, 0xff, 0xff, 0xff], "not a Directory proto"),
        (Directory { files: vec![file("b"), file("a")], ..Default::default() }.encode_to_vec(), "not sorted"),
        (Directory { files: vec![file("a"), file("a")], ..Default::default() }.encode_to_vec(), "duplicate"),
        (Directory { files: vec![file("a/b")], ..Default::default() }.encode_to_vec(), "contains '/'"),
        (Directory { files: vec![file(".")], ..Default::default() }.encode_to_vec(), "not allowed"),
        (Directory { files: vec![file("..")], ..Default::default() }.encode_to_vec(), "not allowed"),
    ];
    for (bytes, want) in cases {
        let digest = sha256(&bytes);
        cas.batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![update(&digest, bytes)],
            ..Default::default()
        })
        .await
        .unwrap();
        let result = cas.get_tree(GetTreeRequest { root_digest: Some(digest.to_proto()), ..Default::default() }).await;
        let err = match result {
            Err(status) => status,
            Ok(stream) => stream.into_inner().next().await.unwrap().unwrap_err(),
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {}", err.message());
        assert!(err.message().contains(want) && err.message().contains(&digest.hash_hex()), "{}", err.message());
    }
}
