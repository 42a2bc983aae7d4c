//! Config files: each serving role starts from its example in docs/config/
//! (moved under a temporary directory), the file's settings take effect,
//! flags and the environment win over it, and a role finds its file under
//! $XDG_CONFIG_HOME without --config. Workers and `up` need root and FUSE.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{get, sample};
use common::{casbuild, needs_root, Coordinator, Detach};

/// docs/config/ROLE.toml with its absolute paths (/etc/casbuild, /var/...,
/// /cas) moved under `root`, written to `root/etc/ROLE.toml`.
fn example(role: &str, root: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config").join(format!("{role}.toml"));
    let text = std::fs::read_to_string(source).unwrap();
    let root = root.to_str().unwrap();
    let text = text
        .replace("\"/etc/casbuild", &format!("\"{root}/etc"))
        .replace("\"/var/", &format!("\"{root}/var/"))
        .replace("\"/cas\"", &format!("\"{root}/cas\""));
    let path = Path::new(root).join("etc").join(format!("{role}.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn coordinator_and_worker_start_from_their_example_files() {
    if !needs_root("coordinator_and_worker_start_from_their_example_files", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let coordinator_toml = example("coordinator", root);
    let worker_toml = example("worker", root);
    std::fs::write(root.join("etc/worker-token"), "a-token-from-a-file\n").unwrap();

    // Flags win over the file's listen addresses (fixed ports there).
    let config = coordinator_toml.to_str().unwrap();
    let args = ["coordinator", "--config", config, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let storage = root.join("var/lib/casbuild");
    let server = Coordinator::spawn(&args, "casbuild coordinator listening on grpc://", &storage, false);
    assert_eq!(server.printed("settings from "), config);
    assert!(server.printed("storage: ").starts_with(storage.to_str().unwrap()), "the file's storage directory");
    // The file's [auth] table holds: anonymous callers may read, not write.
    let blob = root.join("blob");
    std::fs::write(&blob, "anonymous bytes").unwrap();
    let upload =
        casbuild().args(["cas", "upload", "--remote", &server.url(), blob.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&upload.stderr);
    assert!(!upload.status.success() && err.contains("without credentials may not upload"), "{err}");

    // The worker's coordinator comes from the environment, over the file.
    let _mount = Detach(root.join("cas"));
    let worker_config = worker_toml.to_str().unwrap();
    let worker = Coordinator::spawn_with(
        casbuild()
            .args(["worker", "--config", worker_config, "--metrics-listen", "127.0.0.1:0", "--slots", "2"])
            .env("CASBUILD_REMOTE", server.url()),
        "casbuild worker ",
        &root.join("var/cache/casbuild/worker"),
        true,
    );
    assert_eq!(worker.printed("settings from "), worker_config);
    // It registered with the token from the file's worker_token_file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&get(&server.metrics_addr(), "/metrics").1, "casbuild_workers_connected", &[]) != 1.0 {
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(root.join("var/cache/casbuild/worker/cas").is_dir(), "the file's cache_dir");
    // log_format = "json" from the file: every log line is a JSON object.
    let logs = worker.stderr_lines();
    assert!(!logs.is_empty() && logs.iter().all(|l| l.starts_with('{')), "{logs:?}");
    drop(worker);
}

#[test]
fn up_starts_from_its_example_file() {
    if !needs_root("up_starts_from_its_example_file", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = example("up", dir.path());
    let config = config.to_str().unwrap();
    let _mount = Detach(dir.path().join("up/cas"));
    let up =
        Coordinator::start_up_with(&dir.path().join("up"), &["--config", config, "--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(up.printed("settings from "), config);
    assert_eq!(get(&up.metrics_addr(), "/readyz").0, 200);
}

#[test]
fn the_daemon_starts_from_its_example_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = example("daemon", dir.path());
    let socket = dir.path().join("daemon.sock");
    let mut daemon = casbuild()
        .args(["daemon", "--config", config.to_str().unwrap(), "--socket", socket.to_str().unwrap()])
        .env("CASBUILD_REMOTE", "grpc://127.0.0.1:1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(daemon.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    // local_jobs from the file, the remote from the environment.
    assert!(line.contains("grpc://127.0.0.1:1") && line.contains("(4 local jobs)"), "{line}");
}

#[test]
fn a_role_finds_its_file_under_xdg_config_home() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let home = dir.path().join("xdg");
    std::fs::create_dir_all(home.join("casbuild")).unwrap();
    let file = home.join("casbuild/coordinator.toml");
    std::fs::write(&file, format!("listen = \"127.0.0.1:0\"\nstorage = {:?}\n", storage.to_str().unwrap())).unwrap();
    let server = Coordinator::spawn_with(
        casbuild().arg("coordinator").env("XDG_CONFIG_HOME", &home),
        "casbuild coordinator listening on grpc://",
        &storage,
        false,
    );
    assert_eq!(server.printed("settings from "), file.to_str().unwrap());
    assert!(server.printed("storage: ").starts_with(storage.to_str().unwrap()));

    // A mistake in it stops the role, naming the file and the setting.
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nheartbeat = \"soon\"\n").unwrap();
    let out = casbuild().arg("coordinator").env("XDG_CONFIG_HOME", &home).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(file.to_str().unwrap()) && err.contains("soon") && err.contains("--heartbeat"), "{err}");
}
