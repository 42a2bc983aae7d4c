//! `casbuild bench`: throughput and latency measured against baselines taken
//! in the same run on the same machine, reported as medians and ratios.

mod bazel;
mod bazel_workspace;
mod cas;
mod cc;
mod cluster;
mod demo;
mod exec;
mod graph;
mod mount;
mod objects;
mod pki;
mod sandbox;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::storage::{Storage, StorageConfig};
use casbuild_cas::store::{RemoteStore, RemoteStoreOptions};

#[derive(clap::Subcommand)]
pub enum Command {
    /// The storage API over loopback: ByteStream upload/download of one large
    /// blob, FindMissingBlobs of many digests, BatchUpdateBlobs of many small blobs.
    Cas(cas::CasArgs),
    /// The /cas FUSE mount: registration, metadata walks, lazy and sequential
    /// reads, against local disk and eager staging.
    Mount(mount::MountArgs),
    /// The sandbox around `true`: set-up to tear-down, against fork/exec and bwrap.
    Sandbox(sandbox::SandboxArgs),
    /// A generated C build graph on `casbuild up`, cold and warm, against the
    /// same commands run serially on the host.
    Graph(graph::GraphArgs),
    /// The zstd and Lua builds through `casbuild cc` (cold, warm) against
    /// local make, and one cache hit against a plain `gcc -c`.
    Cc(cc::CcArgs),
    /// No-op actions from an independent REAPI client through `casbuild up`
    /// (run, and as cache hits) against fork/exec, and where one action's
    /// time goes.
    Exec(exec::ExecArgs),
    /// A generated workspace built cold by Bazel 4.2.3 through `casbuild up`,
    /// against the same build run locally by Bazel (standalone).
    Bazel(bazel::BazelArgs),
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Cas(args) => cas::bench_cas(args).await,
        Command::Mount(args) => mount::bench_mount(args).await,
        Command::Sandbox(args) => sandbox::bench_sandbox(args).await,
        Command::Graph(args) => graph::bench_graph(args).await,
        Command::Cc(args) => cc::bench_cc(args).await,
        Command::Exec(args) => exec::bench_exec(args).await,
        Command::Bazel(args) => bazel::bench_bazel(args).await,
    }
}

/// What every bench through `casbuild up` takes.
#[derive(clap::Args)]
pub struct Runs {
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Actions `casbuild up` runs at once [default: its own, one per core].
    #[arg(long)]
    slots: Option<usize>,
    /// Scratch directory [default: a temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A scratch directory for a bench, inside `dir` if given, removed when dropped.
fn scratch_dir(dir: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    Ok(match dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    })
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn gb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// Fills `len` bytes that do not compress and differ per `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
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

/// `count` distinct incompressible blobs of `size` bytes with their digests,
/// different for every `seed`.
fn small_blobs_of(function: DigestFunction, count: usize, size: u64, seed: u64) -> Vec<(Digest, Bytes)> {
    (0..count)
        .map(|i| {
            let data = Bytes::from(noise(seed + i as u64, size as usize));
            (function.digest_of(&data), data)
        })
        .collect()
}

/// Writes back dirty pages before a timed section, so no measurement pays
/// for the writeback of the one before it.
async fn settle_disk() -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sync").status().await.context("running sync")?;
    anyhow::ensure!(status.success(), "sync failed");
    Ok(())
}

/// One row of the report.
struct Row {
    name: String,
    casbuild: String,
    baseline_name: &'static str,
    baseline: String,
    ratio: f64,
}

/// Prints the rows as a Markdown table.
fn print_table(rows: &[Row]) {
    println!("| workload | casbuild (median) | baseline | baseline (median) | speed vs baseline |");
    println!("| --- | --- | --- | --- | --- |");
    for row in rows {
        println!("| {} | {} | {} | {} | {:.2}× |", row.name, row.casbuild, row.baseline_name, row.baseline, row.ratio);
    }
}

/// A coordinator serving an unbounded store in `dir`, in this process.
struct LocalServer {
    remote: RemoteStore,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LocalServer {
    async fn start(dir: &Path) -> anyhow::Result<LocalServer> {
        LocalServer::start_with(dir, Default::default(), Default::default()).await
    }

    /// A server with `config` (auth, TLS), and a client connected with `connect`.
    async fn start_with(
        dir: &Path,
        config: casbuild_coordinator::ServerConfig,
        connect: casbuild_cas::store::ConnectOptions,
    ) -> anyhow::Result<LocalServer> {
        let mut storage_config = StorageConfig::new(dir.to_path_buf());
        storage_config.max_disk = u64::MAX;
        LocalServer::start_on(storage_config, config, connect).await
    }

    /// A server on `storage_config`, with `config` (auth, TLS), and a client
    /// connected with `connect`.
    async fn start_on(
        storage_config: StorageConfig,
        config: casbuild_coordinator::ServerConfig,
        connect: casbuild_cas::store::ConnectOptions,
    ) -> anyhow::Result<LocalServer> {
        let storage = tokio::task::spawn_blocking(move || Storage::open(&storage_config)).await??;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if config.tls.is_some() { "grpcs" } else { "grpc" };
        let url = format!("{scheme}://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(casbuild_coordinator::serve(listener, Arc::new(storage), config, async {
            let _ = stopped.await;
        }));
        let options = RemoteStoreOptions { connect, ..Default::default() };
        let remote = RemoteStore::connect(&url, options).await.context("connecting")?;
        Ok(LocalServer { remote, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Starts `command` and waits for its stdout line starting with `ready`;
/// the process and the rest of that line.
fn spawn_until(command: &mut Process, ready: &str) -> anyhow::Result<(Child, String)> {
    let what = format!("casbuild {}", command.get_args().next().map(|a| a.to_string_lossy()).unwrap_or_default());
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().with_context(|| what.clone())?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let rest = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix(ready) {
                    break rest.to_owned();
                }
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} exited before printing {ready:?}")
            }
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, rest))
}

/// `casbuild up` as a child process, stopped with SIGTERM when dropped.
pub struct Up {
    child: Child,
    pub url: String,
}

impl Up {
    pub fn start(dir: &Path, slots: Option<usize>) -> anyhow::Result<Up> {
        Up::start_with(dir, slots, &[])
    }

    /// [`Up::start`] with extra flags.
    pub fn start_with(dir: &Path, slots: Option<usize>, extra: &[&str]) -> anyhow::Result<Up> {
        let exe = std::env::current_exe().context("finding casbuild itself")?;
        let mut command = Process::new(exe);
        command.args(["up", "--listen", "127.0.0.1:0", "--dir"]).arg(dir).args(extra);
        if let Some(slots) = slots {
            command.arg("--slots").arg(slots.to_string());
        }
        let (child, url) = spawn_until(&mut command, "casbuild up listening on ")?;
        Ok(Up { child, url })
    }

    /// The process id of `casbuild up`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
