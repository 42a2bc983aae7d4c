//! Shared pieces of the end-to-end tests: the real `casbuild` binary started
//! as a server on a port the OS picks, gRPC clients onto it, and the rule for
//! tests that need root.
#![allow(dead_code)] // each test binary uses its own subset

pub mod bazel;
pub mod execute;
pub mod http;
pub mod liar;
pub mod postgres;
pub mod s3;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::bytestream::byte_stream_client::ByteStreamClient;
use casbuild_proto::reapi::action_cache_client::ActionCacheClient;
use casbuild_proto::reapi::capabilities_client::CapabilitiesClient;
use casbuild_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;

/// The `casbuild` binary under test.
pub fn casbuild() -> Command {
    Command::new(env!("CARGO_BIN_EXE_casbuild"))
}

/// Starts `casbuild worker` number `n` (named `wN`) for `server`, with its
/// own mount, cache and scratch under `dir/worker-N`, and extra flags.
pub fn start_worker(server: &Coordinator, dir: &Path, n: u32, extra: &[&str]) -> Coordinator {
    start_worker_at(&server.url(), dir, n, extra)
}

/// [`start_worker`] for the coordinator at `url`.
pub fn start_worker_at(url: &str, dir: &Path, n: u32, extra: &[&str]) -> Coordinator {
    let base = dir.join(format!("worker-{n}"));
    let path = |sub: &str| base.join(sub).to_str().unwrap().to_owned();
    let name = format!("w{n}");
    let (mount, cache, scratch) = (path("cas"), path("cache"), path("scratch"));
    let mut args =
        vec!["worker", "--coordinator", url, "--mount", &mount, "--cache-dir", &cache, "--scratch", &scratch];
    args.extend_from_slice(&["--name", &name]);
    args.extend_from_slice(extra);
    Coordinator::spawn(&args, "casbuild worker ", &base, true)
}

/// A `casbuild coordinator` process on 127.0.0.1 and a free port, killed
/// (by its PID) when dropped.
pub struct Coordinator {
    child: Child,
    pub addr: String,
    pub storage: PathBuf,
    /// Every line the process printed on stdout so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Every line it printed on stderr so far (also passed on to ours).
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Stop with SIGTERM when dropped (`casbuild up` must unmount its /cas).
    graceful: bool,
    /// Where the process mounts things (its /cas, its actions' scratch):
    /// whatever is still mounted there once it was killed is detached.
    mounts: PathBuf,
}

impl Coordinator {
    /// Starts a coordinator on `storage` with extra flags.
    pub fn start(storage: &Path, extra: &[&str]) -> Coordinator {
        let mut args = vec!["coordinator", "--listen", "127.0.0.1:0", "--storage", storage.to_str().unwrap()];
        args.extend_from_slice(extra);
        Coordinator::spawn(&args, "casbuild coordinator listening on grpc://", storage, false)
    }

    /// Starts a coordinator on `storage` whose `--config` file (`STORAGE.toml`,
    /// beside it) holds `config`, with extra flags.
    pub fn start_with_config(storage: &Path, config: &str, extra: &[&str]) -> Coordinator {
        let path = storage.with_extension("toml");
        std::fs::write(&path, config).unwrap();
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        Coordinator::start(storage, &args)
    }

    /// Starts `casbuild up` (coordinator and local worker) keeping everything in `dir`.
    pub fn start_up(dir: &Path) -> Coordinator {
        Coordinator::start_up_with(dir, &[])
    }

    /// [`Coordinator::start_up`] with extra flags.
    pub fn start_up_with(dir: &Path, extra: &[&str]) -> Coordinator {
        let mut args = vec!["up", "--listen", "127.0.0.1:0", "--dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut up = Coordinator::spawn(&args, "casbuild up listening on grpc://", &dir.join("store"), true);
        up.mounts = dir.to_path_buf();
        up
    }

    /// Starts `casbuild ARGS` and waits for the stdout line starting with
    /// `ready`; the rest of that line becomes `addr`.
    pub fn spawn(args: &[&str], ready: &'static str, storage: &Path, graceful: bool) -> Coordinator {
        Coordinator::spawn_with(casbuild().args(args), ready, storage, graceful)
    }

    /// [`Coordinator::spawn`] of a prepared command (environment, ...).
    pub fn spawn_with(command: &mut Command, ready: &'static str, storage: &Path, graceful: bool) -> Coordinator {
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting casbuild");
        let stderr = child.stderr.take().expect("piped stderr");
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept_errors = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                kept_errors.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix(ready) {
                    let _ = tx.send(addr.to_string());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("casbuild {args:?} did not report its address within 30 s");
            }
        };
        let mounts = storage.to_path_buf();
        Coordinator { child, addr, storage: storage.to_path_buf(), lines, errors, graceful, mounts }
    }

