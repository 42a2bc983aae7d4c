//! A coordinator with two `casbuild worker` processes (two mounts, two
//! caches): the worker token, work spread over both, a worker SIGKILLed
//! mid-action whose leases finish on the other, and cached results that
//! survive a coordinator restart. Needs root (FUSE, namespaces).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use casbuild_proto::reapi::execution_client::ExecutionClient;
use common::execute::{execute, execute_request, operations, response_of, shell_action, upload};
use common::{casbuild, needs_root, processes_with, start_worker, Coordinator, Detach};

const TOKEN: &str = "s3cret-worker-token";

/// Starts `casbuild worker` number `n` with its own mount, cache and scratch.
fn worker(server: &Coordinator, dir: &Path, n: u32) -> Coordinator {
    worker_with(server, dir, n, &["--slots", "2"])
}

fn worker_with(server: &Coordinator, dir: &Path, n: u32, extra: &[&str]) -> Coordinator {
    start_worker(server, dir, n, &[&["--worker-token", TOKEN], extra].concat())
}

/// Waits (at most 30 s) until a process whose command line holds `script` runs.
async fn until_running(script: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while processes_with(script).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the action never started on the worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Workers client holding the worker token, as any process given it could.
async fn workers_client_with_token(
    server: &Coordinator,
) -> casbuild_proto::worker::workers_client::WorkersClient<casbuild_cas::store::RemoteChannel> {
    use casbuild_cas::store::{connect_channel, ConnectOptions};
    let options = ConnectOptions { api_key: Some(TOKEN.into()), ..Default::default() };
    let channel = connect_channel(&server.url(), Duration::from_secs(10), &options).await.unwrap();
    casbuild_proto::worker::workers_client::WorkersClient::new(channel)
}

fn worker_of(response: &casbuild_proto::reapi::ExecuteResponse) -> String {
    response.result.as_ref().and_then(|r| r.execution_metadata.as_ref()).map(|m| m.worker.clone()).unwrap_or_default()
}

/// Executes each action once, concurrently; returns the responses.
async fn execute_all(
    server: &Coordinator,
    actions: &[casbuild_cas::digest::Digest],
) -> Vec<casbuild_proto::reapi::ExecuteResponse> {
    let channel = server.channel().await;
    let calls: Vec<_> = actions
        .iter()
        .map(|action| {
            let (mut client, action) = (ExecutionClient::new(channel.clone()), *action);
            tokio::spawn(async move { execute(&mut client, execute_request(&action, false)).await })
        })
        .collect();
    let mut responses = Vec::new();
    for call in calls {
        responses.push(tokio::time::timeout(Duration::from_secs(120), call).await.expect("bounded").unwrap());
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_work_survive_a_crash_and_results_outlive_the_coordinator() {
    if !needs_root("two_workers_share_work", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let flags = ["--worker-token", TOKEN, "--heartbeat", "200ms"];
    let server = Coordinator::start(&storage, &flags);

    // A worker without the token is turned away.
    let refused = casbuild()
        .args(["worker", "--coordinator", &server.url(), "--mount"])
        .arg(dir.path().join("intruder"))
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let _detach = [Detach(dir.path().join("worker-1/cas")), Detach(dir.path().join("worker-2/cas"))];
    let w1 = worker(&server, dir.path(), 1);
    let w2 = worker(&server, dir.path(), 2);

    // Work spreads over both workers.
    let mut actions = Vec::new();
    for i in 0..12 {
        let (digest, blobs) = shell_action(&format!("sleep 0.4; head -c 32 /dev/urandom > out # spread {i}"));
        upload(&server, blobs).await;
        actions.push(digest);
    }
    let responses = execute_all(&server, &actions).await;
    let mut workers = HashSet::new();
    for response in &responses {
        assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{response:?}");
        workers.insert(worker_of(response));
    }
    assert_eq!(workers, HashSet::from(["w1".to_owned(), "w2".to_owned()]), "both workers ran actions");

    // SIGKILL one worker while actions run: its leases are requeued on the other.
    let mut slow = Vec::new();
    for i in 0..4 {
        let (digest, blobs) = shell_action(&format!("sleep 2; head -c 32 /dev/urandom > out # crash {i}"));
        upload(&server, blobs).await;
        slow.push(digest);
    }
    let server_ref = &server;
    let run = execute_all(server_ref, &slow);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        w1.kill();
    };
    let (responses, ()) = tokio::join!(run, kill);
    for response in &responses {
        assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{response:?}");
        assert_eq!(worker_of(response), "w2", "everything finished on the surviving worker");
    }

    // Restart the coordinator on the same storage: results are still cached.
    drop(w2); // SIGTERM: the worker drains and unmounts
    server.stop();
    let server = Coordinator::start(&storage, &flags);
    let mut client = ExecutionClient::new(server.channel().await);
    let response = execute(&mut client, execute_request(&actions[0], false)).await;
    assert!(response.cached_result, "the action cache survived the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_actions_run_by_priority_and_cancelling_stops_a_remote_command() {
    if !needs_root("queued_actions_run_by_priority", true) {
        return;
    }
    use casbuild_proto::longrunning::operations_client::OperationsClient;
    use casbuild_proto::longrunning::CancelOperationRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--worker-token", TOKEN, "--heartbeat", "200ms"]);
    let _detach = Detach(dir.path().join("worker-1/cas"));
    let limits = ["--slots", "1", "--sandbox-uids", "61234", "--sandbox-gid", "61235", "--max-file-size", "1MiB"];
    let _w1 = worker_with(&server, dir.path(), 1, &limits);
    let channel = server.channel().await;

    common::execute::assert_runs_by_priority(&server).await;
    let mut client = ExecutionClient::new(channel.clone());

    // Commands run as the worker's configured user and group.
    let (ids, blobs) = shell_action("echo $(id -u):$(id -g) > out");
    upload(&server, blobs).await;
    let response = execute(&mut client, execute_request(&ids, false)).await;
    let out = response.result.unwrap().output_files[0].digest.clone().unwrap();
    let read = casbuild_proto::reapi::BatchReadBlobsRequest {
        digests: vec![out],
        digest_function: common::execute::F.to_proto() as i32,
        ..Default::default()
    };
    let data = server.cas().await.batch_read_blobs(read).await.unwrap().into_inner().responses.remove(0).data;
    assert_eq!(String::from_utf8_lossy(&data), "61234:61235\n");

    // Writing past the worker's file size limit kills the writer (SIGXFSZ).
    let (big, blobs) = shell_action("head -c 2000000 /dev/zero > out");
    upload(&server, blobs).await;
    let response = execute(&mut client, execute_request(&big, false)).await;
    assert_eq!(response.result.as_ref().unwrap().exit_code, 128 + libc::SIGXFSZ, "{response:?}");

    // Cancel an operation running on the worker: its command is killed there.
    let (slow, blobs) = shell_action("sleep 300; echo remote-cancel > out");
    upload(&server, blobs).await;
    let mut stream = client.execute(execute_request(&slow, false)).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().unwrap().name;
    until_running("sleep 300; echo remote-cancel").await;
    OperationsClient::new(channel.clone()).cancel_operation(CancelOperationRequest { name }).await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(30), operations(stream)).await.unwrap();
    assert_eq!(response_of(rest.last().unwrap()).status.unwrap().code, tonic::Code::Cancelled as i32);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_with("sleep 300; echo remote-cancel").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the cancelled command still runs on the worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_told_to_stop_finishes_its_running_actions_first() {
    if !needs_root("a_worker_told_to_stop_finishes_its_running_actions", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--worker-token", TOKEN, "--heartbeat", "200ms"]);
    let _detach = Detach(dir.path().join("worker-1/cas"));
    let w1 = worker(&server, dir.path(), 1);
    let (action, blobs) = shell_action("sleep 1.5; echo drained > out");
    upload(&server, blobs).await;
    let mut client = ExecutionClient::new(server.channel().await);
    let stream = client.execute(execute_request(&action, false)).await.unwrap().into_inner();
    until_running("sleep 1.5; echo drained").await;
    // SIGTERM: the worker takes no new leases but completes this one, then exits.
    let stopping = tokio::task::spawn_blocking(move || w1.stop());
    let ops = tokio::time::timeout(Duration::from_secs(60), operations(stream)).await.unwrap();
    let response = response_of(ops.last().unwrap());
    assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{response:?}");
    assert_eq!(worker_of(&response), "w1", "the draining worker finished it");
    stopping.await.unwrap();

    // It left: its id is free at once (not after the lease timeout), and the
    // restarted worker runs the next action.
    let _w1 = worker(&server, dir.path(), 1);
    let (action, blobs) = shell_action("echo restarted > out");
    upload(&server, blobs).await;
    let response = execute(&mut client, execute_request(&action, false)).await;
    assert_eq!(worker_of(&response), "w1", "{response:?}");
}

#[test]
fn the_worker_token_can_come_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "worker_token = \"from-the-file\"\nheartbeat = \"250ms\"\n").unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--config", config.to_str().unwrap()]);
    let attempt = |token: &str| {
        casbuild()
            .args(["worker", "--coordinator", &server.url(), "--worker-token", token, "--mount"])
            .arg(dir.path().join("never-mounted"))
            .env("XDG_CACHE_HOME", dir.path().join("xdg"))
            .output()
            .unwrap()
    };
    let refused = attempt("wrong");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn beyond_loopback_a_coordinator_wants_a_worker_token_and_takes_it_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    // Port 0 on every address: refused before anything listens.
    let out = casbuild()
        .args(["coordinator", "--listen", "0.0.0.0:0", "--storage", storage.to_str().unwrap()])
        .env_remove("CASBUILD_WORKER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without a worker token") && stderr.contains("--insecure"), "{stderr}");

    // A token file keeps the secret out of the command line; a worker with the wrong one is refused.
    let file = dir.path().join("token");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let server = Coordinator::start(&storage, &["--worker-token-file", file.to_str().unwrap()]);
    let refused = casbuild()
        .args(["worker", "--coordinator", &server.url(), "--worker-token", "wrong", "--mount"])
        .arg(dir.path().join("never-mounted"))
        .env("XDG_CACHE_HOME", dir.path().join("xdg"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused"));
}

/// Another process that holds the worker token claims a live worker's id
/// while it runs an action: it gets neither the id, nor its lease stream,
/// nor a say in the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_take_over_a_live_workers_id_or_leases() {
    use casbuild_proto::worker::{
        complete_request::Outcome, CompleteRequest, HeartbeatRequest, LeasesRequest, RegisterRequest,
    };
    use tonic::Code;
    if !needs_root("a_second_process_cannot_take_over_a_live_workers_id_or_leases", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--worker-token", TOKEN]);
    let _detach = Detach(dir.path().join("worker-1/cas"));
    let _w1 = worker(&server, dir.path(), 1);
    let (action, blobs) = shell_action("sleep 2; echo genuine > out");
    upload(&server, blobs).await;
    let mut client = ExecutionClient::new(server.channel().await);
    let stream = client.execute(execute_request(&action, true)).await.unwrap().into_inner();
    until_running("sleep 2; echo genuine").await;

    let mut attacker = workers_client_with_token(&server).await;
    let session = "the-attackers-own-session".to_owned();
    let hijack = RegisterRequest { worker_id: "w1".into(), slots: 64, session: session.clone(), ..Default::default() };
    let err = attacker.register(hijack).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let leases = LeasesRequest { worker_id: "w1".into(), session: session.clone() };
    let err = attacker.leases(leases).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let beat = HeartbeatRequest { worker_id: "w1".into(), session: session.clone(), ..Default::default() };
    assert_eq!(attacker.heartbeat(beat).await.unwrap_err().code(), Code::PermissionDenied);
    // Completing in w1's name with a guessed lease id changes nothing.
    let forged = CompleteRequest {
        worker_id: "w1".into(),
        lease_id: "1".into(),
        outcome: Some(Outcome::ActionResult(Default::default())),
        session,
        ..Default::default()
    };
    let err = attacker.complete(forged).await.unwrap_err();
    assert!(matches!(err.code(), Code::PermissionDenied | Code::NotFound), "{err:?}");

    let ops = tokio::time::timeout(Duration::from_secs(60), operations(stream)).await.unwrap();
    let response = response_of(ops.last().unwrap());
    assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{response:?}");
    assert_eq!(worker_of(&response), "w1");
    assert_eq!(response.result.unwrap().output_files.len(), 1, "the genuine worker's result");
}

/// A worker (holding the token) that claims 1,000 slots gets only the few
/// leases a new worker is trusted with, not the whole queue, and a result
/// it makes up is refused at the door, not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_worker_gets_a_few_leases_and_cannot_poison_the_cache() {
    use casbuild_proto::reapi::{ActionResult, GetActionResultRequest, OutputFile};
    use casbuild_proto::worker::lease_update::Update;
    use casbuild_proto::worker::{complete_request::Outcome, CompleteRequest};
    use casbuild_proto::worker::{HeartbeatRequest, LeasesRequest, RegisterRequest};
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--worker-token", TOKEN]);
    let mut rogue = workers_client_with_token(&server).await;
    let session = "a-rogue-workers-session".to_owned();
    let id = "greedy".to_owned();
    rogue
        .register(RegisterRequest {
            worker_id: id.clone(),
            slots: 1000,
            session: session.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let beat = HeartbeatRequest {
        worker_id: id.clone(),
        session: session.clone(),
        slots: 1000,
        free_cpus: 1000,
        ..Default::default()
    };
    rogue.heartbeat(beat).await.unwrap();
    let mut leases = rogue.leases(LeasesRequest { worker_id: id, session }).await.unwrap().into_inner();

    // Twenty actions wait; the rogue sits on whatever it gets.
    let mut waiting = std::collections::HashMap::new();
    for i in 0..20 {
        let (action, blobs) = shell_action(&format!("echo {i} > out"));
        upload(&server, blobs).await;
        let mut client = ExecutionClient::new(server.channel().await);
        waiting.insert(
            action.hash_hex(),
            (action, client.execute(execute_request(&action, true)).await.unwrap().into_inner()),
        );
    }
    let mut leased = Vec::new();
    // Until nothing more comes for 2 s.
    while let Ok(update) = tokio::time::timeout(Duration::from_secs(2), leases.message()).await {
        match update.unwrap().expect("the lease stream stays open").update {
            Some(Update::Lease(lease)) => leased.push(lease),
            other => panic!("expected leases only, got {other:?}"),
        }
    }
    assert_eq!(leased.len() as u32, casbuild_coordinator::workers::INITIAL_CAPACITY);

    // A made-up result writing outside the output root, from a blob that
    // exists: the client gets an error and the cache stays clean.
    let lease = &leased[0];
    let (action, stream) = waiting.remove(&lease.action_digest.as_ref().unwrap().hash).unwrap();
    let present = casbuild_cas::digest::DigestFunction::Sha256.digest_of(b"");
    upload(&server, vec![(present, bytes::Bytes::new())]).await;
    let poisoned = ActionResult {
        output_files: vec![OutputFile {
            path: "../../etc/cron.d/x".into(),
            digest: Some(present.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let complete = CompleteRequest {
        worker_id: "greedy".into(),
        lease_id: lease.lease_id.clone(),
        outcome: Some(Outcome::ActionResult(poisoned)),
        session: "a-rogue-workers-session".into(),
        ..Default::default()
    };
    rogue.complete(complete).await.unwrap();
    let ops = tokio::time::timeout(Duration::from_secs(30), operations(stream)).await.unwrap();
    let status = response_of(ops.last().unwrap()).status.unwrap();
    assert_eq!(status.code, tonic::Code::Internal as i32);
    assert!(status.message.contains("unusable result"), "{}", status.message);
    let get = GetActionResultRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    let err = server.action_cache().await.get_action_result(get).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
