//! `casbuild bench cc`: the zstd and Lua builds of the wrapper tests
//! (tests/fixtures/cc) with local `make -j2`, through `casbuild cc` on
//! `casbuild up` cold and warm, and the cost of one wrapper call on a hit
//! beside a plain `gcc -c` (and `gcc -E`, which every wrapper call runs) of
//! the same file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{median, print_table, Row, Up};

#[derive(clap::Args)]
pub struct CcArgs {
    /// Rounds of each build (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Calls of the single-file comparison.
    #[arg(long, default_value_t = 50)]
    calls: usize,
    /// The zstd `lib` directory [default: from the zstd-sys crate in cargo's registry].
    #[arg(long)]
    zstd: Option<PathBuf>,
    /// The Lua 5.4 source directory [default: from the lua-src crate in cargo's registry].
    #[arg(long)]
    lua: Option<PathBuf>,
    /// Scratch directory [default: a temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Instead: what prefetching from access profiles does for a second cold build after an edit of a
    /// header most sources include (every compile's input new, its command the same), on a `casbuild
    /// worker` process that fetches from a `casbuild coordinator` process, against prefetching off.
    #[arg(long)]
    prefetch: bool,
}

struct Project {
    name: &'static str,
    sources: PathBuf,
    makefile: &'static str,
    driver: &'static str,
    /// A header (in the copy) that most sources include.
    common_header: &'static str,
}

/// `sub` in the sources of crate `name` that cargo fetched.
fn crate_sources(name: &str, sub: &str) -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let registry = home.join("registry/src");
    for index in std::fs::read_dir(&registry).with_context(|| format!("reading {}", registry.display()))?.flatten() {
        for krate in std::fs::read_dir(index.path())?.flatten() {
            let path = krate.path();
            let dir = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if dir.starts_with(&format!("{name}-")) && path.join(sub).is_dir() {
                return Ok(path.join(sub));
            }
        }
    }
    bail!("no {name} sources under {}; run `cargo fetch` or pass the directory", registry.display())
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A fresh copy of the project in `dir`.
fn write_project(project: &Project, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let status = Command::new("cp").arg("-r").arg(&project.sources).arg(dir.join("lib")).status()?;
    anyhow::ensure!(status.success(), "copying {}", project.sources.display());
    std::fs::write(dir.join("Makefile"), project.makefile)?;
    std::fs::write(dir.join("driver.c"), project.driver)?;
    Ok(())
}

