//! A cold large file is read while it streams in: reads at its start, far
//! into it and at its last byte get the right bytes before the whole blob has
//! arrived, and the blob counts as cached only once it is complete and
//! verified. The server sends its chunks slowly (a slow link), so the reads
//! meet the stream in progress. Needs root.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::Bytes;
use casbuild_cas::digest::DigestFunction;
use casbuild_cas::store::BlobStore;
use common::liar::Liar;

const F: DigestFunction = DigestFunction::Blake3;

#[test]
fn a_cold_large_file_is_read_anywhere_while_it_streams_in() {
    if !common::needs_root("a_cold_large_file_is_read_anywhere_while_it_streams_in", true) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let big = Bytes::from(common::bytes(7, 64 << 20));
    let digest = F.digest_of(&big);
    let (root_bytes, root_digest) = common::liar::directory_of(&[("big.bin", &big)]);
    // 1,024 chunks of 64 KiB, each after 2 ms: the stream takes 2 s or more.
    let mut liar = Liar::honest(&[big.clone(), root_bytes]);
    liar.pace = Duration::from_millis(2);
    let url = liar.spawn(&runtime, |router| router);

    let dir = tempfile::tempdir().unwrap();
    let (mount, local) = common::liar::mount_of(&runtime, &url, dir.path(), Duration::from_secs(30));
    let path = mount.register("big", root_digest).unwrap().join("big.bin");
    let file = File::open(&path).unwrap();

    let read = |offset: usize, len: usize| {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset as u64).unwrap();
        assert!(buf == big[offset..offset + len], "the {len} bytes at {offset} are the blob's");
    };
    read(0, 1 << 20);
    read(48 << 20, 256 << 10);
    read(big.len() - 1, 1);
    read((48 << 20) + (200 << 10), 100_000);
    assert!(
        runtime.block_on(local.find_missing(&[digest])).unwrap() == vec![digest],
        "the blob is not in the cache while it streams"
    );

    // Read to the end: every byte right, then the blob is cached, verified.
    let mut whole = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut whole).unwrap();
    assert!(whole == big, "a sequential read of the whole file gets the blob");
    let cached = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        runtime.block_on(local.find_missing(&[digest])).unwrap().is_empty()
    });
    assert!(cached, "the verified blob is in the cache once it has arrived");
    runtime.block_on(mount.verify_streamed("big")).expect("what was read while streaming verified");
    assert_eq!(std::fs::read(&path).unwrap(), big, "a warm open reads the cached file");
    assert_eq!(mount.stats().remote_reads, 2, "the root Directory, then one stream (ranged reads aside) for the file");
    drop(file);
    mount.unmount().unwrap();
}
