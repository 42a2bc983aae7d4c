//! A coordinator on a network: gRPC over TLS, API keys and client
//! certificates mapped to roles, a table reloaded on SIGHUP, and refusals to
//! listen beyond loopback unauthenticated. Certificates are made by the test
//! (openssl), every call goes over real TLS on loopback, and Bazel 4.2.3
//! builds remotely over TLS with an API key and is refused without one.

mod common;
#[path = "../src/cmd/bench/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::store::{connect_channel, ConnectOptions, RemoteChannel};
use casbuild_proto::reapi::action_cache_client::ActionCacheClient;
use casbuild_proto::reapi::capabilities_client::CapabilitiesClient;
use casbuild_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{
    batch_update_blobs_request, ActionResult, BatchUpdateBlobsRequest, FindMissingBlobsRequest, GetCapabilitiesRequest,
    OutputFile, UpdateActionResultRequest,
};
use common::{casbuild, Coordinator};
use pki::Pki;
use tonic::Code;

/// An API key and its `[[auth.keys]]` entry.
fn key_entry(name: &str, roles: &[&str], instances: Option<&[&str]>) -> (String, String) {
    let out = casbuild()
        .args(["auth", "new-key", "--name", name])
        .args(roles.iter().flat_map(|r| ["--role", r]))
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let mut entry: String =
        stderr.lines().skip_while(|l| !l.starts_with("[[auth.keys]]")).map(|l| format!("{l}\n")).collect();
    if let Some(instances) = instances {
        let list: Vec<String> = instances.iter().map(|i| format!("{i:?}")).collect();
        entry.push_str(&format!("instances = [{}]\n", list.join(", ")));
    }
    (key, entry)
}

struct Cluster {
    _dir: tempfile::TempDir,
    pki: Pki,
    config: PathBuf,
    server: Coordinator,
    keys: std::collections::HashMap<&'static str, String>,
    tls: bool,
}

/// The worker token every test cluster also accepts.
const WORKER_TOKEN: &str = "the-worker-token-of-this-test";

impl Cluster {
    /// A TLS coordinator whose [auth] grants: reader (cache-read), writer
    /// (cache-write), runner (execute), team (execute on "team-a" only),
    /// admin, and the worker role to the client certificate "worker" and to
    /// the worker token [`WORKER_TOKEN`]. Without `tls`, plain gRPC.
    fn start(tls: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki")).unwrap();
        let worker_fingerprint = pki.client("worker").unwrap();
        pki.client("stranger").unwrap();
        let mut config = String::from("[auth]\nanonymous = []\n");
        let mut keys = std::collections::HashMap::new();
        for (name, roles, instances) in [
            ("reader", &["cache-read"][..], None),
            ("writer", &["cache-write"][..], None),
            ("runner", &["execute"][..], None),
            ("team", &["execute"][..], Some(&["team-a"][..])),
            ("admin", &["admin"][..], None),
        ] {
            let (key, entry) = key_entry(name, roles, instances);
            config.push_str(&entry);
            keys.insert(name, key);
        }
        config.push_str(&format!(
            "[[auth.certs]]\nname = \"worker-cert\"\nsha256 = \"{worker_fingerprint}\"\nroles = [\"worker\"]\n"
        ));
        let config_path = dir.path().join("coordinator.toml");
        std::fs::write(&config_path, &config).unwrap();
        let storage = dir.path().join("storage");
        let (server_pem, server_key, ca) = (pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
        let mut args = vec!["coordinator", "--listen", "127.0.0.1:0", "--storage", storage.to_str().unwrap()];
        args.extend(["--config", config_path.to_str().unwrap(), "--worker-token", WORKER_TOKEN]);
        if tls {
            args.extend(["--tls-cert", &server_pem, "--tls-key", &server_key, "--tls-client-ca", &ca]);
        }
        let ready = if tls {
            "casbuild coordinator listening on grpcs://"
        } else {
            "casbuild coordinator listening on grpc://"
        };
        let server = Coordinator::spawn(&args, ready, &storage, false);
        Cluster { _dir: dir, pki, config: config_path, server, keys, tls }
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "grpcs" } else { "grpc" };
        format!("{scheme}://{}", self.server.addr)
    }

