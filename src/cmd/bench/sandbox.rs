//! `casbuild bench sandbox`: the cost of a sandbox around a trivial command,
//! against plain fork/exec and against bubblewrap doing the same.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use casbuild_exec::sandbox::{Sandbox, SandboxSpec};

use super::{median, print_table, Row};

#[derive(clap::Args)]
pub struct SandboxArgs {
    /// Runs of each variant (median and p99 are reported).
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Scratch directory [default: a temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// bwrap with what casbuild sets up: new namespaces, read-only toolchain,
/// /proc, /dev, /tmp, the input tree (bound: this bwrap has no overlay).
fn bwrap(input: &Path) -> Command {
    let mut command = Command::new("bwrap");
    command.args(["--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]);
    for link in ["bin", "sbin", "lib", "lib64"] {
        let host = Path::new("/").join(link);
        if let Ok(target) = std::fs::read_link(&host) {
            command.arg("--symlink").arg(target).arg(&host);
        }
    }
    command.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind"]);
    command.arg(input).args(["/work", "--chdir", "/work", "--", "/bin/true"]);
    command
}

pub async fn bench_sandbox(args: SandboxArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref())?;
    let input = scratch.path().join("input");
    std::fs::create_dir_all(&input)?;
    let helper = std::env::current_exe()?;
    // As a worker runs actions: a cgroup each, a size-bounded scratch tmpfs,
    // and an empty tree of the /cas mount under the root that names lookups
    // of host paths; the variants beside it show what those layers cost.
    let server = super::LocalServer::start(&scratch.path().join("store")).await?;
    let local = crate::cmd::mount::open_cache(&scratch.path().join("cache"), 1 << 30).await?;
    let mount = crate::cmd::mount::mount_cas(
        &scratch.path().join("cas"),
        local,
        std::sync::Arc::new(server.remote.clone()),
        "",
        Duration::from_secs(10),
        casbuild_mount::MountOptions::default(),
    )
    .await?;
    let empty = casbuild_cas::digest::DigestFunction::Sha256.empty();
    let bare = Sandbox::new(&helper);
    let cgroups = casbuild_exec::cgroup::Cgroups::host().map_err(anyhow::Error::msg)?;
    let sandbox = Sandbox::new(&helper).with_cgroups(cgroups);
    let runs = args.runs.max(1);
    let have_bwrap = Command::new("bwrap").arg("--version").stdout(Stdio::null()).status().is_ok();
    let (mut plain, mut ours, mut theirs, mut ours_bare) = (vec![], vec![], vec![], vec![]);
    let mut ours_unobserved = vec![];
    // The full sandbox's time inside its init (set-up, command, reaping, report).
    let mut inside = vec![];
    eprintln!("bench: {runs} runs of `true`: fork/exec, casbuild sandbox, bwrap");
    for run in 0..runs {
        let input2 = input.clone();
        let (p, b) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Duration, Option<Duration>)> {
            let start = Instant::now();
            anyhow::ensure!(Command::new("/bin/true").status()?.success(), "true failed");
            let p = start.elapsed();
            let b = if have_bwrap {
                let start = Instant::now();
                let status = bwrap(&input2).status()?;
                anyhow::ensure!(status.success(), "bwrap failed: {status}");
                Some(start.elapsed())
            } else {
                None
            };
            Ok((p, b))
        })
        .await??;
        plain.push(p);
        theirs.extend(b);

        // Set-up, run and tear-down, scratch removal as the runner does it
        // (renamed away at once, deleted by a background thread).
        let variants = [
            (&sandbox, true, true, &mut ours),
            (&sandbox, true, false, &mut ours_unobserved),
            (&bare, false, false, &mut ours_bare),
        ];
        for (i, (sandbox, bounded, observed, samples)) in variants.into_iter().enumerate() {
            let name = format!("run-{run}-{i}");
            let mut spec = SandboxSpec::new(input.clone(), scratch.path().join(&name), vec!["/bin/true".into()]);
            spec.timeout_ms = Some(60_000);
            if bounded {
                spec.limits.max_memory_bytes = 8 << 30;
                spec.limits.max_scratch_bytes = 4 << 30;
            }
            // Registering and unregistering are part of what a worker does per action.
            let start = Instant::now();
            let observer = format!("{name}-root");
            if observed {
                spec.root_lower = Some(mount.register(&observer, empty)?);
            }
            let report = sandbox.run(&spec).await?;
            if observed {
                mount.unregister(&observer)?;
            }
            casbuild_exec::scratch::discard(&spec.scratch);
            samples.push(start.elapsed());
            if observed {
                inside.push(Duration::from_micros(report.wall_micros));
            }
            anyhow::ensure!(report.success(), "sandboxed true failed: {report:?}");
        }
    }
    let (plain_med, ours_med) = (median(plain.clone()), median(ours.clone()));
    let against = |baseline_name: &'static str, samples: Vec<Duration>| {
        let base = median(samples.clone());
        Row {
            name: "sandboxed `true`, set-up to tear-down".into(),
            casbuild: format!("{} (p99 {})", ms(ours_med), ms(p99(ours.clone()))),
            baseline_name,
            baseline: format!("{} (p99 {})", ms(base), ms(p99(samples))),
            ratio: base.as_secs_f64() / ours_med.as_secs_f64(),
        }
    };
    let mut rows = vec![against("fork/exec of `true`", plain)];
    if theirs.is_empty() {
        eprintln!("bench: bwrap is not installed (apt-get install bubblewrap); its row is left out");
    } else {
        rows.push(against("bwrap with the same namespaces and mounts", theirs));
    }
    rows.push(against("the same without the root observer", ours_unobserved));
    rows.push(against("the same without root observer, cgroup and scratch tmpfs", ours_bare));
    // The seccomp filters are compiled once in the zygote (installing them is one syscall per run).
    let compiles: Vec<Duration> = (0..200)
        .map(|_| {
            let start = Instant::now();
            let filters = casbuild_exec::seccomp::Filters::compile(&[]);
            let took = start.elapsed();
            drop(filters);
            took
        })
        .collect();
    casbuild_exec::scratch::flush();
    tokio::task::spawn_blocking(move || mount.unmount()).await??;
    server.stop().await;
    print_table(&rows);
    println!("seccomp filter compile, once per deny list in the zygote (median of 200): {}", ms(median(compiles)));
    println!("\noverhead over fork/exec (medians): {}", ms(ours_med.saturating_sub(plain_med)));
    let inside = median(inside);
    println!(
        "of the full sandbox's {}: inside its init (namespaces, root, command, reaping, report) {}, \
         outside (scratch, cgroup, observer, zygote, wake-up) {}",
        ms(ours_med),
        ms(inside),
        ms(ours_med.saturating_sub(inside))
    );
    Ok(())
}
