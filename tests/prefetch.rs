//! Prefetch from access profiles through a real worker: a command's second
//! run (new input root, same command) gets the inputs its first run opened
//! fetched ahead, even those it does not open this time, and its result is
//! exactly what it would be without; `--prefetch-bytes` bounds what is
//! fetched. Needs root (FUSE, namespaces).

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use casbuild_cas::digest::Digest;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{Directory, FileNode};
use common::execute::{blob, execute, execute_request, output_digest, shell_action_over, upload, F};
use common::{needs_root, start_worker, Coordinator};

/// Reads the file `which` names; sleeps so that a prefetch has time to finish.
const SCRIPT: &str = r#"cat "$(cat which)" > out; sleep 1"#;

/// A root of `which` (naming `target`), `big` and `x`, with its blobs.
fn tree(target: &str, big: &[u8], x: &[u8]) -> (Directory, Vec<(Digest, Bytes)>) {
    let files = [("big", big), ("which", target.as_bytes()), ("x", x)];
    let root = Directory {
        files: files
            .iter()
            .map(|(name, data)| FileNode {
                name: (*name).into(),
                digest: Some(F.digest_of(data).to_proto()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut blobs: Vec<_> = files.iter().map(|(_, data)| (F.digest_of(data), Bytes::copy_from_slice(data))).collect();
    blobs.push(blob(&root));
    (root, blobs)
}

/// Where worker `n`'s blob cache keeps `digest`.
fn cached(dir: &Path, n: u32, digest: &Digest) -> PathBuf {
    let hash = digest.hash_hex();
    dir.join(format!("worker-{n}/cache/cas/default/sha256/{}/{hash}-{}", &hash[..2], digest.size_bytes))
}

/// Runs the command over a root reading `big`, then over a new root reading
/// `x`; returns the second run's output hash and the second `big`'s digest.
async fn second_run(server: &Coordinator, seed: u64) -> (String, Digest, Bytes) {
    let mut client = ExecutionClient::new(server.channel().await);
    let (first, mut blobs) = tree("big", &common::bytes(seed, 2 << 20), b"one");
    let (action, more) = shell_action_over(SCRIPT, &first, false);
    blobs.extend(more);
    upload(server, blobs).await;
    let response = execute(&mut client, execute_request(&action, true)).await;
    assert_eq!(response.result.as_ref().unwrap().exit_code, 0, "{response:?}");

    let (big, x) = (common::bytes(seed + 1, 2 << 20), Bytes::from_static(b"two"));
    let (second, mut blobs) = tree("x", &big, &x);
    let (action, more) = shell_action_over(SCRIPT, &second, false);
    blobs.extend(more);
    upload(server, blobs).await;
    let response = execute(&mut client, execute_request(&action, true)).await;
    assert_eq!(response.result.as_ref().unwrap().exit_code, 0, "{response:?}");
    (output_digest(&response), F.digest_of(&big), x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_of_inputs_the_action_never_opens_leaves_its_result_alone() {
    if !needs_root("a_prefetch_of_inputs_the_action_never_opens_leaves_its_result_alone", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);

    let worker = start_worker(&server, dir.path(), 1, &[]);
    let (out, big, x) = second_run(&server, 10).await;
    assert_eq!(out, F.digest_of(&x).hash_hex(), "the second run read `x`, as without a prefetch");
    assert!(cached(dir.path(), 1, &big).exists(), "the `big` the first run opened was fetched for the second");
    worker.stop();

    // Under a bound smaller than `big`, nothing of it is fetched.
    let _worker = start_worker(&server, dir.path(), 2, &["--prefetch-bytes", "1MiB"]);
    let (out, big, x) = second_run(&server, 20).await;
    assert_eq!(out, F.digest_of(&x).hash_hex());
    assert!(!cached(dir.path(), 2, &big).exists(), "a file over the prefetch bound is left to its own open");
}
