//! `casbuild bench bazel`: a generated workspace (genrule chains and C
//! libraries linked into one binary) built cold by Debian's Bazel 4.2.3
//! through `casbuild up` (a new, empty store every round), against the same
//! build run locally by Bazel (`--spawn_strategy=standalone`) on the same
//! host, each after `bazel clean`, in batch mode (no Bazel server kept
//! between builds, the same for both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use super::bazel_workspace::{offline_repositories, write_build};
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
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Slots of `casbuild up`'s worker [default: its own, one per core].
    #[arg(long)]
    slots: Option<usize>,
    /// Scratch directory [default: a temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One Bazel build of the workspace: its wall time and the summary line.
fn build(ws: &Path, output_root: &Path, flags: &[String]) -> anyhow::Result<(Duration, String)> {
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
    let start = Instant::now();
    let output = bazel(&args)?;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "bazel build {flags:?} failed:\n{text}");
    let summary = text.lines().find(|l| l.contains(" processes:")).unwrap_or("").trim().to_owned();
    Ok((took, summary))
}

pub async fn bench_bazel(args: BazelArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref())?;
    let root = scratch.path().to_path_buf();
    tokio::task::spawn_blocking(move || measure(&root, &args)).await?
}

fn measure(root: &Path, args: &BazelArgs) -> anyhow::Result<()> {
    let ws = root.join("ws");
    write_build(&ws, args.chains, args.length, args.libraries, args.files)?;
    let repos = offline_repositories(&root.join("repos"))?;
    let rounds = args.rounds.max(1);
    eprintln!("bench: Bazel builds of a generated workspace, cold, {rounds} rounds: local standalone, casbuild up");
    let (mut local, mut remote) = (vec![], vec![]);
    let mut summaries = (String::new(), String::new());
    // A first local build warms what both share (the host's page cache of
    // Bazel itself and the sources), untimed.
    let mut standalone = vec!["--spawn_strategy=standalone".to_owned()];
    standalone.extend(repos.iter().cloned());
    build(&ws, &root.join("bazel-local"), &standalone)?;
    for round in 0..rounds {
        let (took, summary) = build(&ws, &root.join("bazel-local"), &standalone)?;
        local.push(took);
        summaries.0 = summary;
        // A new `casbuild up` on an empty store: nothing cached, nothing on the worker.
        let up = Up::start(&root.join(format!("up-{round}")), args.slots)?;
        let mut flags = vec![format!("--remote_executor={}", up.url)];
        flags.extend(repos.iter().cloned());
        let (took, summary) = build(&ws, &root.join("bazel-remote"), &flags)?;
        drop(up);
        ensure!(!summary.contains("remote cache hit"), "a cold build had cache hits: {summary}");
        remote.push(took);
        summaries.1 = summary;
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
    Ok(())
}
