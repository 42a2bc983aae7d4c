//! A private PostgreSQL cluster on loopback for the shared-state tests:
//! Debian's `postgresql` (installed by `scripts/setup-debian.sh`), its data
//! in the test's directory, run as the `postgres` user when the test runs as
//! root (PostgreSQL refuses to run as root).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster, stopped when dropped.
pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    /// The port it listens on (127.0.0.1 only).
    pub port: u16,
    /// `postgresql://casbuild@127.0.0.1:PORT/casbuild`.
    pub url: String,
}

/// The newest installed server's binaries (`CASBUILD_PG_BIN` overrides).
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CASBUILD_PG_BIN") {
        return Some(dir.into());
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// `program` with `args`, as the `postgres` user when we are root.
fn as_server_user(program: &Path) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// Creates and starts a cluster under `dir` with a `casbuild` database;
    /// `None` (the test skips, saying so) when PostgreSQL is not installed
    /// outside CI. In CI (`CASBUILD_REQUIRE_PRIVILEGED=1`) that fails.
    pub fn start(test: &str, dir: &Path) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            let why = "PostgreSQL is not installed (scripts/setup-debian.sh installs it)";
            assert!(std::env::var("CASBUILD_REQUIRE_PRIVILEGED").as_deref() != Ok("1"), "{test}: {why}");
            eprintln!("SKIPPED {test}: {why}");
            return None;
        };
        // The server user must reach its directory through the test's.
        std::fs::create_dir_all(dir).unwrap();
        let mut walk = Some(dir);
        while let Some(d) = walk.filter(|d| d.starts_with(std::env::temp_dir()) && *d != std::env::temp_dir()) {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            walk = d.parent();
        }
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).unwrap();
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres").unwrap().expect("the postgres user");
            nix::unistd::chown(&data, Some(user.uid), Some(user.gid)).unwrap();
        }
        let init = as_server_user(&bin.join("initdb"))
            .args(["--auth=trust", "--username=casbuild", "--no-sync", "--encoding=UTF8", "-D"])
            .arg(&data)
            .output()
            .expect("running initdb");
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let port = free_port();
        let mut postgres =
            Postgres { child: None, bin, data, port, url: format!("postgresql://casbuild@127.0.0.1:{port}/casbuild") };
        postgres.run();
        let created = Command::new(postgres.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "casbuild", "casbuild"])
            .output()
            .expect("running createdb");
        assert!(created.status.success(), "createdb: {}", String::from_utf8_lossy(&created.stderr));
        Some(postgres)
    }

    /// Starts the server and waits (at most 30 s) until it accepts connections.
    fn run(&mut self) {
        let child = as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres on port {} did not start within 30 s", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The answer of one SQL query in the `casbuild` database, rows on lines,
    /// columns separated by `|`.
    pub fn query(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "casbuild", "-d", "casbuild", "-At", "-c", sql])
            .output()
            .expect("running psql");
        assert!(output.status.success(), "{sql}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`: no
    /// checkpoint, recovery from the WAL at the next start).
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let stopped = as_server_user(&self.bin.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&self.data)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !stopped {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Starts it again after [`Postgres::crash`], on the same port.
    pub fn restart(&mut self) {
        self.crash();
        self.run();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ =
                as_server_user(&self.bin.join("pg_ctl")).args(["stop", "-m", "fast", "-D"]).arg(&self.data).output();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
