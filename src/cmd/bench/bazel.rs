//! `casbuild bench bazel`: a generated workspace (genrule chains and C
//! libraries linked into one binary) built cold by Debian's Bazel 4.2.3
//! through `casbuild up` (a new, empty store every round), against the same
//! build run locally by Bazel (`--spawn_strategy=standalone`) on the same
//! host, each after `bazel clean`: in batch mode (no Bazel server kept
//! between builds, the same for both), or with `--server` on a warm Bazel
//! server per mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use super::bazel_workspace::{offline_repositories, write_build, Shape};
use super::cluster::prefetch_round;
use super::exec::{rusage, Cpu};
use super::{median, print_table, Row, Up};

/// Common headers of the `--prefetch` workspace unless `--headers` says otherwise.
const PREFETCH_HEADERS: usize = 40;

#[derive(clap::Args)]
pub struct BazelArgs {
    /// Genrule chains.
    #[arg(long, default_value_t = 20)]
    chains: usize,
    /// Steps of each chain.
    #[arg(long, default_value_t = 6)]
    length: usize,
    /// C libraries.
    #[arg(long, default_value_t = 12)]
    libraries: usize,
    /// Sources of each library.
    #[arg(long, default_value_t = 6)]
    files: usize,
    /// Headers of a common library every source includes [default: 0, or 40 with --prefetch].
    #[arg(long)]
    headers: Option<usize>,
    /// Instead: what prefetching from access profiles does for a second cold build after an edit of the
    /// common headers (every compile's inputs new, its command the same), on a `casbuild worker` process
    /// that fetches from a `casbuild coordinator` process over loopback, against the same build with
    /// prefetching off.
    #[arg(long)]
    prefetch: bool,
    #[command(flatten)]
    runs: super::Runs,
    /// An extra Bazel flag for the remote build (repeatable), e.g. `--remote-flag=--jobs=8`.
    #[arg(long = "remote-flag", allow_hyphen_values = true)]
    remote_flags: Vec<String>,
    /// Keep a Bazel server for each mode across the rounds, warmed by one untimed build (how Bazel is
    /// used day to day), instead of `--batch` (a new JVM for every build).
    #[arg(long)]
    server: bool,
}

/// How Bazel is started for one mode (local or remote): in batch mode, or
/// as a server kept under its own output root.
struct Bazel<'a> {
    ws: &'a Path,
    output_root: PathBuf,
    batch: bool,
}

impl Bazel<'_> {
    fn run(&self, args: &[String]) -> anyhow::Result<std::process::Output> {
        let mut command = Command::new("bazel");
        if self.batch {
            command.arg("--batch");
        }
        command
            .arg("--nohome_rc")
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .args(args)
            .current_dir(self.ws)
            .output()
            .context("running bazel (Debian's bazel-bootstrap)")
    }

    /// The server's pid (none in batch mode).
    fn server_pid(&self) -> Option<String> {
        if self.batch {
            return None;
        }
        let out = self.run(&["info".to_owned(), "server_pid".to_owned()]).ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// CPU time of Bazel and whatever it ran itself (local actions): its
    /// server's, or the batch processes' this process waited for.
    fn cpu(&self, server: Option<&str>) -> Duration {
        match server {
            Some(pid) => super::exec::ticks(pid, true),
            None => rusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN),
        }
    }
}

impl Drop for Bazel<'_> {
    fn drop(&mut self) {
        if !self.batch {
            let _ = self.run(&["shutdown".to_owned()]);
        }
    }
}

/// One Bazel build of the workspace.
struct Built {
    wall: Duration,
    /// CPU time of Bazel and whatever it ran itself (local actions).
    bazel_cpu: Duration,
    /// Bazel's "N processes: ..." line.
    summary: String,
}

/// Builds `//...` after `bazel clean`.
fn build(bazel: &Bazel<'_>, flags: &[String]) -> anyhow::Result<Built> {
    let cleaned = bazel.run(&["clean".to_owned()])?;
    ensure!(cleaned.status.success(), "bazel clean failed: {}", String::from_utf8_lossy(&cleaned.stderr));
    let mut args = vec!["build".to_owned()];
    args.extend(flags.iter().cloned());
    args.push("//...".to_owned());
    let server = bazel.server_pid();
    let (start, cpu) = (Instant::now(), bazel.cpu(server.as_deref()));
    let output = bazel.run(&args)?;
    let (wall, bazel_cpu) = (start.elapsed(), bazel.cpu(server.as_deref()).saturating_sub(cpu));
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "bazel build {flags:?} failed:\n{text}");
    let summary = text.lines().find(|l| l.contains(" processes:")).unwrap_or("").trim().to_owned();
    Ok(Built { wall, bazel_cpu, summary })
}

pub async fn bench_bazel(args: BazelArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.runs.dir.as_deref())?;
    let root = scratch.path().to_path_buf();
    tokio::task::spawn_blocking(
        move || if args.prefetch { measure_prefetch(&root, &args) } else { measure(&root, &args) },
    )
    .await?
}

impl BazelArgs {
    fn shape(&self, default_headers: usize, revision: usize) -> Shape {
        let headers = self.headers.unwrap_or(default_headers);
        Shape {
            chains: self.chains,
            length: self.length,
            libraries: self.libraries,
            files: self.files,
            headers,
            revision,
        }
    }

    /// Bazel's flags for a remote build on `url`.
    fn remote_flags(&self, url: &str, repos: &[String]) -> Vec<String> {
        let mut flags = vec![format!("--remote_executor={url}")];
        flags.extend(repos.iter().cloned());
        flags.extend(self.remote_flags.iter().cloned());
        flags
    }
}

