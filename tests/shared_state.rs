//! Several coordinators over one PostgreSQL database and one S3-compatible
//! bucket, all real processes on loopback: results and Remote Asset records
//! written through one are served by the other (and reach the other's
//! existence filter), a database crash loses nothing that was acknowledged,
//! Bazel's clean rebuild through the second coordinator is all cache hits,
//! a build whose coordinator is killed mid-action finishes through the
//! other behind the same address, an action asked of both runs once, and a
//! dead coordinator's action is adopted and finished by the other.

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::asset::fetch_client::FetchClient;
use casbuild_proto::asset::push_client::PushClient;
use casbuild_proto::asset::{FetchBlobRequest, PushBlobRequest};
use casbuild_proto::cc::existence_filter_client::ExistenceFilterClient;
use casbuild_proto::cc::get_filter_response::Filter;
use casbuild_proto::cc::GetFilterRequest;
use casbuild_proto::reapi::{ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest};
use common::postgres::Postgres;
use common::s3::S3Server;
use common::Coordinator;
use tonic::Code;

const BUCKET: &str = "casbuild-cluster";
const F: DigestFunction = DigestFunction::Sha256;

/// A coordinator on `database` and `bucket`, with its own disk under `dir/NAME`.
fn coordinator(postgres: &Postgres, s3: &S3Server, dir: &Path, name: &str) -> Coordinator {
    coordinator_with(postgres, s3, dir, name, &[])
}

fn coordinator_with(postgres: &Postgres, s3: &S3Server, dir: &Path, name: &str, extra: &[&str]) -> Coordinator {
    let table = s3.config_table(dir, BUCKET, "request_timeout = \"5s\"\n");
    Coordinator::start_with_config(&dir.join(name), &format!("database_url = \"{}\"\n{table}", postgres.url), extra)
}

/// One address in front of several coordinators, as a TCP load balancer
/// would be: each new connection goes to the current target.
struct Proxy {
    addr: String,
    target: Arc<Mutex<String>>,
}

impl Proxy {
    fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target = Arc::new(Mutex::new(target.to_owned()));
        let current = target.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let to = current.lock().unwrap().clone();
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(&to) else { return };
                    let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let upstream = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client_in, &mut server_out);
                        let _ = server_out.shutdown(Shutdown::Write);
                    });
                    let (mut server_in, mut client_out) = (server, client);
                    let _ = std::io::copy(&mut server_in, &mut client_out);
                    let _ = client_out.shutdown(Shutdown::Both);
                    let _ = upstream.join();
                });
            }
        });
        Proxy { addr, target }
    }

    /// New connections go to `target` from now on.
    fn switch(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_owned();
    }
}

/// A database, a bucket and two coordinators on them, in a new directory.
struct Cluster {
    postgres: Postgres,
    s3: S3Server,
    first: Coordinator,
    second: Coordinator,
    dir: tempfile::TempDir,
}

/// Starts a [`Cluster`], the first coordinator with `first_extra` flags;
/// `None` when the test skips (see [`Postgres::start`]).
fn cluster(test: &str, first_extra: &[&str]) -> Option<Cluster> {
    let dir = tempfile::tempdir().unwrap();
    let postgres = Postgres::start(test, &dir.path().join("pg"))?;
    let s3 = S3Server::start(test, &dir.path().join("s3"), &[BUCKET])?;
    let first = coordinator_with(&postgres, &s3, dir.path(), "first", first_extra);
    let second = coordinator(&postgres, &s3, dir.path(), "second");
    Some(Cluster { postgres, s3, first, second, dir })
}

