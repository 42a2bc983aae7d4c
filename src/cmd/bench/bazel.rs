//! `casbuild bench bazel`: a generated workspace (genrule chains and C
//! libraries linked into one binary) built cold by Debian's Bazel 4.2.3
//! through `casbuild up` (a new, empty store every round), against the same
//! build run locally by Bazel (`--spawn_strategy=standalone`) on the same
//! host, each after `bazel clean`, in batch mode (no Bazel server kept
//! between builds, the same for both).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use super::bazel_workspace::{offline_repositories, write_build};
use super::exec::{rusage, Cpu};
use super::{median, print_table, Row, Up};

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
    #[command(flatten)]
    runs: super::Runs,
    /// An extra Bazel flag for the remote build (repeatable), e.g. `--remote-flag=--jobs=8`.
    #[arg(long = "remote-flag", allow_hyphen_values = true)]
    remote_flags: Vec<String>,
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
fn build(ws: &Path, output_root: &Path, flags: &[String]) -> anyhow::Result<Built> {
    let bazel = |args: &[String]| {
        Command::new("bazel")
            .args(["--batch", "--nohome_rc"])
            .arg(format!("--output_user_root={}", output_root.display()))
            .args(args)
            .current_dir(ws)
            .output()
            .context("running bazel (Debian's bazel-bootstrap)")
    };
    let cleaned = bazel(&["clean".to_owned()])?;
    ensure!(cleaned.status.success(), "bazel clean failed: {}", String::from_utf8_lossy(&cleaned.stderr));
    let mut args = vec!["build".to_owned()];
    args.extend(flags.iter().cloned());
    args.push("//...".to_owned());
    let children = || rusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN);
    let (start, cpu) = (Instant::now(), children());
    let output = bazel(&args)?;
    let (wall, bazel_cpu) = (start.elapsed(), children().saturating_sub(cpu));
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "bazel build {flags:?} failed:\n{text}");
    let summary = text.lines().find(|l| l.contains(" processes:")).unwrap_or("").trim().to_owned();
    Ok(Built { wall, bazel_cpu, summary })
}

pub async fn bench_bazel(args: BazelArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.runs.dir.as_deref())?;
    let root = scratch.path().to_path_buf();
    tokio::task::spawn_blocking(move || measure(&root, &args)).await?
}

fn measure(root: &Path, args: &BazelArgs) -> anyhow::Result<()> {
    let ws = root.join("ws");
    write_build(&ws, args.chains, args.length, args.libraries, args.files)?;
    let repos = offline_repositories(&root.join("repos"))?;
    let rounds = args.runs.rounds.max(1);
    eprintln!("bench: Bazel builds of a generated workspace, cold, {rounds} rounds: local standalone, casbuild up");
    let (mut local, mut remote) = (vec![], vec![]);
    let (mut local_cpu, mut remote_cpu, mut up_cpu) = (Duration::ZERO, Duration::ZERO, Cpu::default());
    let mut summaries = (String::new(), String::new());
    // A first local build warms what both share (the host's page cache of
    // Bazel itself and the sources), untimed.
    let mut standalone = vec!["--spawn_strategy=standalone".to_owned()];
    standalone.extend(repos.iter().cloned());
    build(&ws, &root.join("bazel-local"), &standalone)?;
    for round in 0..rounds {
        let built = build(&ws, &root.join("bazel-local"), &standalone)?;
        local.push(built.wall);
        local_cpu += built.bazel_cpu;
        summaries.0 = built.summary;
        // A new `casbuild up` on an empty store: nothing cached, nothing on the worker.
        let up = Up::start(&root.join(format!("up-{round}")), args.runs.slots)?;
        let mut flags = vec![format!("--remote_executor={}", up.url)];
        flags.extend(repos.iter().cloned());
        flags.extend(args.remote_flags.iter().cloned());
        let before = Cpu::now(up.pid());
        let built = build(&ws, &root.join("bazel-remote"), &flags)?;
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
