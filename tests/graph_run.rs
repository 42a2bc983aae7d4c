//! `casbuild graph run` against real clusters: a ~100-job C build on a
//! coordinator with two worker processes (cold, then all cache hits, then a
//! one-source change rerunning exactly its downstream jobs), keep-going,
//! directories flowing between jobs, a dropped connection resumed, and the
//! server refusing invalid graphs and missing sources. Needs root (FUSE,
//! namespaces) except for the refusals.

mod common;
#[path = "../src/cmd/bench/demo.rs"]
mod demo;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use casbuild_proto::graph::graphs_client::GraphsClient;
use casbuild_proto::graph::{Job, SourceFile, SubmitGraphRequest};
use common::{casbuild, needs_root, start_worker, Coordinator};
use demo::write_c_program;

/// Runs `casbuild graph run` on the graph in `dir`; returns the process output.
fn graph_run(server: &str, dir: &Path, extra: &[&str]) -> Output {
    casbuild()
        .args(["graph", "run", "--remote", server])
        .arg(dir.join("graph.json"))
        .args(extra)
        .output()
        .expect("running casbuild graph run")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Job ids on progress lines that contain `marker` ("done on", "cached:", ...).
fn jobs_with(text: &str, marker: &str) -> BTreeSet<String> {
    text.lines().filter(|l| l.contains(marker)).filter_map(|l| l.rsplit(": ").next().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_job_c_build_runs_on_two_workers_then_caches_then_reruns_only_downstream() {
    if !needs_root("a_hundred_job_c_build_runs_on_two_workers", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("store"), &[]);
    let _w1 = start_worker(&server, dir.path(), 1, &["--slots", "2"]);
    let _w2 = start_worker(&server, dir.path(), 2, &["--slots", "2"]);
    let project = dir.path().join("project");
    let expected = write_c_program(&project, 48).unwrap();
    let jobs = 48 * 2 + 5;
    let out_dir = dir.path().join("out");
    let out_arg = out_dir.to_str().unwrap();

    let cold = graph_run(&server.url(), &project, &["--out", out_arg]);
    let text = stderr(&cold);
    assert!(cold.status.success(), "{text}");
    assert_eq!(jobs_with(&text, "done on").len(), jobs, "every job ran once:\n{text}");
    assert!(text.contains("done on w1") && text.contains("done on w2"), "both workers got work:\n{text}");
    assert!(text.contains(&format!("{jobs} jobs: {jobs} executed, 0 cached, 0 failed")), "{text}");
    assert_eq!(std::fs::read_to_string(out_dir.join("result.txt")).unwrap(), expected);

    let warm = graph_run(&server.url(), &project, &["--out", out_arg]);
    let text = stderr(&warm);
    assert!(warm.status.success(), "{text}");
    assert_eq!(jobs_with(&text, "cached:").len(), jobs, "a second run is all cache hits:\n{text}");
    assert!(text.contains(&format!("{jobs} jobs: 0 executed, {jobs} cached")), "{text}");
    assert!(text.contains("0 uploaded"), "no source is uploaded twice:\n{text}");

    // One source changes: exactly the jobs downstream of it run again.
    let source = project.join("src/f5.c");
    let changed = std::fs::read_to_string(&source).unwrap().replace("+ 5;", "+ 1005;");
    std::fs::write(&source, changed).unwrap();
    let edited = graph_run(&server.url(), &project, &["--out", out_arg]);
    let text = stderr(&edited);
    assert!(edited.status.success(), "{text}");
    let rerun = jobs_with(&text, "done on");
    let expected_rerun: BTreeSet<String> = ["cc-f5", "archive", "link", "run"].map(String::from).into();
    assert_eq!(rerun, expected_rerun, "{text}");
    assert!(text.contains("1 uploaded"), "only the changed source is uploaded:\n{text}");
    let sum: usize = (0..48).map(|k| k * 4).sum::<usize>() + 1000;
    assert_eq!(std::fs::read_to_string(out_dir.join("result.txt")).unwrap(), format!("sum={sum}\n"));
}

/// A graph where `bad` fails, `after-bad` needs it, and `good`, `after-good`
/// and `lone` do not.
fn write_failing_graph(dir: &Path) {
    let graph = r#"{"jobs": [
        {"id": "good", "argv": ["sh", "-c", "echo good > good.txt"], "env": {"PATH": "/usr/bin:/bin"}, "outputs": ["good.txt"]},
        {"id": "bad", "argv": ["sh", "-c", "echo boom-from-bad >&2; exit 3"], "env": {"PATH": "/usr/bin:/bin"}, "outputs": ["bad.txt"]},
        {"id": "after-bad", "argv": ["sh", "-c", "cat bad.txt > x.txt"], "env": {"PATH": "/usr/bin:/bin"}, "inputs": ["bad:bad.txt"], "outputs": ["x.txt"]},
        {"id": "after-good", "argv": ["sh", "-c", "sleep 0.3; cat good.txt good.txt > y.txt"], "env": {"PATH": "/usr/bin:/bin"}, "inputs": ["good:good.txt"], "outputs": ["y.txt"]},
        {"id": "lone", "argv": ["sh", "-c", "echo lone > z.txt"], "env": {"PATH": "/usr/bin:/bin"}, "outputs": ["z.txt"]}
    ]}"#;
    std::fs::write(dir.join("graph.json"), graph).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_runs_everything_that_does_not_depend_on_a_failure() {
    if !needs_root("keep_going_runs_everything_that_does_not_depend_on_a_failure", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    write_failing_graph(&project);

    // Without --keep-going: the failure is reported with its stderr, its
    // dependent does not run, and the exit status says so.
    let out = graph_run(&server.url(), &project, &[]);
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FAILED bad: exited with code 3"), "{text}");
    assert!(text.contains("boom-from-bad"), "the failing job's stderr is printed:\n{text}");
    assert!(text.contains("not run: after-bad"), "{text}");
    assert!(text.contains("1 failed"), "{text}");

    // With it: everything independent of `bad` runs; only `after-bad` is skipped.
    let out_dir = dir.path().join("out");
    let out = graph_run(&server.url(), &project, &["--keep-going", "--out", out_dir.to_str().unwrap()]);
    let text = stderr(&out);
    assert!(!out.status.success(), "a failed job still fails the run:\n{text}");
    assert!(text.contains(r#"not run: after-bad: it needs job "bad", which failed"#), "{text}");
    let succeeded: BTreeSet<String> =
        jobs_with(&text, "done on").union(&jobs_with(&text, "cached:")).cloned().collect();
    assert_eq!(succeeded, ["after-good", "good", "lone"].map(String::from).into(), "{text}");
    assert!(text.contains("1 failed, 1 not run"), "{text}");
    assert_eq!(std::fs::read_to_string(out_dir.join("y.txt")).unwrap(), "good\ngood\n");
    assert_eq!(std::fs::read_to_string(out_dir.join("z.txt")).unwrap(), "lone\n");
    assert!(!out_dir.join("x.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_executables_and_symlinks_flow_between_jobs() {
    if !needs_root("directories_executables_and_symlinks_flow_between_jobs", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join("tools")).unwrap();
    std::fs::write(project.join("tools/greet.sh"), "#!/bin/sh\necho \"hi from $1\"\n").unwrap();
    std::fs::set_permissions(project.join("tools/greet.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let graph = r#"{"jobs": [
        {"id": "tree", "argv": ["sh", "-c", "mkdir -p site/a/b && echo one > site/a/1.txt && echo two > site/a/b/2.txt && ln -s a/1.txt site/link"],
         "env": {"PATH": "/usr/bin:/bin"}, "outputs": ["site"]},
        {"id": "use", "argv": ["sh", "-c", "cat site/link site/a/b/2.txt > report.txt && tools/greet.sh use >> report.txt"],
         "env": {"PATH": "/usr/bin:/bin"}, "inputs": ["tree:site", "tools/greet.sh"], "outputs": ["report.txt"]}
    ]}"#;
    std::fs::write(project.join("graph.json"), graph).unwrap();
    let out_dir = dir.path().join("out");
    let out = graph_run(
        &server.url(),
        &project,
        &["--out", out_dir.to_str().unwrap(), "--output", "site", "--output", "report.txt"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(out_dir.join("report.txt")).unwrap(), "one\ntwo\nhi from use\n");
    assert_eq!(std::fs::read_link(out_dir.join("site/link")).unwrap(), Path::new("a/1.txt"));
    assert_eq!(std::fs::read_to_string(out_dir.join("site/a/b/2.txt")).unwrap(), "two\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_the_event_stream() {
    if !needs_root("a_dropped_connection_resumes_the_event_stream", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    let proxy = Proxy::start(&server.addr).await;
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    // A chain of six jobs, each a little slow, so the cut lands mid-graph.
    let jobs: Vec<String> = (0..6)
        .map(|k| {
            let input = if k == 0 { String::new() } else { format!(r#""s{}:n{}.txt""#, k - 1, k - 1) };
            format!(
                r#"{{"id": "s{k}", "argv": ["sh", "-c", "sleep 0.4; echo {k} > n{k}.txt"], "env": {{"PATH": "/usr/bin:/bin"}}, "inputs": [{input}], "outputs": ["n{k}.txt"]}}"#
            )
        })
        .collect();
    std::fs::write(project.join("graph.json"), format!(r#"{{"jobs": [{}]}}"#, jobs.join(","))).unwrap();

    let mut child = casbuild()
        .args(["graph", "run", "--remote", &format!("grpc://{}", proxy.addr)])
        .arg(project.join("graph.json"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (seen, reader) = (lines.clone(), child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if line.contains("started s2") {
                let _ = tx.send(());
            }
            seen.lock().unwrap().push(line);
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the graph reached its third job");
    let cut = proxy.cut();
    assert!(cut > 0, "the client's connection went through the proxy");
    let status = wait_bounded(&mut child, Duration::from_secs(90));
    let text = lines.lock().unwrap().join("\n");
    assert!(status.success(), "{text}");
    assert!(text.contains("reconnecting to graph"), "{text}");
    for k in 0..6 {
        let finished = text.lines().filter(|l| l.ends_with(&format!(": s{k}"))).count();
        assert_eq!(finished, 1, "s{k} is reported exactly once:\n{text}");
    }
    assert!(text.contains("6 jobs: 6 executed"), "{text}");
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("casbuild graph run did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP proxy on 127.0.0.1 that can cut every open connection while still
/// accepting new ones: a dropped network path, as the client sees it.
struct Proxy {
    addr: String,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (open, target) = (connections.clone(), target.to_owned());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                open.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, connections, accept }
    }

    /// Drops every open connection; returns how many there were.
    fn cut(&self) -> usize {
        let open: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for task in &open {
            task.abort();
        }
        open.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test]
async fn the_server_refuses_invalid_graphs_and_missing_sources() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("store"), &[]);
    let mut client = GraphsClient::new(server.channel().await);
    let job = |id: &str, inputs: &[&str], outputs: &[&str]| Job {
        id: id.into(),
        argv: vec!["true".into()],
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let digest = common::sha256(b"int x;\n");
    let wire = digest.to_proto();

    // A cycle, a source the request does not carry, an escaping output.
    let request = SubmitGraphRequest {
        jobs: vec![job("a", &["b:o", "x.c"], &["p"]), job("b", &["a:p"], &["o", "../up"])],
        ..Default::default()
    };
    let status = client.submit_graph(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    for needle in ["cycle: a -> b -> a", r#"job "a": inputs[1] source file "x.c" was not sent"#, r#""../up" steps out"#]
    {
        assert!(status.message().contains(needle), "{needle:?} in {}", status.message());
    }

    // A source whose blob was never uploaded: FAILED_PRECONDITION naming it.
    let request = SubmitGraphRequest {
        jobs: vec![job("a", &["x.c"], &["o"])],
        sources: vec![SourceFile { path: "x.c".into(), digest: Some(wire), is_executable: false }],
        ..Default::default()
    };
    let status = client.submit_graph(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(&digest.hash_hex()), "{}", status.message());

    // Watching a graph that does not exist.
    let watch = casbuild_proto::graph::WatchGraphRequest { graph_id: "nope".into(), after_sequence: 0 };
    let status = client.watch_graph(watch).await.expect_err("unknown graph");
    assert_eq!(status.code(), tonic::Code::NotFound);
}
