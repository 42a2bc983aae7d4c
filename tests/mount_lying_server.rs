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
use casbuild_cas::store::{DiskStore, RemoteStore, RemoteStoreOptions};
use casbuild_mount::{BlobCache, CasMount, MountOptions};
use casbuild_proto::reapi::{Directory, FileNode};
use common::liar::Liar;
use prost::Message;

const F: DigestFunction = DigestFunction::Blake3;

#[test]
fn blobs_that_do_not_match_their_digest_are_never_served_or_kept() {
    if !common::needs_root("blobs_that_do_not_match_their_digest", true) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (small, large, honest) = (common::bytes(1, 10_000), common::bytes(2, 300_000), common::bytes(3, 5_000));
    let streamed = common::bytes(4, 12 << 20);
    let file = |name: &str, data: &[u8]| FileNode {
        name: name.into(),
        digest: Some(F.digest_of(data).to_proto()),
        is_executable: false,
        node_properties: None,
    };
    let root = Directory {
        files: vec![
            file("honest.txt", &honest),
            file("large.bin", &large),
            file("small.bin", &small),
            file("streamed.bin", &streamed),
        ],
        ..Default::default()
    };
    let root_bytes = Bytes::from(root.encode_to_vec());
    let root_digest = F.digest_of(&root_bytes);
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
    let remote = runtime.block_on(RemoteStore::connect(&url, RemoteStoreOptions::default())).unwrap();
    let local = DiskStore::open(&dir.path().join("cache"), 1 << 30).unwrap();
    let cache = Arc::new(BlobCache::new(local.clone(), Arc::new(remote), "", Duration::from_secs(5)));
    let mount =
        CasMount::mount(&dir.path().join("cas"), cache, runtime.handle().clone(), &MountOptions::default()).unwrap();
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
