//! The /cas filesystem over a real FUSE mount, fed by a real coordinator
//! process: what appears, what gets fetched and when, what is logged, and
//! how it fails. Needs root (see `common::privileged`).

mod common;

use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{DiskStore, RemoteStore, RemoteStoreOptions};
use casbuild_mount::{BlobCache, CasMount, MountOptions};
use common::{bytes, casbuild, needs_root, privileged, sample_tree, Coordinator};

const MIB: usize = 1 << 20;
/// How long a fetch may stall before the mount gives up (EIO).
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// A coordinator, a blob cache and a mount of it, torn down in that order.
struct Fixture {
    mount: Option<CasMount>,
    server: Option<Coordinator>,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// `None` (after saying so) when mounting is not possible here and CI did not require it.
    fn start(test: &str, cache_budget: u64) -> Option<Fixture> {
        Fixture::start_with(test, cache_budget, MountOptions::default())
    }

    fn start_with(test: &str, cache_budget: u64, options: MountOptions) -> Option<Fixture> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("storage")).unwrap();
        let server = Coordinator::start(&dir.path().join("storage"), &[]);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let url = server.url();
        let remote = runtime
            .block_on(RemoteStore::connect(&url, RemoteStoreOptions { timeout: FETCH_TIMEOUT, ..Default::default() }))
            .unwrap();
        let local = DiskStore::open(&dir.path().join("cache"), cache_budget).unwrap();
        let cache = Arc::new(BlobCache::new(local, Arc::new(remote), "", FETCH_TIMEOUT));
        let mut mount = None;
        let mountpoint = dir.path().join("cas");
        let handle = runtime.handle().clone();
        if !privileged(test, || {
            mount = Some(CasMount::mount(&mountpoint, cache, handle, &options).map_err(|e| e.to_string())?);
            Ok(())
        }) {
            return None;
        }
        Some(Fixture { mount, server: Some(server), runtime, dir })
    }

    fn mount(&self) -> &CasMount {
        self.mount.as_ref().unwrap()
    }

    fn server(&self) -> &Coordinator {
        self.server.as_ref().unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mount().mountpoint().join(rel)
    }

    /// Uploads a local directory or file with the CLI and returns its digest.
    fn upload(&self, path: &Path) -> Digest {
        let out = casbuild().args(["cas", "upload", "--remote", &self.server().url()]).arg(path).output().unwrap();
        assert!(out.status.success(), "upload: {}", String::from_utf8_lossy(&out.stderr));
        Digest::parse(DigestFunction::Blake3, String::from_utf8(out.stdout).unwrap().trim()).unwrap()
    }

    /// Writes a tree with `make` under a scratch directory and uploads it.
    fn upload_tree(&self, name: &str, make: impl FnOnce(&Path)) -> Digest {
        let src = self.dir.path().join("src").join(name);
        std::fs::create_dir_all(&src).unwrap();
        make(&src);
        self.upload(&src)
    }

    fn remote_reads(&self) -> u64 {
        self.mount().stats().remote_reads
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            mount.unmount().expect("unmount");
        }
        drop(self.server.take());
        let _ = &self.runtime;
    }
}

/// Asserts that the mounted tree `got` has the names, kinds, contents,
/// executable bits and link targets of the local tree `want`, and that the
/// mount reports its read-only modes.
fn assert_same_tree(want: &Path, got: &Path) {
    let names = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    assert_eq!(names(want), names(got), "entries of {}", got.display());
    for name in names(want) {
        let (w, g) = (want.join(&name), got.join(&name));
        let (wm, gm) = (std::fs::symlink_metadata(&w).unwrap(), std::fs::symlink_metadata(&g).unwrap());
        if wm.file_type().is_symlink() {
            assert!(gm.file_type().is_symlink(), "{} is a symlink", g.display());
            assert_eq!(std::fs::read_link(&w).unwrap(), std::fs::read_link(&g).unwrap());
        } else if wm.is_dir() {
            assert!(gm.is_dir(), "{} is a directory", g.display());
            assert_eq!(gm.permissions().mode() & 0o7777, 0o555);
            assert_same_tree(&w, &g);
        } else {
            assert!(gm.is_file(), "{} is a file", g.display());
            let executable = wm.permissions().mode() & 0o100 != 0;
            assert_eq!(gm.permissions().mode() & 0o7777, if executable { 0o555 } else { 0o444 }, "{}", g.display());
            assert_eq!(gm.len(), wm.len());
            assert!(std::fs::read(&w).unwrap() == std::fs::read(&g).unwrap(), "contents of {}", g.display());
        }
    }
}

