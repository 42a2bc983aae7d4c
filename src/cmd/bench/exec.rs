//! `casbuild bench exec`: no-op actions (`true`, empty input root) sent by an
//! independent REAPI client to `casbuild up`, as many in flight as a build
//! tool keeps: actions per second cold (each runs) and as cache hits, against
//! the same commands forked on the host with the same concurrency, plus where
//! the time of one action goes (from the ExecutedActionMetadata timestamps).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context};
use casbuild_cas::action::ActionSpec;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{connect_channel, BlobStore, ConnectOptions, RemoteStore, RemoteStoreOptions};
use casbuild_proto::protobuf::Timestamp;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{ExecuteRequest, ExecuteResponse};
use futures::StreamExt;

use super::{median, print_table, Row, Up};

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Actions per round.
    #[arg(long, default_value_t = 300)]
    actions: usize,
    /// Execute calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[command(flatten)]
    runs: super::Runs,
    /// Start `casbuild up` with `--metrics-listen` (to measure what recording metrics costs: compare with a
    /// run without).
    #[arg(long)]
    metrics: bool,
    /// Start `casbuild up` with `--cold-sandboxes` (a new sandbox per action, no warm slots).
    #[arg(long)]
    cold_sandboxes: bool,
    /// Also run the actions through real coordinator and worker processes: one coordinator on its files,
    /// one on this PostgreSQL database, and two on it (see `docs/PERFORMANCE.md`).
    #[arg(long)]
    database_url: Option<String>,
}

/// One action's time, split at its metadata's timestamps.
#[derive(Default)]
pub(super) struct Phases {
    /// Execute sent → the worker started it (cache lookup, input check, queue, lease).
    to_worker: Vec<Duration>,
    /// Worker start → inputs ready (Action/Command, input root on the mount).
    inputs: Vec<Duration>,
    /// The sandboxed command, set-up to tear-down.
    execution: Vec<Duration>,
    /// Outputs and logs into the CAS.
    upload: Vec<Duration>,
    /// Worker done → the client has the response (action cache, reply).
    to_client: Vec<Duration>,
    /// Execute sent → response received.
    total: Vec<Duration>,
}

fn at(timestamp: &Option<Timestamp>) -> Option<SystemTime> {
    casbuild_proto::system_time(timestamp.as_ref()?)
}

fn between(from: Option<SystemTime>, to: Option<SystemTime>) -> Duration {
    match (from, to) {
        (Some(from), Some(to)) => to.duration_since(from).unwrap_or_default(),
        _ => Duration::ZERO,
    }
}

impl Phases {
    fn add(&mut self, sent: SystemTime, received: SystemTime, response: &ExecuteResponse) {
        let Some(m) = response.result.as_ref().and_then(|r| r.execution_metadata.as_ref()) else { return };
        let (start, fetched) = (at(&m.worker_start_timestamp), at(&m.input_fetch_completed_timestamp));
        self.to_worker.push(between(Some(sent), start));
        self.inputs.push(between(start, fetched));
        self.execution.push(between(at(&m.execution_start_timestamp), at(&m.execution_completed_timestamp)));
        self.upload.push(between(at(&m.output_upload_start_timestamp), at(&m.output_upload_completed_timestamp)));
        self.to_client.push(between(at(&m.worker_completed_timestamp), Some(received)));
        self.total.push(between(Some(sent), Some(received)));
    }
}

/// Encodes `count` distinct no-op actions (a salt in the environment).
pub(super) fn actions(
    round: usize,
    count: usize,
    function: DigestFunction,
) -> (Vec<Digest>, Vec<(Digest, bytes::Bytes)>) {
    let (mut digests, mut blobs) = (Vec::new(), Vec::new());
    for i in 0..count {
        let spec = ActionSpec {
            argv: vec!["true".into()],
            env: BTreeMap::from([
                ("BENCH_SALT".to_owned(), format!("{}-{round}-{i}", std::process::id())),
                ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ]),
            ..Default::default()
        };
        let encoded = spec.encode(function);
        digests.push(encoded.digest);
        blobs.extend(encoded.blobs);
    }
    (digests, blobs)
}

