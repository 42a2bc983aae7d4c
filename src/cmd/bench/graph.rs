//! `casbuild bench graph`: the generated C build graph (docs/GRAPH.md, the
//! one the tests run) on `casbuild up`, cold and warm, against running the
//! same commands serially on the host.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use casbuild_coordinator::graph::Graph;

use super::demo::write_c_program;
use super::{median, print_table, Row, Up};

#[derive(clap::Args)]
pub struct GraphArgs {
    /// Compilation units: the graph has 2 × UNITS + 5 jobs.
    #[arg(long, default_value_t = 48)]
    units: usize,
    #[command(flatten)]
    runs: super::Runs,
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Runs `casbuild graph run` on the project in `dir` with its own instance.
fn graph_run(url: &str, instance: &str, dir: &Path) -> anyhow::Result<Duration> {
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let out = Command::new(exe)
        .args(["graph", "run", "--plain", "--remote", url, "--instance", instance])
        .arg(dir.join("graph.json"))
        .output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("graph run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

pub async fn bench_graph(args: GraphArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.runs.dir.as_deref())?;
    let root = scratch.path().to_path_buf();
    let (units, rounds, slots) = (args.units.max(1), args.runs.rounds.max(1), args.runs.slots);
    tokio::task::spawn_blocking(move || measure(&root, units, rounds, slots)).await?
}

fn measure(root: &Path, units: usize, rounds: usize, slots: Option<usize>) -> anyhow::Result<()> {
    let up = Up::start(&root.join("up"), slots)?;
    let jobs = 2 * units + 5;
    eprintln!(
        "bench: a C build graph of {jobs} jobs, {rounds} rounds: serial on the host, cold and warm on casbuild up"
    );
    let (mut serial, mut cold, mut warm) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        // The host baseline: the same commands, one after another, in a fresh tree.
        let host = root.join(format!("host-{round}"));
        let expected = write_c_program(&host, units)?;
        let graph = Graph::from_json(&std::fs::read_to_string(host.join("graph.json"))?)?;
        let start = Instant::now();
        let status = Command::new("sh").arg("-c").arg(serial_script(&graph)).current_dir(&host).status()?;
        serial.push(start.elapsed());
        anyhow::ensure!(status.success(), "the serial build failed");
        anyhow::ensure!(std::fs::read_to_string(host.join("result.txt"))? == expected, "the serial build is wrong");

        // A fresh instance is a cold cache: nothing stored, nothing fetched by the worker.
        let project = root.join(format!("project-{round}"));
        write_c_program(&project, units)?;
        let instance = format!("bench-{round}");
        cold.push(graph_run(&up.url, &instance, &project)?);
        warm.push(graph_run(&up.url, &instance, &project)?);
        eprintln!(
            "round {round}: serial {}, cold {}, warm {}",
            seconds(serial[round]),
            seconds(cold[round]),
            seconds(warm[round])
        );
    }
    let serial = median(serial);
    let row = |name: &str, time: Duration| Row {
        name: name.to_owned(),
        casbuild: seconds(time),
        baseline_name: "serial on the host",
        baseline: seconds(serial),
        ratio: serial.as_secs_f64() / time.as_secs_f64(),
    };
    print_table(&[
        row(&format!("{jobs}-job graph, cold"), median(cold)),
        row(&format!("{jobs}-job graph, warm (all cached)"), median(warm)),
    ]);
    Ok(())
}

/// The commands of the graph in `dir` in dependency order, as a shell script
/// that runs them serially in `dir` — the host baseline for benchmarks.
fn serial_script(graph: &Graph) -> String {
    let mut script = String::from("set -e\n");
    for job in graph.topological_order() {
        for output in &job.outputs {
            if let Some(parent) = std::path::Path::new(output).parent().filter(|p| !p.as_os_str().is_empty()) {
                script.push_str(&format!("mkdir -p '{}'\n", parent.display()));
            }
        }
        let words: Vec<String> = job.argv.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
        script.push_str(&format!("( {} )\n", words.join(" ")));
    }
    script
}