/// Runs `make -jJOBS TARGET CC=cc` in `dir`; returns how long it took.
fn make(dir: &Path, jobs: u32, cc: &str, env: &[(&str, &str)], target: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = Command::new("make")
        .arg(format!("-j{jobs}"))
        .arg(target)
        .arg(format!("CC={cc}"))
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .context("running make")?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("make {target} in {} failed:\n{}", dir.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

pub async fn bench_cc(args: CcArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref())?;
    let projects = vec![
        Project {
            name: "zstd",
            sources: args.zstd.clone().map_or_else(|| crate_sources("zstd-sys", "zstd/lib"), Ok)?,
            makefile: include_str!("../../../tests/fixtures/cc/zstd.mk"),
            driver: include_str!("../../../tests/fixtures/cc/zstd_driver.c"),
            common_header: "lib/common/mem.h",
        },
        Project {
            name: "Lua",
            sources: args.lua.clone().map_or_else(|| crate_sources("lua-src", "lua-5.4.7"), Ok)?,
            makefile: include_str!("../../../tests/fixtures/cc/lua.mk"),
            driver: include_str!("../../../tests/fixtures/cc/lua_driver.c"),
            common_header: "lib/lprefix.h",
        },
    ];
    let root = scratch.path().to_path_buf();
    let (rounds, calls) = (args.rounds.max(1), args.calls.max(1));
    let prefetch = args.prefetch;
    tokio::task::spawn_blocking(move || {
        if prefetch {
            measure_prefetch(&root, &projects, rounds)
        } else {
            measure(&root, &projects, rounds, calls)
        }
    })
    .await?
}

fn measure(root: &Path, projects: &[Project], rounds: usize, calls: usize) -> anyhow::Result<()> {
    let up = Up::start(&root.join("up"), None)?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let cc = format!("{exe} cc gcc");
    let daemons = root.join("daemons");
    let daemons = daemons.to_string_lossy().into_owned();
    let mut rows = Vec::new();
    for project in projects {
        let (mut local, mut cold, mut warm_l1, mut warm_remote) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let dir = root.join(format!("{}-local-{round}", project.name));
            write_project(project, &dir)?;
            local.push(make(&dir, 2, "gcc", &[], "all")?);

            // A fresh instance: an empty action cache and a new daemon.
            let instance = format!("bench-{}-{round}", project.name);
            let env = [
                ("CASBUILD_REMOTE", up.url.as_str()),
                ("CASBUILD_INSTANCE", &instance),
                ("CASBUILD_DAEMON_DIR", &daemons),
            ];
            let dir = root.join(format!("{}-wrapped-{round}", project.name));
            write_project(project, &dir)?;
            cold.push(make(&dir, 8, &cc, &env, "all")?);
            make(&dir, 8, &cc, &env, "clean")?;
            warm_l1.push(make(&dir, 8, &cc, &env, "all")?);
            stop_daemon(&exe, &env)?;
            make(&dir, 8, &cc, &env, "clean")?;
            warm_remote.push(make(&dir, 8, &cc, &env, "all")?);
            stop_daemon(&exe, &env)?;
            eprintln!(
                "{} round {round}: local {}, cold {}, warm {} (daemon L1), {} (cluster cache)",
                project.name,
                seconds(local[round]),
                seconds(cold[round]),
                seconds(warm_l1[round]),
                seconds(warm_remote[round])
            );
        }
        let local = median(local);
        for (what, times) in
            [("cold", cold), ("warm, daemon L1 hits", warm_l1), ("warm, cluster cache hits", warm_remote)]
        {
            let time = median(times);
            rows.push(Row {
                name: format!("{} build through casbuild cc (make -j8), {what}", project.name),
                casbuild: seconds(time),
                baseline_name: "local make -j2",
                baseline: seconds(local),
                ratio: local.as_secs_f64() / time.as_secs_f64(),
            });
        }
    }
    print_table(&rows);
    single_file(root, &projects[0], &up.url, &exe, &daemons, calls)
}

/// `--prefetch`: every round builds a project once to record the access
/// profiles, edits its common header, and builds it again cold twice, with
/// the first build's profiles and with prefetching off
/// ([`super::cluster::prefetch_round`]); every build has a daemon of its own.
fn measure_prefetch(root: &Path, projects: &[Project], rounds: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let cc = format!("{exe} cc gcc");
    let mut rows = Vec::new();
    for project in projects {
        let (mut with, mut without) = (vec![], vec![]);
        for round in 0..rounds {
            let here = root.join(format!("{}-prefetch-{round}", project.name));
            let dir = here.join("src");
            write_project(project, &dir)?;
            // The instance is part of a profile's key: the same for all three builds.
            let instance = format!("bench-{}-prefetch-{round}", project.name);
            let cold_build = |cluster: &Path, url: &str| -> anyhow::Result<Duration> {
                let daemon = cluster.join("daemon").to_string_lossy().into_owned();
                let env =
                    [("CASBUILD_REMOTE", url), ("CASBUILD_INSTANCE", &instance), ("CASBUILD_DAEMON_DIR", &daemon)];
                make(&dir, 8, &cc, &env, "clean")?;
                let took = make(&dir, 8, &cc, &env, "all")?;
                stop_daemon(&exe, &env)?;
                Ok(took)
            };
            let edit = || {
                // A declaration survives preprocessing, so every compile's input changes.
                let header = dir.join(project.common_header);
                let mut text = std::fs::read_to_string(&header)?;
                text.push_str(&format!("\nextern int casbuild_bench_revision_{round};\n"));
                Ok(std::fs::write(&header, text)?)
            };
            // The worker runs gcc for `casbuild cc` (without it the daemon compiles locally).
            let times = super::cluster::prefetch_round(&here, round, &["--compiler", "gcc"], cold_build, edit)?;
            eprintln!(
                "{} round {round}: first build {} ({} profiles); second build prefetched {}, prefetch off {}",
                project.name,
                seconds(times.first),
                times.profiles,
                seconds(times.prefetched),
                seconds(times.off)
            );
            with.push(times.prefetched);
            without.push(times.off);
        }
        let (with, without) = (median(with), median(without));
        rows.push(Row {
            name: format!(
                "{} second cold build through casbuild cc after editing {}, prefetched",
                project.name, project.common_header
            ),
            casbuild: seconds(with),
            baseline_name: "the same build, prefetching off",
            baseline: seconds(without),
            ratio: without.as_secs_f64() / with.as_secs_f64(),
        });
    }
    print_table(&rows);
    Ok(())
}

