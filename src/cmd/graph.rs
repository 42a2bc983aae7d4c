//! `casbuild graph`: whole build graphs (see docs/GRAPH.md) — check one, or
//! run one on the cluster with live progress.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::local_tree::hash_file;
use casbuild_cas::store::{upload_missing, BlobStore, RemoteStore};
use casbuild_coordinator::graph::{normal, parse_input, Graph, Input};
use casbuild_proto::graph::graph_event::Event;
use casbuild_proto::graph::graphs_client::GraphsClient;
use casbuild_proto::graph::output::Kind;
use casbuild_proto::graph::{self as proto, GraphEvent, SourceFile, SubmitGraphRequest, WatchGraphRequest};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cmd::cas::{download_file, download_tree, OutputRoot, Remote};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check a graph without running it: every problem is listed with its job and field.
    Check {
        /// The graph, as JSON.
        graph: PathBuf,
        /// Where source inputs are looked up [default: the graph file's directory].
        #[arg(long)]
        sources: Option<PathBuf>,
    },
    /// Run a graph on the cluster: upload missing sources, stream progress,
    /// download outputs. Exits non-zero if any job failed.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    remote: Remote,
    /// The graph, as JSON.
    graph: PathBuf,
    /// Where source inputs are looked up [default: the graph file's directory].
    #[arg(long)]
    sources: Option<PathBuf>,
    /// Run every job that does not depend on a failed one, instead of stopping at the first failure.
    #[arg(long, short = 'k')]
    keep_going: bool,
    /// Download outputs into this directory: those named by --output, else
    /// those of the jobs no other job reads (the graph's end products).
    #[arg(long)]
    out: Option<PathBuf>,
    /// An output path (as a job declares it) to download into --out; repeatable.
    #[arg(long = "output", requires = "out")]
    outputs: Vec<String>,
    /// Print one line per event even on a terminal.
    #[arg(long)]
    plain: bool,
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { graph, sources } => {
            let (parsed, _) = load(&graph, sources)?;
            let sources =
                parsed.jobs.iter().flat_map(|j| j.inputs.iter()).filter(|i| is_source(i)).collect::<BTreeSet<_>>();
            println!("{}: ok, {} jobs, {} source files", graph.display(), parsed.jobs.len(), sources.len());
            Ok(())
        }
        Command::Run(args) => run_graph(*args).await,
    }
}

fn is_source(input: &str) -> bool {
    matches!(parse_input(input), Input::Source(_))
}

/// Reads and checks a graph; every problem is printed before failing.
fn load(path: &Path, sources: Option<PathBuf>) -> anyhow::Result<(Graph, PathBuf)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let graph = Graph::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let root = sources.unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let problems = graph.problems(&root);
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("{}: {problem}", path.display());
        }
        bail!("{} problem(s); nothing was run", problems.len());
    }
    Ok((graph, root))
}

async fn run_graph(args: RunArgs) -> anyhow::Result<()> {
    let (graph, root) = load(&args.graph, args.sources.clone())?;
    let wanted = wanted_outputs(&graph, &args)?;
    let function = args.remote.digest_function;
    // Its errors name the address and say what to check.
    let remote = args.remote.connect().await?;

    let sources = upload_sources(&remote, &graph, &root, function).await?;
    let request = SubmitGraphRequest {
        instance_name: args.remote.instance.clone(),
        digest_function: function.to_proto() as i32,
        jobs: graph.jobs.iter().map(proto::Job::from).collect(),
        sources,
        keep_going: args.keep_going,
    };
    let mut client = GraphsClient::new(remote.channel()).max_decoding_message_size(64 << 20);
    let mut stream = client.submit_graph(request).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();

    let terminal = !args.plain && std::io::stderr().is_terminal();
    let mut progress = Progress::new(graph.jobs.len(), terminal);
    let (mut graph_id, mut last) = (String::new(), 0u64);
    let done = loop {
        match stream.message().await {
            Ok(Some(event)) => {
                graph_id.clone_from(&event.graph_id);
                last = event.sequence;
                if let Some(done) = progress.event(&remote, function, event).await {
                    break done;
                }
            }
            Ok(None) => stream = reconnect(&mut client, &graph_id, last, "the event stream ended early").await?,
            Err(status) => stream = reconnect(&mut client, &graph_id, last, status.message()).await?,
        }
    };
    progress.finish();
    eprintln!(
        "casbuild: {} jobs: {} executed, {} cached, {} failed, {} not run, in {:.1} s",
        graph.jobs.len(),
        done.executed,
        done.cached,
        done.failed,
        done.skipped,
        done.duration_ms as f64 / 1000.0
    );
    if let Some(out) = &args.out {
        download(&remote, function, &progress.outputs, &wanted, out).await?;
    }
    if done.failed > 0 || done.skipped > 0 {
        bail!("{} job(s) failed and {} did not run", done.failed, done.skipped);
    }
    Ok(())
}

