//! The coordinator's status page, read by a real headless Chromium: it
//! lists a running worker and a failed action with its hermeticity report,
//! and the action's page (linked by digest) shows its command. And
//! `Operations.ListOperations` pages through a thousand operations.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use casbuild_proto::longrunning::operations_client::OperationsClient;
use casbuild_proto::longrunning::ListOperationsRequest;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use common::execute::{execute, execute_request, operations, shell_action, upload, F};
use common::http::get;
use common::{needs_root, privileged, start_worker, Coordinator, Detach};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_operations_pages_through_a_thousand_operations() {
    let dir = tempfile::tempdir().unwrap();
    // Listing is for admins (names let a caller cancel): here every caller is one.
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "[auth]\nanonymous = [\"admin\"]\n").unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--config", config.to_str().unwrap()]);
    // Actions whose blobs were never uploaded: each Execute is an operation
    // that finishes at once (FAILED_PRECONDITION) and is kept.
    let mut execution = ExecutionClient::new(server.channel().await);
    let mut names = BTreeSet::new();
    for i in 0..1000u32 {
        let action = F.digest_of(format!("action {i}").as_bytes());
        let stream = execution.execute(execute_request(&action, false)).await.unwrap().into_inner();
        let last = operations(stream).await.pop().unwrap();
        assert!(last.done);
        names.insert(last.name);
    }
    assert_eq!(names.len(), 1000);

    let mut client = OperationsClient::new(server.channel().await);
    let page =
        |size: i32, token: String| ListOperationsRequest { page_size: size, page_token: token, ..Default::default() };
    let (mut listed, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let response = client.list_operations(page(300, token)).await.unwrap().into_inner();
        pages += 1;
        assert!(response.operations.len() <= 300);
        assert!(response.operations.iter().all(|op| op.done && op.metadata.is_some()));
        listed.extend(response.operations.into_iter().map(|op| op.name));
        token = response.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 4, "300 + 300 + 300 + 100");
    assert_eq!(listed.len(), 1000, "each operation once");
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), names);
    // Without a size, a page of 100; nonsense is refused.
    let first = client.list_operations(page(0, String::new())).await.unwrap().into_inner();
    assert_eq!((first.operations.len(), first.next_page_token.is_empty()), (100, false));
    let bad_token = client.list_operations(page(10, "elsewhere".into())).await.unwrap_err();
    assert_eq!(bad_token.code(), tonic::Code::InvalidArgument);
    let filter = ListOperationsRequest { filter: "done=true".into(), ..Default::default() };
    assert_eq!(client.list_operations(filter).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let other = ListOperationsRequest { name: "another-instance".into(), ..Default::default() };
    assert!(client.list_operations(other).await.unwrap().into_inner().operations.is_empty());
}

/// Debian's Chromium, if installed.
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

/// `url` as the DOM a headless Chromium built from it; with `screenshot`,
/// also a PNG of the page.
fn browse(browser: &Path, profile: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let mut command = Command::new(browser);
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--window-size=1400,1000")
        .arg("--virtual-time-budget=3000")
        .arg("--timeout=20000");
    match screenshot {
        Some(png) => command.arg(format!("--screenshot={}", png.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command.arg(url).output().expect("running chromium");
    assert!(output.status.success(), "chromium: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_worker_and_a_failed_actions_report_in_a_browser() {
    let test = "the_status_page_shows_a_worker_and_a_failed_actions_report_in_a_browser";
    if !needs_root(test, true) {
        return;
    }
    // CI installs chromium (scripts/setup-debian.sh); there it must run.
    if !privileged(test, || chromium().map(drop).ok_or_else(|| "chromium is not installed".to_owned())) {
        return;
    }
    let browser = chromium().expect("found above");
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &["--metrics-listen", "127.0.0.1:0"]);
    let _mount = Detach(dir.path().join("worker-1/cas"));
    let _worker = start_worker(&server, dir.path(), 1, &[]);
    let (status, _) = get(&server.metrics_addr(), "/");
    assert_eq!(status, 200);

    // An action that reads a file it did not declare, and one that works.
    let (failing, blobs) = shell_action("cat secret-input > out");
    upload(&server, blobs).await;
    let (works, blobs) = shell_action("echo fine > out");
    upload(&server, blobs).await;
    let mut execution = ExecutionClient::new(server.channel().await);
    let failed = execute(&mut execution, execute_request(&failing, false)).await;
    assert_ne!(failed.result.as_ref().unwrap().exit_code, 0);
    execute(&mut execution, execute_request(&works, false)).await;

    let base = format!("http://{}", server.metrics_addr());
    let profile = dir.path().join("chromium-profile");
    let page = browse(&browser, &profile, &format!("{base}/"), None);
    assert!(page.contains("<td>w1</td>"), "the worker is listed: {page}");
    assert!(page.contains("undeclared input: secret-input"), "the failed action's report: {page}");
    assert!(!page.contains("undeclared input: out "), "a declared output is not an undeclared input: {page}");
    assert!(page.contains(&failing.hash_hex()[..12]) && page.contains(&works.hash_hex()[..12]));
    assert!(page.contains("class=\"finished failure\"") && page.contains("class=\"finished success\""), "{page}");

    // The failed operation's page, linked from its row: its report and result.
    let row = page.split("class=\"finished failure\"").nth(1).expect("the failed row");
    let link = row.split("href=\"").nth(1).and_then(|r| r.split('"').next()).expect("the operation's link");
    assert!(link.starts_with("/operations/"), "{link}");
    let (status, operation) = get(&server.metrics_addr(), link);
    assert_eq!(status, 200, "{operation}");
    assert!(operation.contains("undeclared input: secret-input") && operation.contains("exit code"), "{operation}");
    assert_eq!(get(&server.metrics_addr(), "/operations/no-such-one").0, 404);

    // The failed action's own page, by digest: its command and its cached
    // absence (failures are not cached).
    let action_url = format!("{base}/actions/sha256/{}/{}", failing.hash_hex(), failing.size_bytes);
    let action = browse(&browser, &profile, &action_url, None);
    assert!(action.contains("sh -c 'cat secret-input &gt; out'"), "{action}");
    assert!(action.contains("No result in the action cache"), "{action}");

    // A blob by digest, as text: the failed command's stderr with the report.
    let stderr = failed.result.as_ref().unwrap().stderr_digest.clone().unwrap();
    let (status, text) = get(&server.metrics_addr(), &format!("/blobs/sha256/{}/{}", stderr.hash, stderr.size_bytes));
    assert_eq!(status, 200);
    assert!(text.contains("undeclared input: secret-input"), "{text}");
    // A page view does not create instances (each takes a bounded slot).
    let path = format!("/blobs/sha256/{}/{}?instance=made-up", stderr.hash, stderr.size_bytes);
    let (status, text) = get(&server.metrics_addr(), &path);
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("no instance"), "{text}");
    let (status, text) = get(&server.metrics_addr(), "/actions/md5/abc/3");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not a digest function"), "{text}");
    let (status, _) = get(&server.metrics_addr(), &format!("/blobs/sha256/{}/-1", stderr.hash));
    assert_eq!(status, 400, "a negative size");

    // Kept for people: target/test-artifacts/status-page.png.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    browse(&browser, &profile, &format!("{base}/"), Some(&png));
    let header = std::fs::read(&png).expect("a screenshot");
    assert!(header.starts_with(b"\x89PNG") && header.len() > 10_000, "a real screenshot");
}