    fn options(&self, key: Option<&str>, cert: Option<&str>) -> ConnectOptions {
        ConnectOptions {
            ca_pem: self.tls.then(|| std::fs::read(self.pki.path("ca.pem")).unwrap()),
            identity: cert.map(|c| {
                (
                    std::fs::read(self.pki.path(&format!("{c}.pem"))).unwrap(),
                    std::fs::read(self.pki.path(&format!("{c}.key"))).unwrap(),
                )
            }),
            api_key: key.map(|k| self.keys.get(k).cloned().unwrap_or_else(|| k.to_owned())),
        }
    }

    async fn channel(&self, key: Option<&str>) -> RemoteChannel {
        connect_channel(&self.url(), Duration::from_secs(10), &self.options(key, None)).await.unwrap()
    }

    /// `casbuild worker` flags for worker `wN` under `dir/worker-N`, trusting
    /// the test CA and presenting client certificate `cert`, if any.
    fn worker_args(&self, dir: &Path, n: u32, cert: Option<&str>) -> Vec<String> {
        let base = dir.join(format!("worker-{n}"));
        let path = |sub: &str| base.join(sub).to_str().unwrap().to_owned();
        let mut args = vec!["worker".to_owned(), "--coordinator".into(), self.url(), "--name".into(), format!("w{n}")];
        for (flag, sub) in [("--mount", "cas"), ("--cache-dir", "cache"), ("--scratch", "scratch")] {
            args.extend([flag.to_owned(), path(sub)]);
        }
        args.extend(["--tls-ca".into(), self.pki.path("ca.pem")]);
        if let Some(cert) = cert {
            args.extend(["--tls-cert".into(), self.pki.path(&format!("{cert}.pem"))]);
            args.extend(["--tls-key".into(), self.pki.path(&format!("{cert}.key"))]);
        }
        args
    }
}

fn blob(data: &[u8]) -> (Digest, batch_update_blobs_request::Request) {
    let digest = DigestFunction::Sha256.digest_of(data);
    (
        digest,
        batch_update_blobs_request::Request { digest: Some(digest.to_proto()), data: data.to_vec(), compressor: 0 },
    )
}

async fn upload(channel: RemoteChannel, instance: &str, data: &[u8]) -> Result<Digest, tonic::Status> {
    let (digest, request) = blob(data);
    let batch =
        BatchUpdateBlobsRequest { instance_name: instance.into(), requests: vec![request], ..Default::default() };
    let response = ContentAddressableStorageClient::new(channel).batch_update_blobs(batch).await?.into_inner();
    assert_eq!(response.responses[0].status.as_ref().map_or(0, |s| s.code), 0);
    Ok(digest)
}

/// Uploads a shell action (and its Command) through `channel`; its digest.
async fn upload_action(channel: &RemoteChannel, script: &str) -> Digest {
    let (action, blobs) = common::execute::shell_action(script);
    let requests = blobs.into_iter().map(|(d, data)| batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: data.to_vec(),
        compressor: 0,
    });
    let batch = BatchUpdateBlobsRequest { requests: requests.collect(), ..Default::default() };
    ContentAddressableStorageClient::new(channel.clone()).batch_update_blobs(batch).await.unwrap();
    action
}

async fn capabilities(channel: RemoteChannel) -> Result<bool, tonic::Status> {
    let caps = CapabilitiesClient::new(channel).get_capabilities(GetCapabilitiesRequest::default()).await?.into_inner();
    Ok(caps.cache_capabilities.unwrap().action_cache_update_capabilities.unwrap().update_enabled)
}