/// The output paths to download: `--output`s (each must be declared), else
/// those of jobs nothing else reads.
fn wanted_outputs(graph: &Graph, args: &RunArgs) -> anyhow::Result<Vec<String>> {
    let declared: BTreeSet<String> = graph.jobs.iter().flat_map(|j| j.outputs.iter().map(|o| normal(o))).collect();
    if !args.outputs.is_empty() {
        for output in &args.outputs {
            if !declared.contains(&normal(output)) {
                bail!("--output {output:?} is not an output of any job in {}", args.graph.display());
            }
        }
        return Ok(args.outputs.iter().map(|o| normal(o)).collect());
    }
    let read: BTreeSet<&str> = graph
        .jobs
        .iter()
        .flat_map(|j| j.inputs.iter())
        .filter_map(|i| match parse_input(i) {
            Input::Output { job, .. } => Some(job),
            Input::Source(_) => None,
        })
        .collect();
    Ok(graph
        .jobs
        .iter()
        .filter(|j| !read.contains(j.id.as_str()))
        .flat_map(|j| j.outputs.iter().map(|o| normal(o)))
        .collect())
}

/// Hashes every source file and uploads those the CAS lacks.
async fn upload_sources(
    remote: &RemoteStore,
    graph: &Graph,
    root: &Path,
    function: DigestFunction,
) -> anyhow::Result<Vec<SourceFile>> {
    let paths: BTreeSet<String> = graph
        .jobs
        .iter()
        .flat_map(|j| j.inputs.iter())
        .filter_map(|i| match parse_input(i) {
            Input::Source(path) => Some(path.to_owned()),
            Input::Output { .. } => None,
        })
        .collect();
    let root = root.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|path| {
                let file = root.join(&path);
                let executable = std::fs::metadata(&file)?.permissions().mode() & 0o111 != 0;
                Ok((path, file.clone(), hash_file(&file, function)?, executable))
            })
            .collect::<std::io::Result<Vec<(String, PathBuf, Digest, bool)>>>()
    })
    .await?
    .context("hashing the sources")?;
    let files: BTreeMap<Digest, PathBuf> = hashed.iter().map(|(_, file, d, _)| (*d, file.clone())).collect();
    let uploaded = upload_missing(remote, Vec::new(), &files).await.context("uploading sources")?;
    eprintln!("casbuild: {} source files, {uploaded} uploaded", hashed.len());
    Ok(hashed
        .into_iter()
        .map(|(path, _, digest, is_executable)| SourceFile { path, digest: Some(digest.to_proto()), is_executable })
        .collect())
}