#[test]
fn registered_trees_appear_exactly_and_read_only() {
    let Some(fx) = Fixture::start("registered_trees_appear_exactly_and_read_only", 1 << 30) else { return };
    let root = fx.upload_tree("sample", sample_tree);
    let src = fx.dir.path().join("src/sample");

    let path = fx.mount().register("action-1", root).unwrap();
    assert_eq!(path, fx.path("inputs/action-1"));
    assert_same_tree(&src, &path);
    // The same tree by digest, and one of its blobs by digest.
    assert_same_tree(&src, &fx.path(&format!("trees/blake3/{}-{}", root.hash_hex(), root.size_bytes)));
    let data = std::fs::read(src.join("src/main.c")).unwrap();
    let blob = DigestFunction::Blake3.digest_of(&data);
    assert_eq!(std::fs::read(fx.path(&format!("blobs/blake3/{}-{}", blob.hash_hex(), blob.size_bytes))).unwrap(), data);
    let absent = DigestFunction::Blake3.digest_of(b"never uploaded");
    let err = std::fs::metadata(fx.path(&format!("blobs/blake3/{}-{}", absent.hash_hex(), absent.size_bytes)));
    assert_eq!(err.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::metadata(fx.path("blobs/blake3/not-a-digest")).unwrap_err().kind(), ErrorKind::NotFound);

    // Stable inode numbers and fixed times.
    let a = std::fs::metadata(path.join("src/main.c")).unwrap();
    let b = std::fs::metadata(path.join("src/main.c")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.mtime(), 946_684_800, "entries without node properties get the fixed time");

    // Everything is read-only.
    let erofs = |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(std::fs::write(path.join("new-file"), "x"));
    erofs(std::fs::write(path.join("src/main.c"), "x"));
    erofs(std::fs::create_dir(path.join("new-dir")));
    erofs(std::fs::remove_file(path.join("empty")));
    erofs(std::fs::set_permissions(path.join("empty"), std::fs::Permissions::from_mode(0o777)));

    let stat = nix::sys::statvfs::statvfs(&path).unwrap();
    assert!(stat.blocks() > 0 && stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));

    // Unregistering removes it, also from the kernel's caches; the name can be reused.
    fx.mount().unregister("action-1").unwrap();
    assert_eq!(std::fs::metadata(path.join("src/main.c")).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(fx.mount().unregister("action-1").is_err(), "a second unregister is an error");
    fx.mount().register("action-1", root).unwrap();
    assert_same_tree(&src, &path);
    assert!(fx.mount().register("action-1", root).is_err(), "names are unique");
    assert!(fx.mount().register("a/b", root).is_err(), "names are single path components");
    let listed: Vec<_> = std::fs::read_dir(fx.path("inputs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(listed, ["action-1"]);
}

#[test]
fn without_passthrough_reads_are_served_and_logged_by_the_mount() {
    let options = MountOptions { passthrough: false, ..Default::default() };
    let Some(fx) = Fixture::start_with("without_passthrough_reads_are_served", 1 << 30, options) else { return };
    let root = fx.upload_tree("plain", sample_tree);
    let path = fx.mount().register("plain", root).unwrap();
    assert_same_tree(&fx.dir.path().join("src/plain"), &path);
    let stats = fx.mount().stats();
    assert!(!stats.passthrough && stats.passthrough_opens == 0);
    let report = fx.mount().access_report("plain").unwrap();
    assert!(report.read.contains("src/nested/deeper/data.bin") && report.read.contains("run.sh"));
    assert!(!report.read.contains("empty"), "the empty file has no bytes to read");
}

#[test]
fn nothing_is_fetched_before_it_is_needed() {
    let Some(fx) = Fixture::start("nothing_is_fetched_before_it_is_needed", 1 << 30) else { return };
    let root = fx.upload_tree("lazy", sample_tree);
    let path = fx.mount().register("lazy", root).unwrap();
    assert_eq!(fx.remote_reads(), 0, "registering fetches nothing");
    let meta = std::fs::metadata(path.join("src/nested/deeper/data.bin")).unwrap();
    assert_eq!(meta.len(), 3 * MIB as u64);
    assert_eq!(fx.remote_reads(), 4, "a stat fetches the Directory protos on the way, not the file");
    assert_eq!(std::fs::read(path.join("src/nested/deeper/data.bin")).unwrap(), bytes(5, 3 * MIB));
    assert_eq!(fx.remote_reads(), 5, "opening fetches the blob once");
    std::fs::read(path.join("src/nested/deeper/data.bin")).unwrap();
    assert_eq!(fx.remote_reads(), 5, "a second open is served from the local cache");
    let stats = fx.mount().stats();
    if stats.passthrough {
        assert!(stats.passthrough_opens >= 2, "cached files are read through FUSE passthrough");
    }
    assert_eq!(std::fs::read(path.join("empty")).unwrap(), b"", "the empty blob needs no fetch");
    assert_eq!(fx.remote_reads(), 5);
    // A tree looked up by digest: its root Directory is fetched once, for the
    // lookup, and the listing that follows uses it.
    let by_digest = fx.path(&format!("trees/blake3/{}-{}", root.hash_hex(), root.size_bytes));
    assert_eq!(std::fs::read_dir(&by_digest).unwrap().count(), 5, "src, empty-dir, empty, run.sh, link");
    assert_eq!(fx.remote_reads(), 6);
}

#[test]
fn concurrent_readers_of_one_blob_cause_one_remote_read() {
    let Some(fx) = Fixture::start("concurrent_readers_of_one_blob_cause_one_remote_read", 1 << 30) else { return };
    // A large blob (streamed into the disk cache) and a small one (kept in memory).
    let (big, small) = (bytes(9, 16 * MIB), bytes(10, 10_000));
    let root = fx.upload_tree("shared", |dir| {
        std::fs::write(dir.join("big.bin"), &big).unwrap();
        std::fs::write(dir.join("small.bin"), &small).unwrap();
    });
    let dir = fx.mount().register("shared", root).unwrap();
    for (name, data) in [("big.bin", big), ("small.bin", small)] {
        let path = dir.join(name);
        std::fs::metadata(&path).unwrap();
        let before = fx.remote_reads();
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    std::fs::read(path).unwrap()
                })
            })
            .collect();
        for reader in readers {
            assert!(reader.join().unwrap() == data, "{name}");
        }
        assert_eq!(fx.remote_reads() - before, 1, "16 concurrent opens of {name} share one fetch");
    }
}

