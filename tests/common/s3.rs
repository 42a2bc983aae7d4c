//! A real S3-compatible server on loopback for the object-storage tests:
//! `s3s-fs` (crates.io), installed by `scripts/setup-debian.sh`, keeping each
//! bucket as a directory and each object as a file under it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The access key the tests' server accepts.
pub const ACCESS_KEY: &str = "casbuild-test";
/// Its secret key.
pub const SECRET_KEY: &str = "casbuild-test-secret";

/// A running `s3s-fs`, killed (by its PID) when dropped.
pub struct S3Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The directory holding the buckets.
    pub root: PathBuf,
}

/// Where the server binary is: `CASBUILD_S3_SERVER`, else where the set-up
/// script installs it.
fn binary() -> PathBuf {
    std::env::var_os("CASBUILD_S3_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/casbuild/s3s-fs/bin/s3s-fs".into())
}

impl S3Server {
    /// Starts a server over `root` with `buckets` made; `None` (the test
    /// skips, saying so) when the binary is missing outside CI. In CI
    /// (`CASBUILD_REQUIRE_PRIVILEGED=1`) a missing binary fails the test.
    pub fn start(test: &str, root: &Path, buckets: &[&str]) -> Option<S3Server> {
        if !binary().exists() {
            let why = format!("{} is missing (scripts/setup-debian.sh installs it)", binary().display());
            assert!(std::env::var("CASBUILD_REQUIRE_PRIVILEGED").as_deref() != Ok("1"), "{test}: {why}");
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        for bucket in buckets {
            std::fs::create_dir_all(root.join(bucket)).unwrap();
        }
        let (child, endpoint) = spawn(root, "127.0.0.1:0");
        Some(S3Server { child: Some(child), endpoint, root: root.to_path_buf() })
    }

    /// Kills the server (its port stays the endpoint's for [`S3Server::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        let (child, endpoint) = spawn(&self.root, &addr);
        assert_eq!(endpoint, self.endpoint);
        self.child = Some(child);
    }

    /// The file holding object `key` of `bucket`.
    pub fn object_file(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }

    /// Every object file of `bucket`, as keys.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let base = self.root.join(bucket);
        let mut keys = Vec::new();
        let mut dirs = vec![base.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if !entry.file_name().to_string_lossy().starts_with('.') {
                    keys.push(path.strip_prefix(&base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        keys.sort();
        keys
    }

    /// The `[object_store]` table of a coordinator's config for `bucket` on
    /// this server (credentials in a file under `dir`), ending with `extra` lines.
    pub fn config_table(&self, dir: &Path, bucket: &str, extra: &str) -> String {
        format!(
            "[object_store]\nendpoint = \"{}\"\nbucket = \"{bucket}\"\ncredentials_file = \"{}\"\n{extra}",
            self.endpoint,
            self.credentials_file(dir).display()
        )
    }

    /// A credentials file for casbuild's `[object_store] credentials_file`.
    pub fn credentials_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("s3-credentials.toml");
        std::fs::write(&path, format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"))
            .unwrap();
        path
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `s3s-fs` on `addr` and waits (at most 30 s) for its address.
fn spawn(root: &Path, addr: &str) -> (Child, String) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut child = Command::new(binary())
        .args(["--host", host, "--port", port, "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting s3s-fs");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find("server is running at ") {
                let url: String = line[at + "server is running at ".len()..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
                    .collect();
                let _ = tx.send(url);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(endpoint) => (child, endpoint),
        Err(_) => {
            let _ = child.kill();
            panic!("s3s-fs on {addr} did not report its address within 30 s");
        }
    }
}