fn get_request(action: &Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        action_digest: Some(action.to_proto()),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_share_results_and_assets_and_a_database_crash_loses_nothing() {
    let Some(Cluster { mut postgres, s3: _s3, first, second, dir: _dir }) = cluster("shared_state", &[]) else {
        return;
    };

    // A `casbuild cc` daemon's existence filter, from the second coordinator.
    let mut filters = ExistenceFilterClient::new(second.channel().await);
    let filter = |epoch, generation| GetFilterRequest { instance_name: String::new(), epoch, generation };
    let first_filter = filters.get_filter(filter(0, 0)).await.unwrap().into_inner();
    assert!(matches!(first_filter.filter, Some(Filter::Full(_))));

    // Results written through the first, each naming an output blob it holds.
    let output = Bytes::from(common::bytes(7, 50_000));
    let output_digest = F.digest_of(&output);
    common::execute::upload(&first, vec![(output_digest, output.clone())]).await;
    let actions: Vec<Digest> = (0..20).map(|i| F.digest_of(format!("action {i}").as_bytes())).collect();
    let result = |i: usize| ActionResult {
        exit_code: i as i32,
        output_files: vec![OutputFile {
            path: format!("out/{i}"),
            digest: Some(output_digest.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut writer = first.action_cache().await;
    for (i, action) in actions.iter().enumerate() {
        writer
            .update_action_result(UpdateActionResultRequest {
                action_digest: Some(action.to_proto()),
                action_result: Some(result(i)),
                digest_function: F.to_proto() as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // ... are hits on the second, which never saw them.
    let mut reader = second.action_cache().await;
    for (i, action) in actions.iter().enumerate() {
        let got = reader.get_action_result(get_request(action)).await.unwrap().into_inner();
        assert_eq!(got.exit_code, i as i32);
    }
    // The second's filter learns of them (it polls the database) and the
    // daemon's next refresh carries them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let added = loop {
        let refresh =
            filters.get_filter(filter(first_filter.epoch, first_filter.generation)).await.unwrap().into_inner();
        let Some(Filter::Added(added)) = refresh.filter else { panic!("an incremental refresh") };
        if added.keys.len() >= actions.len() || Instant::now() > deadline {
            break added.keys;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut expected: Vec<Vec<u8>> = actions.iter().map(|a| a.hash.to_vec()).collect();
    let mut added = added;
    expected.sort();
    added.sort();
    assert_eq!(added, expected, "each result written through the first, once");
    let absent = F.digest_of(b"never run");
    assert_eq!(reader.get_action_result(get_request(&absent)).await.unwrap_err().code(), Code::NotFound);

    // A Remote Asset pushed through the first is fetched through the second.
    let uri = "https://example.org/shared.tar.gz";
    PushClient::new(first.channel().await)
        .push_blob(PushBlobRequest {
            uris: vec![uri.into()],
            blob_digest: Some(output_digest.to_proto()),
            digest_function: F.to_proto() as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let fetched = FetchClient::new(second.channel().await)
        .fetch_blob(FetchBlobRequest {
            uris: vec![uri.into()],
            digest_function: F.to_proto() as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.blob_digest, Some(output_digest.to_proto()));

    // The database crashes: lookups fail as unavailable, naming it...
    postgres.crash();
    let err = reader.get_action_result(get_request(&actions[0])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&format!("database 127.0.0.1:{}", postgres.port)), "{err:?}");
    // ... and once it has recovered, every acknowledged result is there.
    postgres.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, action) in actions.iter().enumerate() {
        loop {
            match reader.get_action_result(get_request(action)).await {
                Ok(got) => {
                    assert_eq!(got.into_inner().exit_code, i as i32);
                    break;
                }
                Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("result {i} after the database's restart: {e:?}"),
            }
        }
    }
    drop((first, second));
}

#[test]
fn bazel_builds_through_one_coordinator_and_rebuilds_from_cache_through_another() {
    let test = "shared_state_bazel";
    if !(common::needs_root(test, true) && common::bazel::available(test)) {
        return;
    }
    let Some(Cluster { postgres: _postgres, s3: _s3, first, second, dir }) = cluster(test, &[]) else { return };
    let _worker = common::start_worker(&first, dir.path(), 1, &[]);

    let ws = dir.path().join("ws");
    common::bazel::sample_workspace(&ws);
    let repos = common::bazel::offline_repositories(&dir.path().join("repos"));
    let root = dir.path().join("bazel-root");
    let build = |server: &Coordinator| {
        let mut args = vec!["build".to_owned(), format!("--remote_executor={}", server.url())];
        args.extend(repos.iter().cloned());
        args.extend(["//pkg:c".to_owned(), "//pkg:app".to_owned()]);
        common::bazel::run(&ws, &root, &args)
    };
    let (ok, cold) = build(&first);
    assert!(ok, "{cold}");
    let executed = common::bazel::processes(&cold, " remote");
    assert!(executed >= 6, "{cold}");

    assert!(common::bazel::run(&ws, &root, &["clean"]).0);
    // The second coordinator has no worker: everything must come from the
    // shared action cache and bucket.
    let (ok, warm) = build(&second);
    assert!(ok, "{warm}");
    assert_eq!(common::bazel::processes(&warm, " remote cache hit"), executed, "{warm}");
    assert_eq!(common::bazel::processes(&warm, " remote"), 0, "{warm}");
    assert_eq!(std::fs::read_to_string(ws.join("bazel-bin/pkg/c.txt")).unwrap(), "HELLO\nHELLO\nSOME INPUT\n");
    let app = std::process::Command::new(ws.join("bazel-bin/pkg/app")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&app.stdout), "42\n");
}

#[test]
fn a_build_survives_its_coordinator_being_killed() {
    let test = "shared_state_failover";
    if !(common::needs_root(test, true) && common::bazel::available(test)) {
        return;
    }
    let Some(Cluster { postgres: _postgres, s3: _s3, first, second, dir }) =
        cluster(test, &["--metrics-listen", "127.0.0.1:0"])
    else {
        return;
    };
    let proxy = Proxy::start(&first.addr);
    // One worker, also behind the shared address: when its coordinator
    // dies it registers again with whichever one the address reaches.
    let _worker = common::start_worker_at(&format!("grpc://{}", proxy.addr), dir.path(), 1, &[]);

    let ws = dir.path().join("ws");
    common::bazel::package(
        &ws,
        r#"
genrule(name = "a", outs = ["a.txt"], cmd = "echo a > $@")
genrule(name = "slow", srcs = [":a"], outs = ["slow.txt"], cmd = "sleep 8; cat $< > $@; echo slow >> $@")
genrule(name = "after", srcs = [":slow"], outs = ["after.txt"], cmd = "cat $< > $@; echo after >> $@")
"#,
    );
    let repos = common::bazel::offline_repositories(&dir.path().join("repos"));
    let root = dir.path().join("bazel-root");
    let mut args = vec!["build".to_owned(), format!("--remote_executor=grpc://{}", proxy.addr)];
    args.extend(repos);
    args.push("//pkg:after".to_owned());
    let (ws_in, root_in) = (ws.clone(), root.clone());
    let build = std::thread::spawn(move || common::bazel::run(&ws_in, &root_in, &args));

    // Once the slow action has been running on the worker for a second,
    // the first coordinator dies.
    let metrics = first.metrics_addr();
    let leased = || common::http::sample(&common::http::get(&metrics, "/metrics").1, "casbuild_worker_leases", &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut running_since = None;
    loop {
        assert!(Instant::now() < deadline, "the slow action never started");
        match (leased() >= 1.0, running_since) {
            (true, None) => running_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() > Duration::from_secs(1) => break,
            (false, _) => running_since = None,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.switch(&second.addr);
    first.kill();

    let (ok, output) = build.join().unwrap();
    assert!(ok, "the build finishes through the second coordinator:\n{output}");
    assert_eq!(std::fs::read_to_string(ws.join("bazel-bin/pkg/after.txt")).unwrap(), "a\nslow\nafter\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_followed_through_any_coordinator() {
    use casbuild_proto::longrunning::operations_client::OperationsClient;
    use casbuild_proto::longrunning::GetOperationRequest;
    use casbuild_proto::reapi::execution_client::ExecutionClient;
    use casbuild_proto::reapi::WaitExecutionRequest;
    use common::execute::{execute_request, operations, response_of, shell_action, upload};

    let test = "shared_state_operations";
    if !common::needs_root(test, true) {
        return;
    }
    let Some(Cluster { postgres, s3: _s3, first, second, dir }) = cluster(test, &[]) else { return };
    let worker = common::start_worker(&first, dir.path(), 1, &[]);

    // An action executed through the first is followed to its end through the second.
    let (action, blobs) = shell_action("sleep 2; echo hi > out");
    upload(&first, blobs).await;
    let mut client = ExecutionClient::new(first.channel().await);
    let mut running = client.execute(execute_request(&action, true)).await.unwrap().into_inner();
    let name = running.message().await.unwrap().unwrap().name;
    let mut elsewhere = ExecutionClient::new(second.channel().await);
    let followed =
        operations(elsewhere.wait_execution(WaitExecutionRequest { name: name.clone() }).await.unwrap().into_inner())
            .await;
    let last = followed.last().unwrap();
    assert_eq!(last.name, name);
    assert_eq!(response_of(last).result.unwrap().exit_code, 0);
    let mut ops = OperationsClient::new(second.channel().await);
    let got = ops.get_operation(GetOperationRequest { name: name.clone() }).await.unwrap().into_inner();
    assert!(got.done, "{got:?}");
    for unknown in ["operations/00000000-0000-0000-0000-000000000000", "elsewhere/x"] {
        let err = ops.get_operation(GetOperationRequest { name: unknown.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{unknown}: {err:?}");
    }
    drop(running);

    // When the coordinator running it dies (its worker with it), another
    // coordinator adopts its lease and runs the action under the same name:
    // the follower sees it finish.
    let _second_worker = common::start_worker(&second, dir.path(), 2, &[]);
    let (slow, blobs) = shell_action("sleep 3; echo late > out");
    upload(&first, blobs).await;
    let mut running = client.execute(execute_request(&slow, true)).await.unwrap().into_inner();
    let name = running.message().await.unwrap().unwrap().name;
    let follower = elsewhere.wait_execution(WaitExecutionRequest { name: name.clone() }).await.unwrap().into_inner();
    worker.kill();
    first.kill();
    let followed = tokio::time::timeout(Duration::from_secs(60), operations(follower))
        .await
        .expect("the adopted action finishes within 60 s");
    let last = followed.last().unwrap();
    assert_eq!(last.name, name);
    let response = response_of(last);
    assert_eq!(response.result.as_ref().map(|r| r.exit_code), Some(0), "{response:?}");
    assert!(!response.cached_result);
    let got = ops.get_operation(GetOperationRequest { name: name.clone() }).await.unwrap().into_inner();
    assert!(got.done, "{got:?}");
    let leases = format!("SELECT count(*) FROM casbuild_leases WHERE operation = '{name}'");
    assert_eq!(postgres.query(&leases), "0", "the adopter ended the lease");
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_asked_of_two_coordinators_runs_once() {
    use casbuild_proto::reapi::execution_client::ExecutionClient;
    use common::execute::{execute_request, operations, response_of, shell_action, upload};

    let test = "shared_state_dedup";
    if !common::needs_root(test, true) {
        return;
    }
    let Some(Cluster { postgres, s3: _s3, first, second, dir }) = cluster(test, &[]) else { return };
    let _first_worker = common::start_worker(&first, dir.path(), 1, &[]);
    let _second_worker = common::start_worker(&second, dir.path(), 2, &[]);
    // Each run writes a different time: equal outputs mean one run.
    let (action, blobs) = shell_action("sleep 2; date +%s%N > out");
    upload(&first, blobs).await;
    let mut to_first = ExecutionClient::new(first.channel().await);
    let mut to_second = ExecutionClient::new(second.channel().await);
    let (one, two) = tokio::join!(
        async { operations(to_first.execute(execute_request(&action, false)).await.unwrap().into_inner()).await },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            operations(to_second.execute(execute_request(&action, false)).await.unwrap().into_inner()).await
        }
    );
    let (one, two) = (one.last().unwrap(), two.last().unwrap());
    assert_eq!(one.name, two.name, "the second coordinator follows the first's operation");
    let (one, two) = (response_of(one), response_of(two));
    let outputs = |r: &casbuild_proto::reapi::ExecuteResponse| r.result.as_ref().unwrap().output_files.clone();
    assert_eq!(outputs(&one), outputs(&two), "one run, one output");
    assert!(!one.cached_result && !two.cached_result);
    // The lease ended with the operation, in the same commit as its end.
    assert_eq!(postgres.query("SELECT count(*) FROM casbuild_leases"), "0");
}

#[test]
fn a_build_rides_out_a_database_restart_and_loses_nothing() {
    let test = "shared_state_db_restart";
    if !(common::needs_root(test, true) && common::bazel::available(test)) {
        return;
    }
    let Some(Cluster { mut postgres, s3: _s3, first, second, dir }) =
        cluster(test, &["--metrics-listen", "127.0.0.1:0"])
    else {
        return;
    };
    let _worker = common::start_worker(&first, dir.path(), 1, &[]);

    // A chain of actions, each running a second: the database restarts
    // while the first runs, and the rest are looked up, leased, published
    // and cached across the restart.
    let ws = dir.path().join("ws");
    let mut rules = String::from("genrule(name = \"s0\", outs = [\"s0.txt\"], cmd = \"sleep 1; echo 0 > $@\")\n");
    for i in 1..6 {
        rules.push_str(&format!(
            "genrule(name = \"s{i}\", srcs = [\":s{}\"], outs = [\"s{i}.txt\"], cmd = \"sleep 1; cat $< > $@; echo {i} >> $@\")\n",
            i - 1
        ));
    }
    common::bazel::package(&ws, &rules);
    let repos = common::bazel::offline_repositories(&dir.path().join("repos"));
    let root = dir.path().join("bazel-root");
    let build = move |remote: String| {
        let mut args = vec!["build".to_owned(), remote, "--noremote_upload_local_results".to_owned()];
        args.extend(repos.iter().cloned());
        args.push("//pkg:s5".to_owned());
        args
    };
    let (ws_in, root_in, args) = (ws.clone(), root.clone(), build(format!("--remote_executor={}", first.url())));
    let cold = std::thread::spawn(move || common::bazel::run(&ws_in, &root_in, &args));

    let metrics = first.metrics_addr();
    let leased = || common::http::sample(&common::http::get(&metrics, "/metrics").1, "casbuild_worker_leases", &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while leased() < 1.0 {
        assert!(Instant::now() < deadline, "no action started");
        std::thread::sleep(Duration::from_millis(50));
    }
    postgres.crash();
    std::thread::sleep(Duration::from_secs(1));
    postgres.restart();

    let (ok, output) = cold.join().unwrap();
    assert!(ok, "the build rides out the restart:\n{output}");
    let executed = common::bazel::processes(&output, " remote");
    assert_eq!(executed, 6, "{output}");
    let expected: String = (0..6).map(|i| format!("{i}\n")).collect();
    assert_eq!(std::fs::read_to_string(ws.join("bazel-bin/pkg/s5.txt")).unwrap(), expected);

    // Every result the build was given is in the shared action cache: a
    // clean rebuild from the other coordinator's cache is all hits (a miss
    // would run locally and be counted).
    assert!(common::bazel::run(&ws, &root, &["clean"]).0);
    let (ok, warm) = common::bazel::run(&ws, &root, &build(format!("--remote_cache={}", second.url())));
    assert!(ok, "{warm}");
    assert_eq!(common::bazel::processes(&warm, " remote cache hit"), 6, "{warm}");
    assert_eq!(common::bazel::processes(&warm, " remote"), 0, "{warm}");
}