#[test]
fn the_access_log_records_lookups_misses_opens_and_listings() {
    let Some(fx) = Fixture::start("the_access_log_records_lookups_misses_opens_and_listings", 1 << 30) else {
        return;
    };
    let root = fx.upload_tree("logged", sample_tree);
    let path = fx.mount().register("logged", root).unwrap();
    std::fs::read(path.join("src/main.c")).unwrap();
    assert_eq!(std::fs::metadata(path.join("src/config.h")).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::metadata(path.join("include/x.h")).unwrap_err().kind(), ErrorKind::NotFound);
    std::fs::read_dir(path.join("src/nested")).unwrap().for_each(drop);

    let report = fx.mount().access_report("logged").unwrap();
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(report.not_found, set(&["include", "src/config.h"]));
    assert_eq!(report.opened, set(&["src/main.c"]));
    assert!(report.found.contains("src/main.c") && report.found.contains("src/nested"));
    assert_eq!(report.listed, set(&["src/nested"]));
    assert!(!report.touched().contains("run.sh"), "untouched inputs stay out of the log");
    if !fx.mount().stats().passthrough {
        assert_eq!(report.read, set(&["src/main.c"]));
    }

    fx.mount().clear_access_log("logged").unwrap();
    assert!(fx.mount().access_report("logged").unwrap().touched().is_empty());
    // Misses are never cached by the kernel, so each one is logged again.
    assert!(std::fs::metadata(path.join("src/config.h")).is_err());
    assert_eq!(fx.mount().access_report("logged").unwrap().not_found, set(&["src/config.h"]));
    // Trees browsed by digest have no log; other roots' logs are separate.
    let other = fx.mount().register("other", root).unwrap();
    std::fs::read(other.join("run.sh")).unwrap();
    assert!(!fx.mount().access_report("logged").unwrap().opened.contains("run.sh"));
    assert!(fx.mount().access_report("missing").is_err());
}