fn measure(root: &Path, args: &BazelArgs) -> anyhow::Result<()> {
    let ws = root.join("ws");
    write_build(&ws, &args.shape(0, 0))?;
    let repos = offline_repositories(&root.join("repos"))?;
    let rounds = args.runs.rounds.max(1);
    eprintln!("bench: Bazel builds of a generated workspace, cold, {rounds} rounds: local standalone, casbuild up");
    let (mut local, mut remote) = (vec![], vec![]);
    let (mut local_cpu, mut remote_cpu, mut up_cpu) = (Duration::ZERO, Duration::ZERO, Cpu::default());
    let mut summaries = (String::new(), String::new());
    let batch = !args.server;
    let local_bazel = Bazel { ws: &ws, output_root: root.join("bazel-local"), batch };
    let remote_bazel = Bazel { ws: &ws, output_root: root.join("bazel-remote"), batch };
    let mut standalone = vec!["--spawn_strategy=standalone".to_owned()];
    standalone.extend(repos.iter().cloned());
    // A first local build warms what both share (the host's page cache of
    // Bazel itself and the sources), untimed.
    build(&local_bazel, &standalone)?;
    let remote_flags = |url: &str| args.remote_flags(url, &repos);
    if args.server {
        // The remote mode's server gets its warm-up build too, on a store of its own.
        let up = Up::start(&root.join("up-warm-up"), args.runs.slots)?;
        build(&remote_bazel, &remote_flags(&up.url))?;
    }
    for round in 0..rounds {
        let built = build(&local_bazel, &standalone)?;
        local.push(built.wall);
        local_cpu += built.bazel_cpu;
        summaries.0 = built.summary;
        // A new `casbuild up` on an empty store: nothing cached, nothing on the worker.
        let up = Up::start(&root.join(format!("up-{round}")), args.runs.slots)?;
        let before = Cpu::now(up.pid());
        let built = build(&remote_bazel, &remote_flags(&up.url))?;
        up_cpu.add_since(&before, &Cpu::now(up.pid()));
        drop(up);
        ensure!(!built.summary.contains("remote cache hit"), "a cold build had cache hits: {}", built.summary);
        remote.push(built.wall);
        remote_cpu += built.bazel_cpu;
        summaries.1 = built.summary;
        eprintln!(
            "  round {}: local {:.2} s, casbuild up {:.2} s",
            round + 1,
            local[round].as_secs_f64(),
            remote[round].as_secs_f64()
        );
    }
    eprintln!("  local: {}\n  casbuild up: {}", summaries.0, summaries.1);
    let (local, remote) = (median(local), median(remote));
    print_table(&[Row {
        name: "Bazel 4.2.3 cold build, remote execution on `casbuild up`".to_owned(),
        casbuild: format!("{:.2} s", remote.as_secs_f64()),
        baseline_name: "the same build, Bazel local standalone",
        baseline: format!("{:.2} s", local.as_secs_f64()),
        ratio: local.as_secs_f64() / remote.as_secs_f64(),
    }]);
    let per_round = |d: Duration| d.as_secs_f64() / rounds as f64;
    println!(
        "\nCPU per build (mean of the rounds): local: Bazel and its actions {:.2} s; remote: Bazel {:.2} s, \
         `casbuild up` (coordinator, worker, mount) {:.2} s, sandboxes {:.2} s",
        per_round(local_cpu),
        per_round(remote_cpu),
        per_round(up_cpu.server),
        per_round(up_cpu.sandboxes)
    );
    Ok(())
}

/// `--prefetch`: every round builds the workspace once to record the access
/// profiles, edits the common headers, and builds it again cold twice, with
/// the first build's profiles and with prefetching off
/// ([`super::cluster::prefetch_round`]).
fn measure_prefetch(root: &Path, args: &BazelArgs) -> anyhow::Result<()> {
    let ws = root.join("ws");
    let repos = offline_repositories(&root.join("repos"))?;
    let rounds = args.runs.rounds.max(1);
    let bazel = Bazel { ws: &ws, output_root: root.join("bazel-remote"), batch: !args.server };
    let shape = |revision| args.shape(PREFETCH_HEADERS, revision);
    let headers = shape(0).headers;
    eprintln!(
        "bench: a second cold Bazel build after an edit of {headers} common headers, {rounds} rounds: \
         prefetched from access profiles, prefetch off"
    );
    let cold_build = |_: &Path, url: &str| -> anyhow::Result<Duration> {
        let built = build(&bazel, &args.remote_flags(url, &repos))?;
        ensure!(!built.summary.contains("remote cache hit"), "a cold build had cache hits: {}", built.summary);
        Ok(built.wall)
    };
    let (mut with, mut without) = (vec![], vec![]);
    for round in 0..rounds {
        write_build(&ws, &shape(2 * round))?;
        let edit = || Ok(write_build(&ws, &shape(2 * round + 1))?);
        let times = prefetch_round(&root.join(format!("round-{round}")), round, &[], cold_build, edit)?;
        eprintln!(
            "  round {}: first build {:.2} s ({} profiles); second build prefetched {:.2} s, prefetch off {:.2} s",
            round + 1,
            times.first.as_secs_f64(),
            times.profiles,
            times.prefetched.as_secs_f64(),
            times.off.as_secs_f64()
        );
        with.push(times.prefetched);
        without.push(times.off);
    }
    let (with, without) = (median(with), median(without));
    print_table(&[Row {
        name: format!(
            "Bazel second cold build after editing {headers} common headers, prefetched from access profiles"
        ),
        casbuild: format!("{:.2} s", with.as_secs_f64()),
        baseline_name: "the same build, prefetching off",
        baseline: format!("{:.2} s", without.as_secs_f64()),
        ratio: without.as_secs_f64() / with.as_secs_f64(),
    }]);
    Ok(())
}
