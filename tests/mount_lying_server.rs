//! A CAS server that lies: it serves file blobs whose bytes do not match
//! their digests. The mount must answer EIO and keep nothing of them — for
//! small blobs (BatchReadBlobs), large ones (ByteStream) and large ones read
//! while they stream in. Needs root.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::BlobStore;
use common::liar::Liar;

const F: DigestFunction = DigestFunction::Blake3;

#[test]
fn blobs_that_do_not_match_their_digest_are_never_served_or_kept() {
    if !common::needs_root("blobs_that_do_not_match_their_digest", true) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (small, large, honest) = (common::bytes(1, 10_000), common::bytes(2, 300_000), common::bytes(3, 5_000));
    let streamed = common::bytes(4, 12 << 20);
    let (root_bytes, root_digest) = common::liar::directory_of(&[
        ("honest.txt", &honest),
        ("large.bin", &large),
        ("small.bin", &small),
        ("streamed.bin", &streamed),
    ]);
    let mut blobs = HashMap::new();
    for data in [&small, &large, &honest, &streamed] {
        blobs.insert(F.digest_of(data).hash_hex(), Bytes::from(data.clone()));
    }
    blobs.insert(root_digest.hash_hex(), root_bytes);
    let liar = Liar {
        blobs: Arc::new(blobs),
        lies: Arc::new([&small, &large, &streamed].iter().map(|d| F.digest_of(d).hash_hex()).collect()),
        ..Default::default()
    };

    let url = liar.spawn(&runtime, |router| router);
    let dir = tempfile::tempdir().unwrap();
    let (mount, local) = common::liar::mount_of(&runtime, &url, dir.path(), Duration::from_secs(5));
    let input = mount.register("liar", root_digest).unwrap();

    assert_eq!(std::fs::read(input.join("honest.txt")).unwrap(), honest, "true blobs are served");
    for name in ["small.bin", "large.bin", "streamed.bin"] {
        let err = std::fs::read(input.join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: a blob that fails its digest is an I/O error");
    }
    // The streamed file's first bytes were served before the verdict; whoever
    // used them learns that they did not verify.
    let verdict = runtime.block_on(mount.verify_streamed("liar")).unwrap_err();
    assert!(verdict.contains(&F.digest_of(&streamed).to_string()), "{verdict}");
    let lied: Vec<Digest> = [&small, &large, &streamed].iter().map(|d| F.digest_of(d)).collect();
    let kept = runtime.block_on(local.find_missing(&lied)).unwrap();
    assert_eq!(kept, lied, "nothing of the false blobs was cached");
    // Writes of true blobs finish behind the reader's back: wait for those
    // (bounded); a partial file of a false blob would stay for good.
    let tmp = dir.path().join("cache/tmp");
    let sizes =
        || -> Vec<u64> { std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).collect() };
    let mut left = sizes();
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        left = sizes();
    }
    assert!(left.is_empty(), "no partial file left: sizes {left:?}");
    mount.unmount().unwrap();
}