#[test]
fn a_512_mib_file_reads_back_with_its_hash() {
    let Some(fx) = Fixture::start("a_512_mib_file_reads_back_with_its_hash", 1 << 30) else { return };
    let data = bytes(11, 512 * MIB);
    let want = DigestFunction::Blake3.digest_of(&data);
    let root = fx.upload_tree("huge", |dir| std::fs::write(dir.join("huge.bin"), &data).unwrap());
    drop(data);
    let path = fx.mount().register("huge", root).unwrap().join("huge.bin");
    let mut hasher = DigestFunction::Blake3.hasher();
    let mut file = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0; MIB];
    loop {
        match file.read(&mut buf).unwrap() {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    assert_eq!(hasher.finish(), want);
}

#[test]
fn a_server_killed_mid_fetch_gives_eio_within_the_bound() {
    let Some(mut fx) = Fixture::start("a_server_killed_mid_fetch_gives_eio_within_the_bound", 1 << 30) else {
        return;
    };
    let root = fx.upload_tree("doomed", |dir| {
        std::fs::write(dir.join("big.bin"), bytes(12, 512 * MIB)).unwrap();
        std::fs::write(dir.join("small.txt"), "later").unwrap();
    });
    let path = fx.mount().register("doomed", root).unwrap();
    std::fs::metadata(path.join("small.txt")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let big = path.join("big.bin");
    std::thread::spawn(move || tx.send(std::fs::read(big).map(|d| d.len())));
    // Kill the server once the blob has started to arrive in the cache.
    let tmp = fx.dir.path().join("cache/tmp");
    let started = Instant::now();
    while !std::fs::read_dir(&tmp).unwrap().any(|e| e.unwrap().metadata().unwrap().len() > 0) {
        assert!(started.elapsed() < Duration::from_secs(30), "the fetch never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    fx.server.take().unwrap().kill();
    let result = rx.recv_timeout(FETCH_TIMEOUT * 4).expect("the read must not hang");
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    // Later opens of blobs that are not cached fail the same way, promptly.
    let (tx, rx) = std::sync::mpsc::channel();
    let small = path.join("small.txt");
    std::thread::spawn(move || tx.send(std::fs::read(small)));
    let result = rx.recv_timeout(FETCH_TIMEOUT * 4).expect("the open must not hang");
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the partial download was discarded");
}

#[test]
fn a_small_cache_evicts_but_never_an_open_file() {
    let Some(fx) = Fixture::start("a_small_cache_evicts_but_never_an_open_file", 8 * MIB as u64) else { return };
    let root = fx.upload_tree("many", |dir| {
        for i in 0..6 {
            std::fs::write(dir.join(format!("f{i}")), bytes(20 + i, 3 * MIB)).unwrap();
        }
    });
    let path = fx.mount().register("many", root).unwrap();
    let mut held = std::fs::File::open(path.join("f0")).unwrap();
    for round in 0..2 {
        for i in 1..6 {
            let got = std::fs::read(path.join(format!("f{i}"))).unwrap();
            assert!(got == bytes(20 + i, 3 * MIB), "f{i} in round {round}");
        }
    }
    let cache = fx.mount().cache().local();
    assert!(cache.bytes_used() <= 8 * MIB as u64 + 3 * MIB as u64, "over budget only by the pinned file");
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == bytes(20, 3 * MIB), "the open file stayed readable");
    // The root Directory, f0 once, and f1..f5 in both rounds: each evicted the one before.
    assert_eq!(fx.remote_reads(), 1 + 1 + 2 * 5, "files evicted in round one were fetched again");
    drop(held);
    // Once closed, it may go; reading it again fetches it again.
    for i in 1..6 {
        std::fs::read(path.join(format!("f{i}"))).unwrap();
    }
    assert!(cache.bytes_used() <= 8 * MIB as u64);
    assert!(std::fs::read(path.join("f0")).unwrap() == bytes(20, 3 * MIB));
}

/// A `casbuild mount` process, killed (by PID) if a test fails while it runs.
struct MountProcess(Child);

impl Drop for MountProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `casbuild mount` and waits for the line it prints when ready.
fn spawn_mount_cli(server: &Coordinator, mountpoint: &Path, cache: &Path) -> MountProcess {
    let mut child = casbuild()
        .args(["mount", "--remote", &server.url(), "--cache-dir"])
        .arg(cache)
        .arg(mountpoint)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let child = MountProcess(child);
    assert!(line.starts_with("casbuild mount ready at "), "unexpected output: {line:?}");
    child
}

/// Detaches whatever a failed test left mounted at the path.
struct DetachOnDrop(PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "casbuild mount did not exit within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_cli_mounts_unmounts_on_sigterm_and_replaces_a_stale_mount() {
    let dir = tempfile::tempdir().unwrap();
    if !needs_root("the_cli_mounts_unmounts_on_sigterm_and_replaces_a_stale_mount", true) {
        return;
    }
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "hello\n").unwrap();
    let out = casbuild().args(["cas", "upload", "--remote", &server.url()]).arg(&src).output().unwrap();
    let root = Digest::parse(DigestFunction::Blake3, String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let mountpoint = dir.path().join("cas");
    let _cleanup = DetachOnDrop(mountpoint.clone());
    let tree = mountpoint.join(format!("trees/blake3/{}-{}", root.hash_hex(), root.size_bytes));

    // A mount whose process is SIGKILLed stays behind, dead.
    let crashed = spawn_mount_cli(&server, &mountpoint, &dir.path().join("cache"));
    assert_eq!(std::fs::read_to_string(tree.join("hello.txt")).unwrap(), "hello\n");
    drop(crashed); // SIGKILL
    assert!(is_mounted(&mountpoint));
    // (What the kernel cached still stats; anything new must ask the dead process.)
    let err = std::fs::metadata(tree.join("not-looked-up-before")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));

    // The next start detaches it and serves again; SIGTERM unmounts cleanly.
    let mut child = spawn_mount_cli(&server, &mountpoint, &dir.path().join("cache"));
    assert_eq!(std::fs::read_to_string(tree.join("hello.txt")).unwrap(), "hello\n");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child.0).success());
    assert!(!is_mounted(&mountpoint), "unmounted on SIGTERM");
}

