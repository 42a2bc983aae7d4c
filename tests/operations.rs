//! Operating casbuild: `--metrics-listen` serves Prometheus metrics that
//! move by exactly what real REAPI traffic did, liveness and readiness over
//! HTTP; the gRPC health service follows the storage; a worker whose sandbox
//! cannot run does not register. Needs root (sandboxes, FUSE, bind mounts).

mod common;

use std::time::Duration;

use casbuild_proto::reapi::action_cache_client::ActionCacheClient;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::GetActionResultRequest;
use common::execute::{execute, execute_request, shell_action, upload, F};
use common::http::{get, sample};
use common::{needs_root, Coordinator};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_report_real_traffic() {
    if !needs_root("metrics_health_and_readiness_report_real_traffic", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = Coordinator::start_up_with(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(up.printed("  build --remote_executor="), up.url(), "a .bazelrc line to paste");
    let addr = up.metrics_addr();

    assert_eq!(get(&addr, "/healthz").0, 200);
    let (status, body) = get(&addr, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(serving_status(&up).await, ServingStatus::Serving);

    // One action that succeeds, run and then answered from the cache; one
    // that fails; one GetActionResult hit and one miss.
    let (ok, blobs) = shell_action("echo hi > out");
    upload(&up, blobs).await;
    let (fails, blobs) = shell_action("echo no > out; exit 3");
    upload(&up, blobs).await;
    let mut execution = ExecutionClient::new(up.channel().await);
    for (action, skip) in [(ok, true), (ok, false), (fails, false)] {
        execute(&mut execution, execute_request(&action, skip)).await;
    }
    let mut cache = ActionCacheClient::new(up.channel().await);
    let lookup = |action: casbuild_cas::digest::Digest| GetActionResultRequest {
        action_digest: Some(action.to_proto()),
        digest_function: F.to_proto() as i32,
        ..Default::default()
    };
    cache.get_action_result(lookup(ok)).await.expect("a hit");
    assert_eq!(cache.get_action_result(lookup(fails)).await.unwrap_err().code(), tonic::Code::NotFound);

    let (status, text) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    let finished = |outcome| sample(&text, "casbuild_actions_finished_total", &[("outcome", outcome)]);
    assert_eq!((finished("success"), finished("failure"), finished("error")), (1.0, 1.0, 0.0), "{text}");
    let lookups =
        |via, result| sample(&text, "casbuild_action_cache_lookups_total", &[("via", via), ("result", result)]);
    assert_eq!(lookups("execute", "hit"), 1.0, "the second run of the succeeding action");
    assert_eq!(lookups("execute", "miss"), 1.0, "the failing action (the first run skipped the lookup)");
    assert_eq!((lookups("get_action_result", "hit"), lookups("get_action_result", "miss")), (1.0, 1.0));
    let execute_method = "/build.bazel.remote.execution.v2.Execution/Execute";
    let calls = |method, code| sample(&text, "casbuild_grpc_requests_total", &[("method", method), ("code", code)]);
    assert_eq!(calls(execute_method, "Ok"), 3.0);
    assert_eq!(calls("/build.bazel.remote.execution.v2.ActionCache/GetActionResult", "NotFound"), 1.0);
    assert_eq!(
        sample(&text, "casbuild_grpc_request_duration_seconds_count", &[("method", execute_method)]),
        3.0,
        "each call is timed"
    );
    assert_eq!(sample(&text, "casbuild_action_execution_seconds_count", &[]), 2.0, "two actions ran");
    assert_eq!(sample(&text, "casbuild_healthy", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_sandbox_cannot_run_refuses_to_register_and_says_why() {
    if !needs_root("a_worker_whose_sandbox_cannot_run_refuses_to_register_and_says_why", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = server.metrics_addr();
    let workers = || sample(&get(&addr, "/metrics").1, "casbuild_workers_connected", &[]);

    // No program can start in its sandboxes: every action would fail there.
    let base = dir.path().join("broken");
    let path = |sub: &str| base.join(sub).to_str().unwrap().to_owned();
    let output = common::casbuild()
        .args(["worker", "--coordinator", &server.url(), "--mount", &path("cas"), "--cache-dir", &path("cache")])
        .args(["--scratch", &path("scratch"), "--seccomp-deny", "execve"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("sandbox self-test") && stderr.contains("does not register"), "{stderr}");
    assert!(stderr.contains("cannot execute /usr/bin/true: EPERM"), "the message names what failed: {stderr}");
    assert_eq!(workers(), 0.0, "it never registered");

    // A worker whose sandbox works registers.
    let _worker = common::start_worker(&server, dir.path(), 1, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while workers() != 1.0 {
        assert!(std::time::Instant::now() < deadline, "the working worker never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serving_status(server: &Coordinator) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status()
}

async fn until_status(server: &Coordinator, want: ServingStatus) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while serving_status(server).await != want {
        assert!(std::time::Instant::now() < deadline, "the health service never said {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_not_serving_while_the_storage_takes_no_writes() {
    use nix::mount::{mount, MsFlags};
    if !needs_root("health_says_not_serving_while_the_storage_takes_no_writes", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Coordinator::start(&storage, &["--metrics-listen", "127.0.0.1:0"]);
    let addr = server.metrics_addr();
    until_status(&server, ServingStatus::Serving).await;

    // Where blobs are written turns read-only (a full or failing disk).
    let tmp = storage.join("tmp");
    mount(Some(&tmp), &tmp, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
    let guard = common::Detach(tmp.clone());
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, &tmp, None::<&str>, flags, None::<&str>).unwrap();
    let (status, body) = get(&addr, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("does not take writes") && body.contains("Read-only file system"), "{body}");
    until_status(&server, ServingStatus::NotServing).await;
    assert_eq!(sample(&get(&addr, "/metrics").1, "casbuild_healthy", &[]), 0.0);

    drop(guard);
    assert_eq!(get(&addr, "/readyz").0, 200);
    until_status(&server, ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_name_the_action() {
    if !needs_root("json_logs_parse_and_name_the_action", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = Coordinator::start_up_with(dir.path(), &["--log-format", "json"]);
    let (action, blobs) = shell_action("echo logged > out");
    upload(&up, blobs).await;
    let mut execution = ExecutionClient::new(up.channel().await);
    execute(&mut execution, execute_request(&action, true)).await;

    let hash = action.hash_hex();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (finished, ran) = loop {
        let lines = up.stderr_lines();
        let events: Vec<serde_json::Value> = lines
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
            .collect();
        let event = |message: &str| {
            events
                .iter()
                .find(|e| {
                    e["fields"]["message"] == message && e["span"]["action"].as_str().is_some_and(|a| a.contains(&hash))
                })
                .cloned()
        };
        if let (Some(finished), Some(ran)) = (event("finished"), event("ran")) {
            break (finished, ran);
        }
        assert!(std::time::Instant::now() < deadline, "no JSON event names the action {hash}: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(finished["level"], "INFO");
    assert_eq!(finished["fields"]["outcome"], "success");
    assert!(finished["span"]["operation"].as_str().is_some_and(|o| o.starts_with("operations/")), "{finished}");
    assert_eq!(ran["fields"]["exit_code"], 0);
    assert!(ran["span"]["worker"].is_string(), "{ran}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_mount_and_sandbox_metrics_move_with_real_actions() {
    use casbuild_proto::reapi::{Directory, FileNode};
    use common::execute::{blob, shell_action_over};
    if !needs_root("store_mount_and_sandbox_metrics_move_with_real_actions", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--metrics-listen", "127.0.0.1:0"]);
    let _mount = common::Detach(dir.path().join("worker-1/cas"));
    let worker = common::start_worker(&server, dir.path(), 1, &["--metrics-listen", "127.0.0.1:0"]);

    // One action reads a 100,000-byte input through the mount; one reads a
    // file it did not declare.
    let data = bytes::Bytes::from(vec![7u8; 100_000]);
    let input = F.digest_of(&data);
    let root = Directory {
        files: vec![FileNode { name: "input".into(), digest: Some(input.to_proto()), ..Default::default() }],
        ..Default::default()
    };
    let (reads, mut blobs) = shell_action_over("wc -c < input > out", &root, false);
    blobs.push(blob(&root));
    blobs.push((input, data));
    upload(&server, blobs).await;
    let (undeclared, blobs) = shell_action("cat not-an-input > out");
    upload(&server, blobs).await;
    let mut execution = ExecutionClient::new(server.channel().await);
    let read = execute(&mut execution, execute_request(&reads, false)).await;
    assert_eq!(read.result.unwrap().exit_code, 0);
    let failed = execute(&mut execution, execute_request(&undeclared, false)).await;
    assert_ne!(failed.result.unwrap().exit_code, 0);

    let worker_metrics = get(&worker.metrics_addr(), "/metrics").1;
    let at = |name, labels: &[(&str, &str)]| sample(&worker_metrics, name, labels);
    let fetched = at("casbuild_mount_fetched_bytes_total", &[]);
    assert!((100_000.0..101_000.0).contains(&fetched), "the input and two small directories: {fetched}");
    assert_eq!(at("casbuild_mount_opens_total", &[("from", "cas")]), 1.0, "{worker_metrics}");
    assert!(at("casbuild_mount_operations_total", &[("op", "lookup")]) > 0.0);
    assert!(at("casbuild_mount_operations_total", &[("op", "open")]) >= 1.0);
    assert_eq!(at("casbuild_mount_fetch_errors_total", &[]), 0.0);
    assert_eq!(at("casbuild_sandbox_setup_seconds_count", &[]), 3.0, "the self-test and two actions");
    assert_eq!(at("casbuild_hermeticity_violations_total", &[]), 1.0);

    let coordinator_metrics = get(&server.metrics_addr(), "/metrics").1;
    let stored = sample(&coordinator_metrics, "casbuild_cas_written_bytes_total", &[("tier", "disk")]);
    assert!(stored >= 100_000.0, "{coordinator_metrics}");
    let read_back = sample(&coordinator_metrics, "casbuild_cas_read_bytes_total", &[]);
    assert!(read_back >= 100_000.0, "the worker fetched the input from the coordinator's tiers: {read_back}");
    assert!(sample(&coordinator_metrics, "casbuild_cas_stored_bytes", &[("tier", "disk")]) >= 100_000.0);
    let gauge = |name| sample(&coordinator_metrics, name, &[]);
    let slots = std::thread::available_parallelism().unwrap().get() as f64;
    assert_eq!((gauge("casbuild_worker_slots"), gauge("casbuild_worker_leases")), (slots, 0.0), "one idle worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_queue_is_reported_by_the_platform_that_can_serve_it() {
    if !needs_root("the_worker_queue_is_reported_by_the_platform_that_can_serve_it", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--metrics-listen", "127.0.0.1:0"]);
    let _mount = common::Detach(dir.path().join("worker-1/cas"));
    let _worker = common::start_worker(&server, dir.path(), 1, &["--slots", "1", "--platform", "pool=small"]);
    let addr = server.metrics_addr();
    let metric = |name, labels: &[(&str, &str)]| sample(&get(&addr, "/metrics").1, name, labels);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric("casbuild_workers_connected", &[]) != 1.0 {
        assert!(std::time::Instant::now() < deadline, "the worker never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Three actions for one slot: one runs, two wait.
    let mut calls = Vec::new();
    for i in 0..3 {
        let (action, blobs) = shell_action(&format!("sleep 1; echo {i} > out"));
        upload(&server, blobs).await;
        let mut execution = ExecutionClient::new(server.channel().await);
        calls.push(tokio::spawn(async move { execute(&mut execution, execute_request(&action, false)).await }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric("casbuild_worker_queue", &[("platform", "pool=small")]) != 2.0 {
        assert!(std::time::Instant::now() < deadline, "two actions never waited for the pool=small workers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric("casbuild_worker_leases", &[]), 1.0);
    for call in calls {
        assert_eq!(call.await.unwrap().result.unwrap().exit_code, 0);
    }
    assert_eq!(metric("casbuild_worker_queue", &[]), 0.0, "nothing waits any more");
    assert_eq!(metric("casbuild_worker_queue_wait_seconds_count", &[("platform", "pool=small")]), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_reports_what_its_store_holds_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Coordinator::start(&storage, &[]);
    let (_, blobs) = shell_action("echo held > out");
    let held: u64 = blobs.iter().map(|(digest, _)| digest.size_bytes).sum();
    // The empty input root is never stored (every store has the empty blob).
    let stored = blobs.iter().filter(|(digest, _)| digest.size_bytes > 0).count();
    upload(&server, blobs).await;
    server.stop();

    let server = Coordinator::start(&storage, &["--metrics-listen", "127.0.0.1:0"]);
    let text = get(&server.metrics_addr(), "/metrics").1;
    assert_eq!(sample(&text, "casbuild_cas_stored_bytes", &[("tier", "disk")]), held as f64, "{text}");
    assert_eq!(sample(&text, "casbuild_cas_blobs", &[("tier", "disk")]), stored as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_services_casbuild_has_descriptors_for() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    let mut client = ServerReflectionClient::new(server.channel().await);
    let ask = |request: MessageRequest| {
        futures::stream::iter([ServerReflectionRequest { host: String::new(), message_request: Some(request) }])
    };
    let mut answers = client.server_reflection_info(ask(MessageRequest::ListServices(String::new()))).await.unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.get_mut().message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "casbuild.cc.v1.ExistenceFilter",
            "casbuild.graph.v1.Graphs",
            "casbuild.worker.v1.Workers",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]
    );

    let symbol = MessageRequest::FileContainingSymbol("casbuild.worker.v1.Workers".into());
    let mut answers = client.server_reflection_info(ask(symbol)).await.unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.get_mut().message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor for the Workers service")
    };
    let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).into_owned();
    assert!(file.contains("worker.proto") && file.contains("Register"), "{file}");

    let unknown = MessageRequest::FileContainingSymbol("no.such.Service".into());
    let mut answers = client.server_reflection_info(ask(unknown)).await.unwrap();
    let refused = answers.get_mut().message().await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
}