    /// The host:port of the `--metrics-listen` endpoint it printed.
    pub fn metrics_addr(&self) -> String {
        self.printed("metrics on http://").strip_suffix("/metrics").expect("the metrics URL").to_owned()
    }

    /// The stderr lines printed so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// The rest of the first stdout line starting with `prefix`, waiting up
    /// to 10 s for it.
    pub fn printed(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.lines.lock().unwrap().iter().find_map(|l| l.strip_prefix(prefix).map(str::to_owned));
            if let Some(rest) = found {
                return rest;
            }
            assert!(Instant::now() < deadline, "casbuild never printed a line starting with {prefix:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connecting")
    }

    pub async fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub async fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub async fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel().await)
    }

    pub async fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel().await)
    }

    /// Where the disk tier keeps `digest` of the default instance.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hash = digest.hash_hex();
        self.storage
            .join("cas/default")
            .join(digest.function.name())
            .join(&hash[..2])
            .join(format!("{hash}-{}", digest.size_bytes))
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill(mut self) {
        self.kill_now();
    }

    /// SIGKILL, then detach what the dead process left mounted.
    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.graceful {
            detach_below(&self.mounts);
        }
    }

    /// Stops the process with SIGTERM and waits (bounded) for it to exit.
    pub fn stop(mut self) {
        assert!(self.terminate(Duration::from_secs(20)), "casbuild did not stop within 20 s of SIGTERM");
    }

    /// Sends SIGTERM (unless the process was already reaped) and waits up
    /// to `timeout` for it to exit; returns whether it did.
    fn terminate(&mut self, timeout: Duration) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true; // already reaped: its PID may belong to someone else now
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Coordinator {
    /// A coordinator is killed (as a crash would); `casbuild up` gets SIGTERM
    /// first so that it unmounts its /cas even when a test fails, and SIGKILL
    /// if it has not exited after 10 s.
    fn drop(&mut self) {
        if !self.graceful || !self.terminate(Duration::from_secs(10)) {
            self.kill_now();
        }
    }
}

/// A small tree with every kind of entry: nested directories, an empty
/// directory and file, an executable, a symlink, duplicate contents and a
/// multi-MiB file.
pub fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("src/nested/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    std::fs::write(root.join("src/nested/deeper/data.bin"), bytes(5, 3 << 20)).unwrap();
    std::fs::write(root.join("src/nested/same.c"), "int main(void) { return 0; }\n").unwrap();
    std::fs::write(root.join("empty"), "").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/main.c", root.join("link")).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), so blobs differ by seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> Digest {
    DigestFunction::Sha256.digest_of(data)
}

pub fn blake3(data: &[u8]) -> Digest {
    DigestFunction::Blake3.digest_of(data)
}

/// Command lines of host processes containing `needle`.
pub fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

/// Whether a test that needs root (mounts, namespaces) may run. With
/// `CASBUILD_REQUIRE_PRIVILEGED=1` (CI) a missing privilege is a failure;
/// otherwise the test says it is skipping and returns.
pub fn privileged(test: &str, probe: impl FnOnce() -> Result<(), String>) -> bool {
    match probe() {
        Ok(()) => true,
        Err(why) if std::env::var("CASBUILD_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("{test} needs privileges (CASBUILD_REQUIRE_PRIVILEGED=1): {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: needs privileges: {why}");
            false
        }
    }
}

/// Whether a test that needs root (and, with `fuse`, /dev/fuse) may run; see [`privileged`].
pub fn needs_root(test: &str, fuse: bool) -> bool {
    privileged(test, || {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounts and namespaces need root".into());
        }
        if fuse && !Path::new("/dev/fuse").exists() {
            return Err("there is no /dev/fuse".into());
        }
        Ok(())
    })
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
/// Detaches whatever is mounted at the path when dropped, so a failing test
/// leaves no mount behind (a killed worker's /cas, a test's bind mount).
pub struct Detach(pub PathBuf);

/// Detaches every mount at or below `dir`, deepest first.
pub fn detach_below(dir: &Path) {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by(|a, b| b.cmp(a));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("running mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs on {} failed (not root?)", dir.display()));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