#[test]
fn a_sandboxed_command_works_on_an_input_root_and_its_misses_are_logged() {
    let Some(fx) = Fixture::start("a_sandboxed_command_works_on_an_input_root", 1 << 30) else { return };
    let root = fx.upload_tree("action", |dir| {
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/main.c"), "#include \"config.h\"\nint main(void) { return 0; }\n").unwrap();
        std::fs::write(dir.join("src/unused.c"), "int unused;\n").unwrap();
    });
    let input = fx.mount().register("lease-1", root).unwrap();
    let scratch = fx.dir.path().join("scratch");
    let mut spec = casbuild_exec::sandbox::SandboxSpec::new(
        input,
        scratch,
        ["cc", "-c", "src/main.c", "-o", "out/main.o"].map(String::from).to_vec(),
    );
    spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    spec.writable_dirs = vec!["out".into()];
    spec.timeout_ms = Some(60_000);
    let sandbox = casbuild_exec::sandbox::Sandbox::new(env!("CARGO_BIN_EXE_casbuild"));
    let report = fx.runtime.block_on(sandbox.run(&spec)).unwrap();
    let stderr = std::fs::read_to_string(casbuild_exec::sandbox::Sandbox::stderr_path(&spec)).unwrap();
    assert_eq!(report.exit_code, Some(1), "config.h is not a declared input: {report:?} {stderr}");
    assert!(stderr.contains("config.h"), "{stderr}");

    let log = fx.mount().access_report("lease-1").unwrap();
    assert!(log.opened.contains("src/main.c"), "{log:?}");
    assert!(log.not_found.contains("src/config.h"), "the compiler's miss is logged: {log:?}");
    assert!(!log.touched().contains("src/unused.c"), "declared but unread: {log:?}");
}

#[test]
fn a_directory_larger_than_a_batch_lists_through_the_mount() {
    let Some(fx) = Fixture::start("a_directory_larger_than_a_batch_lists_through_the_mount", 1 << 30) else { return };
    // 70,000 entries: a Directory proto of ~6 MB, over the 4 MiB batch limit.
    let root = fx.upload_tree("wide", |dir| {
        let many = dir.join("many");
        std::fs::create_dir_all(&many).unwrap();
        for i in 0..70_000 {
            std::fs::write(many.join(format!("file-{i:05}")), b"").unwrap();
        }
    });
    let path = fx.mount().register("wide", root).unwrap();
    let names = std::fs::read_dir(path.join("many")).unwrap().count();
    assert_eq!(names, 70_000);
    assert_eq!(std::fs::read(path.join("many/file-69999")).unwrap(), b"");
    fx.mount().unregister("wide").unwrap();
}
