//! What the disk tier promises: corruption is detected and never served,
//! blobs and action results survive restarts, the byte budget holds, a full
//! disk is reported and leaves nothing half-written.

mod common;

use casbuild_cas::resource::{Compressor, ResourceName};
use casbuild_cas::Digest;
use casbuild_proto::bytestream::{ReadRequest, WriteRequest};
use casbuild_proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use common::{bytes, privileged, sha256, Coordinator, Tmpfs};
use futures::StreamExt;
use tonic::Code;

const MIB: usize = 1 << 20;

async fn put(server: &Coordinator, data: &[u8]) -> Result<Digest, tonic::Status> {
    let digest = sha256(data);
    let name = ResourceName::write("", Compressor::Identity, digest).to_string();
    let mut reqs: Vec<WriteRequest> = data
        .chunks(MIB)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * MIB) as i64,
            finish_write: false,
            data: c.to_vec(),
        })
        .collect();
    reqs.last_mut().unwrap().finish_write = true;
    server.bytestream().await.write(futures::stream::iter(reqs)).await?;
    Ok(digest)
}

/// Reads a whole blob; returns the bytes received and the error, if any.
async fn get(server: &Coordinator, digest: &Digest) -> (Vec<u8>, Option<tonic::Status>) {
    let name = ResourceName::read("", Compressor::Identity, *digest).to_string();
    let mut out = Vec::new();
    let mut stream =
        match server.bytestream().await.read(ReadRequest { resource_name: name, ..Default::default() }).await {
            Ok(s) => s.into_inner(),
            Err(e) => return (out, Some(e)),
        };
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => out.extend_from_slice(&c.data),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

async fn missing(server: &Coordinator, digests: &[Digest]) -> Vec<String> {
    server
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .into_iter()
        .map(|d| d.hash)
        .collect()
}

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut content = std::fs::read(path).unwrap();
    content[at] ^= 0x01;
    std::fs::write(path, content).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_blob_files_are_detected_removed_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let large = bytes(1, 12 * MIB); // streamed from disk
    let small = bytes(2, 4000); // read whole
    let large_d = put(&server, &large).await.unwrap();
    let small_d = put(&server, &small).await.unwrap();
    server.stop();

    // Restart so nothing is served from the memory tier, then corrupt both.
    let server = Coordinator::start(dir.path(), &[]);
    flip_byte(&server.blob_path(&large_d), 11 * MIB);
    flip_byte(&server.blob_path(&small_d), 10);

    let (received, err) = get(&server, &large_d).await;
    assert!(received.len() < large.len(), "the corrupt blob was not delivered whole");
    assert_eq!(err.expect("read fails").code(), Code::NotFound);
    let (received, err) = get(&server, &small_d).await;
    assert!(received.is_empty());
    let err = err.expect("read fails");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("corrupt"), "{}", err.message());

    assert!(!server.blob_path(&large_d).exists() && !server.blob_path(&small_d).exists());
    assert_eq!(missing(&server, &[large_d, small_d]).await.len(), 2);
    // And the client can upload it again.
    put(&server, &large).await.unwrap();
    assert_eq!(get(&server, &large_d).await.0, large);
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_and_action_results_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let out = bytes(3, 2 * MIB);
    let out_d = put(&server, &out).await.unwrap();
    let action = sha256(b"an action");
    let result = ActionResult {
        output_files: vec![OutputFile { path: "out.bin".into(), digest: Some(out_d.to_proto()), ..Default::default() }],
        exit_code: 0,
        ..Default::default()
    };
    server
        .action_cache()
        .await
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    server.stop();

    let server = Coordinator::start(dir.path(), &[]);
    assert_eq!(get(&server, &out_d).await.0, out);
    let cached = server
        .action_cache()
        .await
        .get_action_result(GetActionResultRequest { action_digest: Some(action.to_proto()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached, result);

    // A power loss can leave an entry empty (renamed, contents not on disk):
    // that is a miss, never an empty "successful" result.
    let name = format!("{}-{}", action.hash_hex(), action.size_bytes);
    let entry = walk_for(dir.path(), &name).expect("the entry is on disk");
    server.stop();
    std::fs::write(&entry, []).unwrap();
    let server = Coordinator::start(dir.path(), &[]);
    let request = GetActionResultRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    let err = server.action_cache().await.get_action_result(request).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a torn entry is a miss");
    // Another instance does not see it.
    let err = server
        .action_cache()
        .await
        .get_action_result(GetActionResultRequest {
            instance_name: "other".into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn the_disk_budget_evicts_least_recently_used_blobs_and_results_that_lose_blobs_miss() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(dir.path(), &["--max-disk", "10MiB"]);
    let stdout = bytes(100, 2 * MIB);
    let stdout_d = put(&server, &stdout).await.unwrap();
    let action = sha256(b"action with stdout");
    let mut ac = server.action_cache().await;
    let result = ActionResult { stdout_digest: Some(stdout_d.to_proto()), ..Default::default() };
    ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .unwrap();
    let request = || GetActionResultRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    ac.get_action_result(request()).await.unwrap();

    let mut digests = Vec::new();
    for i in 0..8 {
        digests.push(put(&server, &bytes(i, 2 * MIB)).await.unwrap());
    }
    let used: u64 = walk_size(&dir.path().join("cas"));
    assert!(used <= 10 * MIB as u64, "{used} bytes on disk over a 10 MiB budget");
    // 18 MiB went in; blobs get 15/16 of the budget (the rest is for
    // action-cache and asset entries), so four 2 MiB blobs fit: the stdout
    // blob (last used by the cache lookup) and the four oldest uploads are evicted.
    let gone = missing(&server, &digests).await;
    assert_eq!(gone, digests[..4].iter().map(|d| d.hash_hex()).collect::<Vec<_>>(), "oldest first");
    assert!(missing(&server, &digests[4..]).await.is_empty());

    let err = ac.get_action_result(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&stdout_d.hash_hex()), "{}", err.message());
}

fn walk_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { walk_size(&entry.path()) } else { meta.len() };
    }
    total
}