/// Resumes the graph's event stream after the connection dropped, retrying
/// for up to a minute.
async fn reconnect(
    client: &mut GraphsClient<casbuild_cas::store::RemoteChannel>,
    graph_id: &str,
    after: u64,
    why: &str,
) -> anyhow::Result<tonic::Streaming<GraphEvent>> {
    if graph_id.is_empty() {
        bail!("the coordinator dropped the graph before accepting it: {why}");
    }
    eprintln!("casbuild: lost the event stream ({why}); reconnecting to graph {graph_id}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pause = Duration::from_millis(100);
    loop {
        let request = WatchGraphRequest { graph_id: graph_id.to_owned(), after_sequence: after };
        match client.watch_graph(request).await {
            Ok(stream) => return Ok(stream.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => bail!("{}", status.message()),
            Err(status) if Instant::now() >= deadline => {
                bail!("could not reconnect to graph {graph_id}: {}", status.message())
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Live progress: a bar on a terminal, one line per event otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    finished: usize,
    cached: usize,
    failed: usize,
    running: BTreeSet<String>,
    /// Every output of every finished job, by normalized path.
    outputs: HashMap<String, proto::Output>,
}

impl Progress {
    fn new(total: usize, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(total as u64);
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar, total, finished: 0, cached: 0, failed: 0, running: BTreeSet::new(), outputs: HashMap::new() }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Records one event; returns the totals once the graph is done.
    async fn event(
        &mut self,
        remote: &RemoteStore,
        function: DigestFunction,
        event: GraphEvent,
    ) -> Option<proto::GraphDone> {
        let counter = |p: &Progress| format!("[{}/{}]", p.finished, p.total);
        match event.event? {
            Event::Accepted(_) | Event::Queued(_) => {}
            Event::Started(started) => {
                if self.bar.is_none() {
                    self.line(&format!("{} started {} on {}", counter(self), started.job_id, started.worker));
                }
                self.running.insert(started.job_id);
            }
            Event::Finished(finished) => {
                self.running.remove(&finished.job_id);
                self.finished += 1;
                let how = if finished.cached {
                    self.cached += 1;
                    "cached".to_owned()
                } else {
                    format!("done on {}", finished.worker)
                };
                if self.bar.is_none() {
                    self.line(&format!("{} {how}: {}", counter(self), finished.job_id));
                }
                for output in finished.outputs {
                    self.outputs.insert(normal(&output.path), output);
                }
            }
            Event::Failed(failed) => {
                self.running.remove(&failed.job_id);
                self.finished += 1;
                self.failed += 1;
                self.line(&format!("{} FAILED {}: {}", counter(self), failed.job_id, failed.reason));
                if let Some(stderr) = failed.stderr_digest.as_ref().and_then(|d| Digest::from_proto(function, d).ok()) {
                    if !stderr.is_empty_blob() {
                        match remote.read_all(&stderr).await {
                            Ok(bytes) => self.line(String::from_utf8_lossy(&bytes).trim_end()),
                            Err(e) => self.line(&format!("(its stderr could not be fetched: {e})")),
                        }
                    }
                }
            }
            Event::Skipped(skipped) => {
                self.finished += 1;
                self.line(&format!("{} not run: {}: {}", counter(self), skipped.job_id, skipped.reason));
            }
            Event::Done(done) => return Some(done),
        }
        if let Some(bar) = &self.bar {
            bar.set_position(self.finished as u64);
            let names: Vec<&str> = self.running.iter().take(3).map(String::as_str).collect();
            bar.set_message(format!(
                "{} cached · {} running · {} failed  {}",
                self.cached,
                self.running.len(),
                self.failed,
                names.join(", ")
            ));
        }
        None
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Downloads the wanted outputs that were produced into `out`.
async fn download(
    remote: &RemoteStore,
    function: DigestFunction,
    produced: &HashMap<String, proto::Output>,
    wanted: &[String],
    out: &Path,
) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let root = OutputRoot::open(out)?;
    for path in wanted {
        let Some(output) = produced.get(path) else {
            missing.push(path.as_str());
            continue;
        };
        let dest = root.place(path)?;
        let digest = output.digest.as_ref().and_then(|d| Digest::from_proto(function, d).ok());
        match (Kind::try_from(output.kind), digest) {
            (Ok(Kind::File), Some(digest)) => download_file(remote, &digest, &dest, output.is_executable).await?,
            (Ok(Kind::Directory), Some(digest)) => download_tree(remote, &digest, &dest).await?,
            (Ok(Kind::Symlink), _) => std::os::unix::fs::symlink(&output.symlink_target, &dest)
                .with_context(|| format!("symlink {}", dest.display()))?,
            _ => bail!("output {path:?} came back without a digest"),
        }
    }
    eprintln!("casbuild: downloaded {} output(s) into {}", wanted.len() - missing.len(), out.display());
    if !missing.is_empty() {
        eprintln!("casbuild: not produced (their jobs did not succeed): {}", missing.join(", "));
    }
    Ok(())
}