fn stop_daemon(exe: &str, env: &[(&str, &str)]) -> anyhow::Result<()> {
    let status =
        Command::new(exe).args(["cc", "--stop-daemon"]).envs(env.iter().copied()).stdout(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "stopping the daemon");
    Ok(())
}

/// One zstd file: p50 of a wrapper call on a hit, of `gcc -c` and of `gcc -E`.
fn single_file(
    root: &Path,
    project: &Project,
    url: &str,
    exe: &str,
    daemons: &str,
    calls: usize,
) -> anyhow::Result<()> {
    let dir = root.join("single");
    write_project(project, &dir)?;
    let flags = ["-O2", "-Wall", "-DZSTD_DISABLE_ASM", "-DXXH_NAMESPACE=ZSTD_", "-Ilib", "-Ilib/common"];
    let source = "lib/compress/zstd_compress.c";
    let env = [("CASBUILD_REMOTE", url), ("CASBUILD_INSTANCE", "bench-single"), ("CASBUILD_DAEMON_DIR", daemons)];
    let time = |program: &str, pre: &[&str], last: &[&str], env: &[(&str, &str)]| -> anyhow::Result<Duration> {
        let start = Instant::now();
        let status = Command::new(program)
            .args(pre)
            .args(flags)
            .args(last)
            .envs(env.iter().copied())
            .current_dir(&dir)
            .status()?;
        anyhow::ensure!(status.success(), "{program} {pre:?} failed");
        Ok(start.elapsed())
    };
    let compile = ["-c", source, "-o", "out.o"];
    time(exe, &["cc", "gcc"], &compile, &env)?; // the one miss: cached from here on
    let (mut hits, mut plain, mut preprocess) = (vec![], vec![], vec![]);
    for _ in 0..calls {
        hits.push(time(exe, &["cc", "gcc"], &compile, &env)?);
        plain.push(time("gcc", &[], &compile, &[])?);
        preprocess.push(time("gcc", &[], &["-E", source, "-o", "out.i"], &[])?);
    }
    stop_daemon(exe, &env)?;
    let (hit, plain, preprocess) = (median(hits), median(plain), median(preprocess));
    println!();
    println!("| one call, {source} (p50 of {calls}) | time |");
    println!("| --- | --- |");
    println!("| `casbuild cc gcc -c` on a hit | {} |", ms(hit));
    println!("| plain `gcc -c` | {} ({:.1}× the hit) |", ms(plain), plain.as_secs_f64() / hit.as_secs_f64());
    println!("| `gcc -E` (part of every wrapper call) | {} |", ms(preprocess));
    println!("| wrapper overhead on a hit (hit − gcc -E) | {} |", ms(hit.saturating_sub(preprocess)));
    Ok(())
}