#[tokio::test]
async fn a_full_disk_is_resource_exhausted_and_leaves_no_half_written_blob() {
    let dir = tempfile::tempdir().unwrap();
    // A 6 MiB tmpfs as the storage directory, with a disk budget far above it.
    let mut tmpfs = None;
    if !privileged("a_full_disk_is_resource_exhausted", || {
        tmpfs = Some(Tmpfs::mount(dir.path(), "6m")?);
        Ok(())
    }) {
        return;
    }
    let server = Coordinator::start(dir.path(), &["--max-disk", "1GiB"]);
    let first = bytes(1, 3 * MIB);
    let first_d = put(&server, &first).await.unwrap();
    let too_big = bytes(2, 4 * MIB);
    let err = put(&server, &too_big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert_eq!(missing(&server, &[sha256(&too_big)]).await.len(), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "temp file removed");
    assert_eq!(get(&server, &first_d).await.0, first, "earlier blobs are intact");
    // Concurrent writers of one blob that fits leave one correct copy. Each
    // writer stages its own temp file, so on this nearly full disk some may be
    // refused with RESOURCE_EXHAUSTED; none may corrupt the blob or leak space.
    let fits = bytes(3, MIB);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let fits = fits.clone();
            let addr = server.addr.clone();
            tokio::spawn(async move {
                let name = ResourceName::write("", Compressor::Identity, sha256(&fits)).to_string();
                let channel =
                    tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
                let mut client = casbuild_proto::bytestream::byte_stream_client::ByteStreamClient::new(channel);
                let req = WriteRequest { resource_name: name, write_offset: 0, finish_write: true, data: fits };
                client.write(futures::stream::iter(vec![req])).await.map(|_| ())
            })
        })
        .collect();
    let mut stored = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(()) => stored += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message()),
        }
    }
    assert!(stored >= 1, "at least one concurrent writer stores the blob");
    assert_eq!(get(&server, &sha256(&fits)).await.0, fits);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "temp files removed");
    drop(server);
    drop(tmpfs);
}

/// The file named `name` under `dir`, excluding the CAS's own blob files.
fn walk_for(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "cas") {
                continue;
            }
            if let Some(found) = walk_for(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

#[tokio::test]
async fn action_cache_entries_count_toward_the_disk_budget_and_go_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB: 1/16 for entries, 3/4 of that (48 KiB) for action-cache
    // entries, which cost a 4 KiB block each: twelve fit.
    let server = Coordinator::start(dir.path(), &["--max-disk", "1MiB"]);
    let mut ac = server.action_cache().await;
    let actions: Vec<_> = (0..20).map(|i| sha256(format!("action {i}").as_bytes())).collect();
    let get = |action: &casbuild_cas::Digest| GetActionResultRequest {
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    for (i, action) in actions.iter().enumerate() {
        let result = ActionResult { exit_code: i as i32, ..Default::default() };
        let request = UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        };
        ac.update_action_result(request).await.unwrap();
        if i == 11 {
            // Reading the first keeps it among the recently used.
            ac.get_action_result(get(&actions[0])).await.unwrap();
        }
    }
    let mut present = Vec::new();
    for action in &actions {
        present.push(ac.get_action_result(get(action)).await.is_ok());
    }
    let expected: Vec<bool> = (0..20).map(|i| i == 0 || i >= 9).collect();
    assert_eq!(present, expected);
    let files = walk_count(&dir.path().join("ac/entries"));
    assert_eq!(files, 12, "evicted entries leave no files");
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| if e.metadata().unwrap().is_dir() { walk_count(&e.path()) } else { 1 })
        .sum()
}