/// Executes every action, `concurrency` at a time, spread over `clients`
/// in turn; returns the wall time and
/// how many came back as cache hits.
pub(super) async fn execute_all(
    clients: &[ExecutionClient<casbuild_cas::store::RemoteChannel>],
    digests: &[Digest],
    concurrency: usize,
    phases: &mut Phases,
) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let calls = futures::stream::iter(digests.iter().enumerate().map(|(i, digest)| {
        let mut client = clients[i % clients.len()].clone();
        let request = ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            digest_function: digest.function.to_proto() as i32,
            ..Default::default()
        };
        async move {
            let sent = SystemTime::now();
            let mut stream = client.execute(request).await.context("Execute")?.into_inner();
            let mut last = None;
            while let Some(operation) = stream.next().await {
                last = Some(operation.context("the Execute stream")?);
            }
            let received = SystemTime::now();
            let operation = last.context("an Execute stream without operations")?;
            let response = casbuild_proto::operation::execute_response(&operation).map_err(anyhow::Error::msg)?;
            anyhow::Ok((sent, received, response))
        }
    }))
    .buffer_unordered(concurrency);
    let responses: Vec<_> = calls.collect().await;
    let took = start.elapsed();
    let mut hits = 0;
    for response in responses {
        let (sent, received, response) = response?;
        let status = response.status.clone().unwrap_or_default();
        ensure!(status.code == 0, "an action failed: {}", status.message);
        let code = response.result.as_ref().map(|r| r.exit_code);
        ensure!(code == Some(0), "`true` exited with {code:?}: {}", response.message);
        if response.cached_result {
            hits += 1;
        } else {
            phases.add(sent, received, &response);
        }
    }
    Ok((took, hits))
}

/// Forks `true` `count` times, `concurrency` at a time.
fn fork_all(count: usize, concurrency: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                        let status = std::process::Command::new("true").status()?;
                        ensure!(status.success(), "true failed");
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a fork thread panicked"))
    })?;
    Ok(start.elapsed())
}