async fn update_result(channel: RemoteChannel, output: &Digest) -> Result<(), tonic::Status> {
    let action = DigestFunction::Sha256.digest_of(b"an action someone wants to poison");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out.txt".into(),
            digest: Some(output.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let request = UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    };
    ActionCacheClient::new(channel).update_action_result(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_roles_decide_every_call_over_tls() {
    let cluster = Cluster::start(true);

    // Plaintext to the TLS port gets nowhere, and the server keeps serving.
    let plain = format!("grpc://{}", cluster.server.addr);
    if let Ok(channel) = connect_channel(&plain, Duration::from_secs(5), &ConnectOptions::default()).await {
        assert!(capabilities(channel).await.is_err(), "a plaintext call on the TLS port must fail");
    }
    // A client that trusts another CA refuses the server.
    let other = Pki::new(&cluster.pki.dir().join("other")).unwrap();
    let distrust = ConnectOptions { ca_pem: Some(std::fs::read(other.path("ca.pem")).unwrap()), ..Default::default() };
    let refused = match connect_channel(&cluster.url(), Duration::from_secs(5), &distrust).await {
        Ok(channel) => capabilities(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a server certificate from an unknown CA must be refused");

    // No credential, or an unknown key: UNAUTHENTICATED, saying what to send.
    let err = capabilities(cluster.channel(None).await).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("API key"), "{}", err.message());
    let err = capabilities(cluster.channel(Some("cbk_made_up")).await).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // A client certificate nobody configured is anonymous, too.
    let stranger = connect_channel(&cluster.url(), Duration::from_secs(5), &cluster.options(None, Some("stranger")))
        .await
        .unwrap();
    assert_eq!(capabilities(stranger).await.unwrap_err().code(), Code::Unauthenticated);

    // A read-only key reads, is told it may not write results, and cannot.
    assert!(!capabilities(cluster.channel(Some("reader")).await).await.unwrap());
    let missing = FindMissingBlobsRequest { blob_digests: vec![blob(b"x").0.to_proto()], ..Default::default() };
    ContentAddressableStorageClient::new(cluster.channel(Some("reader")).await)
        .find_missing_blobs(missing)
        .await
        .unwrap();
    let err = upload(cluster.channel(Some("reader")).await, "", b"output").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("\"reader\""), "{}", err.message());

    // The executing role uploads inputs but may not write results itself.
    let output = upload(cluster.channel(Some("runner")).await, "", b"output").await.unwrap();
    let err = update_result(cluster.channel(Some("runner")).await, &output).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("cache-write"), "{}", err.message());
    let err = update_result(cluster.channel(Some("reader")).await, &output).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // cache-write may, and capabilities say so.
    assert!(capabilities(cluster.channel(Some("writer")).await).await.unwrap());
    update_result(cluster.channel(Some("writer")).await, &output).await.unwrap();

    // Roles hold on their instances only.
    upload(cluster.channel(Some("team")).await, "team-a", b"team input").await.unwrap();
    let err = upload(cluster.channel(Some("team")).await, "team-b", b"team input").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("team-b"), "{}", err.message());

    // Execute needs the execute role (checked before anything runs).
    let (action, _) = common::execute::shell_action("true");
    let err = ExecutionClient::new(cluster.channel(Some("reader")).await)
        .execute(common::execute::execute_request(&action, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The CLI takes the same credentials.
    let cli = |holder: &str| {
        // Content of its own, so the client finds it missing and uploads.
        let src = cluster.pki.dir().join(format!("upload-{holder}.txt"));
        std::fs::write(&src, format!("uploaded by {holder}\n")).unwrap();
        let key = &cluster.keys[holder];
        casbuild()
            .args(["cas", "upload", "--digest-function", "sha256", "--remote", &cluster.url(), "--tls-ca"])
            .arg(cluster.pki.path("ca.pem"))
            .env("CASBUILD_API_KEY", key)
            .arg(&src)
            .output()
            .unwrap()
    };
    let out = cli("runner");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli("reader");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not upload blobs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_table_reloads_on_sighup_and_a_broken_one_is_not_taken() {
    let cluster = Cluster::start(true);
    let (late_key, late_entry) = key_entry("late", &["cache-read"], None);
    let late = || async { capabilities(cluster.channel(Some(&late_key)).await).await };
    assert_eq!(late().await.unwrap_err().code(), Code::Unauthenticated);

    let original = std::fs::read_to_string(&cluster.config).unwrap();
    std::fs::write(&cluster.config, format!("{original}{late_entry}")).unwrap();
    let pid = nix::unistd::Pid::from_raw(cluster.server.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while late().await.is_err() {
        assert!(Instant::now() < deadline, "the new key was not accepted within 20 s of SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken table is reported and the one in use stays.
    std::fs::write(&cluster.config, format!("{original}{late_entry}[[auth.keys]]\nname = \"bad\"\n")).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(late().await.is_ok(), "a broken reload must keep the old table");
    assert!(capabilities(cluster.channel(Some("reader")).await).await.is_ok());
}

#[test]
fn beyond_loopback_an_unauthenticated_server_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let out = casbuild()
        .args(["coordinator", "--listen", "0.0.0.0:0", "--worker-token", "a-token-for-workers", "--storage"])
        .arg(&storage)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without an [auth] table") && stderr.contains("--insecure"), "{stderr}");

    let out = casbuild().args(["up", "--listen", "0.0.0.0:0", "--dir"]).arg(dir.path().join("up")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no authentication") && stderr.contains("--insecure"), "{stderr}");

    // With keys for everything, no anonymous writers and a worker token it starts.
    let (_, entry) = key_entry("ci", &["execute"], None);
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, format!("[auth]\nanonymous = [\"cache-read\"]\n{entry}")).unwrap();
    let args = [
        "coordinator",
        "--listen",
        "0.0.0.0:0",
        "--worker-token",
        "a-token-for-workers",
        "--config",
        config.to_str().unwrap(),
        "--storage",
        storage.to_str().unwrap(),
    ];
    let server = Coordinator::spawn(&args, "casbuild coordinator listening on grpc://", &storage, false);
    drop(server);
}

/// A worker identified by its client certificate, an Execute by the execute
/// key; a worker without credentials is refused.
#[test]
fn workers_prove_who_they_are_with_a_client_certificate() {
    if !common::needs_root("workers_prove_who_they_are_with_a_client_certificate", true) {
        return;
    }
    let cluster = Cluster::start(true);
    let dir = tempfile::tempdir().unwrap();
    let worker_args = |n: u32, cert: Option<&str>| cluster.worker_args(dir.path(), n, cert);

    // Without a certificate (or with one nobody configured): refused, saying why.
    for cert in [None, Some("stranger")] {
        let out = casbuild().args(worker_args(9, cert)).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refused this worker") && stderr.contains("serve as a worker"), "{stderr}");
    }

    let args = worker_args(1, Some("worker"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _worker = Coordinator::spawn(&args, "casbuild worker ", &dir.path().join("worker-1"), true);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let runner = cluster.channel(Some("runner")).await;
        let action = upload_action(&runner, "echo remote > out.txt").await;
        let stream =
            ExecutionClient::new(runner).execute(common::execute::execute_request(&action, true)).await.unwrap();
        let operations = common::execute::operations(stream.into_inner()).await;
        let response = common::execute::response_of(operations.last().unwrap());
        assert_eq!(response.result.unwrap().exit_code, 0, "{:?}", response.message);
    });
}

/// Bazel 4.2.3 builds remotely over `grpcs://` with an API key in
/// `--remote_header` and is refused without one; its worker is identified
/// by a client certificate.
#[test]
fn bazel_builds_remotely_over_tls_with_an_api_key_and_is_refused_without() {
    let test = "bazel_builds_remotely_over_tls_with_an_api_key_and_is_refused_without";
    if !common::needs_root(test, true) || !common::bazel::available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(tls_jvm) = common::bazel::tls_jvm_args(test, dir.path()) else {
        return;
    };
    let cluster = Cluster::start(true);
    let args = cluster.worker_args(dir.path(), 1, Some("worker"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _worker = Coordinator::spawn(&args, "casbuild worker ", &dir.path().join("worker-1"), true);
    let ws = dir.path().join("ws");
    common::bazel::package(
        &ws,
        "genrule(name = \"a\", outs = [\"a.txt\"], cmd = \"echo with a key > $@\")\n\
         genrule(name = \"b\", srcs = [\":a\"], outs = [\"b.txt\"], cmd = \"cat $< $< > $@\")\n",
    );
    let root = dir.path().join("bazel-root");
    let bazel = |key: Option<&str>| {
        let mut args = vec![tls_jvm.clone(), "build".to_owned(), format!("--remote_executor={}", cluster.url())];
        args.push(format!("--tls_certificate={}", cluster.pki.path("ca.pem")));
        args.push("--remote_timeout=60".into());
        if let Some(key) = key {
            args.push(format!("--remote_header=authorization=Bearer {}", cluster.keys[key]));
        }
        args.push("//pkg:b".into());
        common::bazel::run(&ws, &root, &args)
    };
    let (ok, refused) = bazel(None);
    assert!(!ok, "a build without a key must be refused:\n{refused}");
    assert!(refused.contains("UNAUTHENTICATED"), "{refused}");
    let (ok, built) = bazel(Some("runner"));
    assert!(ok, "{built}");
    assert!(common::bazel::processes(&built, " remote") >= 2, "{built}");
    assert_eq!(std::fs::read_to_string(ws.join("bazel-bin/pkg/b.txt")).unwrap(), "with a key\nwith a key\n");
}

/// Operations belong to the instance they run on: a key without execute
/// there learns nothing of them, and only an admin's cancel stops an action
/// others still wait for.
#[test]
fn only_an_admin_cancels_an_action_for_every_waiter() {
    use casbuild_proto::longrunning::operations_client::OperationsClient;
    use casbuild_proto::longrunning::{CancelOperationRequest, GetOperationRequest, ListOperationsRequest};
    if !common::needs_root("only_an_admin_cancels_an_action_for_every_waiter", true) {
        return;
    }
    let cluster = Cluster::start(false);
    let dir = tempfile::tempdir().unwrap();
    let _worker = common::start_worker(&cluster.server, dir.path(), 1, &["--worker-token", WORKER_TOKEN]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let runner = cluster.channel(Some("runner")).await;
        let action = upload_action(&runner, "sleep 30; echo never > out").await;
        let execute = || {
            let runner = runner.clone();
            async move {
                let request = common::execute::execute_request(&action, true);
                ExecutionClient::new(runner).execute(request).await.unwrap().into_inner()
            }
        };
        let mut a = execute().await;
        let b = execute().await;
        let a_name = a.message().await.unwrap().unwrap().name;

        // A key with execute on another instance only: no such operation.
        let mut team = OperationsClient::new(cluster.channel(Some("team")).await);
        let err = team.get_operation(GetOperationRequest { name: a_name.clone() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let err = team.cancel_operation(CancelOperationRequest { name: a_name.clone() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);

        // Listing hands out names, which let a caller cancel: admins only.
        let mut runner_ops = OperationsClient::new(runner.clone());
        let err = runner_ops.list_operations(ListOperationsRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let mut admin = OperationsClient::new(cluster.channel(Some("admin")).await);
        let listed = admin.list_operations(ListOperationsRequest::default()).await.unwrap().into_inner();
        assert!(listed.operations.iter().any(|op| op.name == a_name), "{listed:?}");

        // The admin cancels A's operation: the shared action stops for B too.
        admin.cancel_operation(CancelOperationRequest { name: a_name }).await.unwrap();
        let last = tokio::time::timeout(Duration::from_secs(20), common::execute::operations(b))
            .await
            .expect("B's operation ended after the admin's cancel")
            .pop()
            .unwrap();
        let status = common::execute::response_of(&last).status.unwrap_or_default();
        assert_eq!(status.code, Code::Cancelled as i32, "{status:?}");
    });
}
