//! Prefetching an input root's files from an access profile: files are made
//! local before anything opens them, within the byte bound; paths that name
//! nothing, no file, or lead outside the root are skipped; nothing is logged
//! as accessed. Needs root (a FUSE mount).

mod common;

use std::time::Duration;

use bytes::Bytes;
use casbuild_cas::digest::DigestFunction;
use casbuild_mount::{PrefetchLimits, PrefetchStats};
use casbuild_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use common::liar::Liar;
use prost::Message;

const F: DigestFunction = DigestFunction::Blake3;
const SMALL: usize = 16 << 10;

fn file_node(name: &str, data: &[u8]) -> FileNode {
    FileNode { name: name.into(), digest: Some(F.digest_of(data).to_proto()), ..Default::default() }
}

#[test]
fn a_prefetch_makes_files_local_within_its_bound_and_logs_nothing() {
    if !common::needs_root("a_prefetch_makes_files_local_within_its_bound_and_logs_nothing", true) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // sub/f00..f19 of 16 KiB, big.bin of 12 MiB (streamed in), a symlink.
    let smalls: Vec<Bytes> = (0..20).map(|i| Bytes::from(common::bytes(100 + i, SMALL))).collect();
    let big = Bytes::from(common::bytes(7, 12 << 20));
    let sub = Directory {
        files: smalls.iter().enumerate().map(|(i, data)| file_node(&format!("f{i:02}"), data)).collect(),
        ..Default::default()
    };
    let sub_bytes = Bytes::from(sub.encode_to_vec());
    let root = Directory {
        files: vec![file_node("big.bin", &big)],
        directories: vec![DirectoryNode { name: "sub".into(), digest: Some(F.digest_of(&sub_bytes).to_proto()) }],
        symlinks: vec![SymlinkNode { name: "link".into(), target: "sub/f00".into(), ..Default::default() }],
        ..Default::default()
    };
    let root_bytes = Bytes::from(root.encode_to_vec());
    let root_digest = F.digest_of(&root_bytes);
    let mut blobs = smalls.clone();
    blobs.extend([big.clone(), sub_bytes, root_bytes]);
    let url = Liar::honest(&blobs).spawn(&runtime, |router| router);

    let dir = tempfile::tempdir().unwrap();
    let (mount, _local) = common::liar::mount_of(&runtime, &url, dir.path(), Duration::from_secs(30));
    let first = mount.register("first", root_digest).unwrap();
    let mut paths: Vec<String> = (0..20).map(|i| format!("sub/f{i:02}")).collect();
    paths.push("big.bin".into());
    let strays = ["missing", "sub", "link", "../first/big.bin", "sub/../big.bin", "big.bin/x", ""];
    paths.extend(strays.iter().map(|s| s.to_string()));

    // A bound of six small files: the big one never fits.
    let limits = PrefetchLimits { max_bytes: 6 * SMALL as u64 + 100, concurrency: 4 };
    let stats = runtime.block_on(mount.prefetch("first", paths.clone(), limits).unwrap().finish());
    assert_eq!(
        stats,
        PrefetchStats { files: 6, bytes: 6 * SMALL as u64, missing: strays.len() as u64, over_bound: 15, failed: 0 }
    );
    assert_eq!(mount.stats().remote_reads, 2 + 6, "the two directories and the six files that fit, nothing more");
    assert!(mount.access_report("first").unwrap().touched().is_empty(), "a prefetch is not an access");

    // Within a large bound everything is fetched; the command's reads then
    // need nothing more from the server.
    let second = mount.register("second", root_digest).unwrap();
    let limits = PrefetchLimits { max_bytes: 64 << 20, concurrency: 4 };
    let stats = runtime.block_on(mount.prefetch("second", paths, limits).unwrap().finish());
    assert_eq!((stats.files, stats.over_bound, stats.failed), (21, 0, 0));
    let fetched = mount.stats().remote_reads;
    for (i, data) in smalls.iter().enumerate() {
        assert!(std::fs::read(second.join(format!("sub/f{i:02}"))).unwrap() == *data);
    }
    assert!(std::fs::read(second.join("big.bin")).unwrap() == big);
    assert_eq!(mount.stats().remote_reads, fetched, "prefetched files are opened from the local cache");
    let report = mount.access_report("second").unwrap();
    assert_eq!(report.opened.len(), 21, "the command's own opens are logged as always");

    assert!(mount.prefetch("nobody", vec!["x".into()], limits).is_err(), "only registered roots");
    assert!(first.ends_with("first"));
    mount.unmount().unwrap();
}