pub(super) fn per_second(count: usize, took: Duration) -> f64 {
    count as f64 / took.as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub async fn bench_exec(args: ExecArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.runs.dir.as_deref())?;
    let mut flags = Vec::new();
    if args.metrics {
        flags.extend(["--metrics-listen", "127.0.0.1:0"]);
    }
    if args.cold_sandboxes {
        flags.push("--cold-sandboxes");
    }
    let up = Up::start_with(&scratch.path().join("up"), args.runs.slots, &flags)?;
    let function = DigestFunction::Sha256;
    let options = RemoteStoreOptions::default();
    let store = RemoteStore::connect(&up.url, options).await?;
    let channel = connect_channel(&up.url, Duration::from_secs(30), &ConnectOptions::default()).await?;
    let client = ExecutionClient::new(channel);
    let (count, concurrency) = (args.actions.max(1), args.concurrency.max(1));
    let (mut cold, mut hit, mut fork) = (vec![], vec![], vec![]);
    let mut phases = Phases::default();
    eprintln!("bench: {count} no-op actions per round, {concurrency} in flight, {} rounds", args.runs.rounds.max(1));
    let mut cpu = Cpu::default();
    for round in 0..args.runs.rounds.max(1) {
        let (digests, blobs) = actions(round, count, function);
        store.write_batch(blobs).await?;
        let before = Cpu::now(up.pid());
        let (took, hits) = execute_all(std::slice::from_ref(&client), &digests, concurrency, &mut phases).await?;
        cpu.add_since(&before, &Cpu::now(up.pid()));
        ensure!(hits == 0, "{hits} of the new actions were cache hits");
        cold.push(took);
        let (took, hits) =
            execute_all(std::slice::from_ref(&client), &digests, concurrency, &mut Phases::default()).await?;
        ensure!(hits == count, "only {hits} of {count} repeated actions were cache hits");
        hit.push(took);
        let took = tokio::task::spawn_blocking(move || fork_all(count, concurrency)).await??;
        fork.push(took);
        eprintln!(
            "  round {}: {:.0} actions/s run, {:.0}/s as cache hits; fork/exec {:.0}/s",
            round + 1,
            per_second(count, cold[round]),
            per_second(count, hit[round]),
            per_second(count, fork[round])
        );
    }
    let (cold, hit, fork) = (median(cold), median(hit), median(fork));
    let fork_rate = format!("{:.0} /s", per_second(count, fork));
    let rows = vec![
        Row {
            name: format!("no-op actions run through `casbuild up`, {concurrency} in flight"),
            casbuild: format!("{:.0} /s", per_second(count, cold)),
            baseline_name: "fork/exec of `true`, same concurrency",
            baseline: fork_rate.clone(),
            ratio: fork.as_secs_f64() / cold.as_secs_f64(),
        },
        Row {
            name: format!("the same actions again (cache hits), {concurrency} in flight"),
            casbuild: format!("{:.0} /s", per_second(count, hit)),
            baseline_name: "fork/exec of `true`, same concurrency",
            baseline: fork_rate,
            ratio: fork.as_secs_f64() / hit.as_secs_f64(),
        },
    ];
    print_table(&rows);
    println!("\nwhere one run action's time goes (medians over every round):");
    println!("| phase | median |\n| --- | --- |");
    for (name, samples) in [
        ("Execute sent → worker starts (cache lookup, input check, queue, lease)", phases.to_worker),
        ("worker start → inputs ready (Action, Command, input root on the mount)", phases.inputs),
        ("sandboxed command, set-up to tear-down", phases.execution),
        ("outputs and logs into the CAS", phases.upload),
        ("worker done → client has the response (action cache, reply)", phases.to_client),
        ("total, Execute sent → response received", phases.total),
    ] {
        if !samples.is_empty() {
            println!("| {name} | {} |", ms(median(samples)));
        }
    }
    let runs = (count * args.runs.rounds.max(1)) as f64;
    let per = |d: Duration| d.as_secs_f64() * 1e3 / runs;
    let total = cpu.client + cpu.server + cpu.sandboxes;
    println!(
        "\nCPU per run action (all rounds): client {:.2} ms, `casbuild up` (coordinator, worker, mount) {:.2} ms, \
         sandboxes (zygote, init, command) {:.2} ms; {:.2} ms in all, so {} cores run at most {:.0} such actions/s",
        per(cpu.client),
        per(cpu.server),
        per(cpu.sandboxes),
        per(total),
        cores(),
        cores() as f64 * 1e3 / per(total).max(1e-3)
    );
    drop(up);
    if let Some(url) = &args.database_url {
        println!();
        super::cluster::bench_cluster(url, scratch.path(), count, concurrency, args.runs.rounds.max(1)).await?;
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// CPU time (user and system) of the bench process, of `casbuild up`
/// itself, and of its sandboxes (the zygote, with the runs it reaped, and
/// the warm slots, with their commands).
#[derive(Default)]
pub(super) struct Cpu {
    pub(super) client: Duration,
    pub(super) server: Duration,
    pub(super) sandboxes: Duration,
}

/// CPU time (user and system) of this process (`RUSAGE_SELF`) or of the
/// children it waited for (`RUSAGE_CHILDREN`).
pub(super) fn rusage(who: nix::sys::resource::UsageWho) -> Duration {
    nix::sys::resource::getrusage(who)
        .map(|u| {
            let t = |v: nix::sys::time::TimeVal| Duration::new(v.tv_sec() as u64, v.tv_usec() as u32 * 1000);
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

impl Cpu {
    pub(super) fn now(up: u32) -> Cpu {
        let client = rusage(nix::sys::resource::UsageWho::RUSAGE_SELF);
        // The zygote with the runs it reaped, and the warm slots it has not
        // reaped yet with the commands they reaped.
        let sandboxes = children(&up.to_string())
            .iter()
            .map(|zygote| ticks(zygote, true) + children(zygote).iter().map(|slot| ticks(slot, true)).sum::<Duration>())
            .sum();
        Cpu { client, server: ticks(&up.to_string(), false), sandboxes }
    }

    pub(super) fn add_since(&mut self, before: &Cpu, after: &Cpu) {
        self.client += after.client.saturating_sub(before.client);
        self.server += after.server.saturating_sub(before.server);
        self.sandboxes += after.sandboxes.saturating_sub(before.sandboxes);
    }
}

/// The pids of a process's living children.
fn children(pid: &str) -> Vec<String> {
    // Children are listed per thread (the one that spawned them).
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    threads
        .flat_map(|t| {
            let listed = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            listed.split_whitespace().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect()
}

/// A process's CPU time from /proc (with that of the children it reaped).
pub(super) fn ticks(pid: &str, reaped: bool) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // Fields after the command name (which may hold spaces), from field 3 on.
    let Some((_, rest)) = stat.rsplit_once(") ") else { return Duration::ZERO };
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // utime, stime, cutime, cstime are fields 14-17: indices 11-14 here.
    let sum: u64 = fields.get(11..if reaped { 15 } else { 13 }).map(|f| f.iter().sum()).unwrap_or(0);
    // /proc counts in USER_HZ ticks, 100 a second on Linux's architectures.
    Duration::from_millis(sum * 10)
}
