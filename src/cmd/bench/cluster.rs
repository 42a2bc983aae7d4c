//! `casbuild bench exec --database-url URL`: the same no-op actions through
//! real `casbuild coordinator` and `casbuild worker` processes, with two
//! workers throughout: one coordinator on its own files, one coordinator on
//! the shared database, and two coordinators on that database (one worker
//! each, the actions split between them) — what sharing the action cache,
//! operations and leases costs, and what a second coordinator brings.
//! Also the coordinator-and-worker rounds of the `--prefetch` benches
//! ([`prefetch_round`]).

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{ensure, Context};
use casbuild_cas::digest::DigestFunction;
use casbuild_cas::store::{connect_channel, BlobStore, ConnectOptions, RemoteStore, RemoteStoreOptions};
use casbuild_proto::reapi::execution_client::ExecutionClient;

use super::exec::{actions, execute_all, per_second, Phases};
use super::{median, print_table, spawn_until, Row};

/// A casbuild process of the cluster, stopped with SIGTERM when dropped.
pub(super) struct Node {
    child: Child,
    pub(super) url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// A `casbuild coordinator` storing under `store`, on `database_url` if given.
pub(super) fn coordinator(store: &Path, database_url: Option<&str>) -> anyhow::Result<Node> {
    let exe = std::env::current_exe().context("finding casbuild itself")?;
    let mut command = Command::new(&exe);
    command.args(["coordinator", "--listen", "127.0.0.1:0", "--storage"]).arg(store);
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let (child, url) = spawn_until(&mut command, "casbuild coordinator listening on ")?;
    Ok(Node { child, url })
}

/// A `casbuild worker` of `coordinator` named `name`, its mount, cache and
/// scratch under `base` (the cache in `base/cache`), with `extra` flags.
pub(super) fn worker(coordinator: &str, name: &str, base: &Path, extra: &[&str]) -> anyhow::Result<Node> {
    let exe = std::env::current_exe().context("finding casbuild itself")?;
    let mut command = Command::new(&exe);
    command.args(["worker", "--coordinator", coordinator, "--name", name, "--mount"]);
    command.arg(base.join("cas")).arg("--cache-dir").arg(base.join("cache")).arg("--scratch");
    command.arg(base.join("scratch")).args(extra);
    let (child, _) = spawn_until(&mut command, "casbuild worker ")?;
    Ok(Node { child, url: coordinator.to_owned() })
}

/// The times of one `--prefetch` round (see [`prefetch_round`]).
pub(super) struct PrefetchRound<T> {
    /// The first build, which recorded the access profiles.
    pub(super) first: T,
    /// The second build on a worker given those profiles.
    pub(super) prefetched: T,
    /// The second build on a worker with prefetching off.
    pub(super) off: T,
    /// The access profiles the first build left.
    pub(super) profiles: usize,
}

/// One round of a `--prefetch` bench under `dir`: `build` runs once on a
/// coordinator and worker of their own (recording the worker's access
/// profiles), `edit` changes the inputs, and `build` runs twice more, the
/// order alternating with `round`: on a worker given the first worker's
/// profiles, and on one with `--prefetch-bytes 0`. Every build gets a new
/// coordinator (empty store and action cache) and worker (empty blob
/// cache, `worker_flags`); `build` is given its own directory and the
/// coordinator's URL. A first build that leaves no profiles (its actions
/// did not run on the worker) is an error: the round would measure nothing.
pub(super) fn prefetch_round<T>(
    dir: &Path,
    round: usize,
    worker_flags: &[&str],
    mut build: impl FnMut(&Path, &str) -> anyhow::Result<T>,
    edit: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<PrefetchRound<T>> {
    let mut cold_build = |name: &str, prefetch_off: &[&str]| -> anyhow::Result<T> {
        let here = dir.join(name);
        let coordinator = coordinator(&here.join("store"), None)?;
        let flags = [worker_flags, prefetch_off].concat();
        let worker = worker(&coordinator.url, "bench", &here.join("worker"), &flags)?;
        let built = build(&here, &coordinator.url)?;
        drop(worker);
        Ok(built)
    };
    let first = cold_build("learn", &[])?;
    edit()?;
    // A worker keeps its profiles in its cache directory (`worker` puts that in `base/cache`).
    let profiles = |name: &str| dir.join(name).join("worker/cache/profiles");
    let given = profiles("with");
    std::fs::create_dir_all(&given)?;
    let learned = profiles("learn");
    let mut copied = 0;
    for entry in std::fs::read_dir(&learned).with_context(|| format!("reading {}", learned.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), given.join(entry.file_name()))?;
        copied += 1;
    }
    ensure!(
        copied > 0,
        "the first build left no access profiles in {}: did its actions run on the worker?",
        learned.display()
    );
    let (prefetched, off) = if round.is_multiple_of(2) {
        let prefetched = cold_build("with", &[])?;
        (prefetched, cold_build("without", &["--prefetch-bytes", "0"])?)
    } else {
        let off = cold_build("without", &["--prefetch-bytes", "0"])?;
        (cold_build("with", &[])?, off)
    };
    Ok(PrefetchRound { first, prefetched, off, profiles: copied })
}

/// One arrangement of the cluster.
struct Layout {
    name: &'static str,
    coordinators: usize,
    database: bool,
}

const LAYOUTS: [Layout; 3] = [
    Layout { name: "one coordinator on its files (no database)", coordinators: 1, database: false },
    Layout { name: "one coordinator on the database", coordinators: 1, database: true },
    Layout { name: "two coordinators on the database, one worker each", coordinators: 2, database: true },
];

/// The coordinators (and their two workers) of `layout`, under `dir`.
fn start(layout: &Layout, database_url: &str, dir: &Path) -> anyhow::Result<(Vec<Node>, Vec<Node>)> {
    let mut coordinators = Vec::new();
    for i in 0..layout.coordinators {
        let database = layout.database.then_some(database_url);
        coordinators.push(coordinator(&dir.join(format!("store-{i}")), database)?);
    }
    let mut workers = Vec::new();
    for i in 0..2 {
        let url = &coordinators[i % coordinators.len()].url;
        workers.push(worker(url, &format!("bench-{i}"), &dir.join(format!("worker-{i}")), &[])?);
    }
    Ok((coordinators, workers))
}

/// Runs every layout `rounds` times with `count` new actions, `concurrency`
/// in flight (spread over the coordinators), and prints a table.
pub async fn bench_cluster(
    database_url: &str,
    dir: &Path,
    count: usize,
    concurrency: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let function = DigestFunction::Sha256;
    // Rounds are interleaved (every layout once per round, each started
    // afresh) so that a host whose speed drifts during the run biases no
    // layout.
    let mut took: Vec<Vec<Duration>> = vec![Vec::new(); LAYOUTS.len()];
    for round in 0..rounds {
        for (index, layout) in LAYOUTS.iter().enumerate() {
            let here = dir.join(format!("cluster-{round}-{index}"));
            let (coordinators, workers) = start(layout, database_url, &here)?;
            let mut clients = Vec::new();
            let mut stores = Vec::new();
            for node in &coordinators {
                let channel = connect_channel(&node.url, Duration::from_secs(30), &ConnectOptions::default()).await?;
                clients.push(ExecutionClient::new(channel));
                stores.push(RemoteStore::connect(&node.url, RemoteStoreOptions::default()).await?);
            }
            // New actions every time (the database outlives the layouts).
            let (digests, blobs) = actions(1000 + round * 100 + index, count, function);
            for store in &stores {
                store.write_batch(blobs.clone()).await?;
            }
            let (time, hits) = execute_all(&clients, &digests, concurrency, &mut Phases::default()).await?;
            ensure!(hits == 0, "{hits} of the new actions were cache hits");
            eprintln!("  round {}: {}: {:.0} actions/s", round + 1, layout.name, per_second(count, time));
            took[index].push(time);
            drop(workers);
            drop(coordinators);
        }
    }
    let rates: Vec<f64> = took.into_iter().map(|t| per_second(count, median(t))).collect();
    let row = |i: usize, base: usize, baseline_name: &'static str| Row {
        name: format!("no-op actions run, {}, {concurrency} in flight", LAYOUTS[i].name),
        casbuild: format!("{:.0} /s", rates[i]),
        baseline_name,
        baseline: format!("{:.0} /s", rates[base]),
        ratio: rates[i] / rates[base],
    };
    print_table(&[
        row(1, 0, "one coordinator on its files"),
        row(2, 1, "one coordinator on the database"),
        row(2, 0, "one coordinator on its files"),
    ]);
    Ok(())
}
