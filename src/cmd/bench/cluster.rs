//! `casbuild bench exec --database-url URL`: the same no-op actions through
//! real `casbuild coordinator` and `casbuild worker` processes, with two
//! workers throughout: one coordinator on its own files, one coordinator on
//! the shared database, and two coordinators on that database (one worker
//! each, the actions split between them) — what sharing the action cache,
//! operations and leases costs, and what a second coordinator brings.

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
