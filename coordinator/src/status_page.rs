//! The status page on the operations port (`--metrics-listen`): workers,
//! the queue, running and recent operations with their hermeticity reports,
//! action-cache and store usage; and a page per operation, action,
//! directory and blob, each addressed by name or digest so that a failing
//! action can be shared as a URL. Server-rendered HTML in which every value
//! from a client, a worker or an action is escaped; blobs are served as
//! `text/plain` with sniffing off, and no page runs scripts.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::storage::Storage;
use casbuild_proto::reapi::{Action, ActionResult, Command, Directory, ExecuteResponse};
use prost::Message;

use crate::scheduler::{outcome, OperationEntry, Scheduler, Stage};
use crate::workers::WorkerPool;

/// What the pages show.
#[derive(Clone)]
pub struct StatusPage {
    /// The CAS and action cache the pages read.
    pub storage: Arc<Storage>,
    /// The operations.
    pub scheduler: Arc<Scheduler>,
    /// The remote workers; `None` where the worker runs in-process (`up`).
    pub workers: Option<Arc<WorkerPool>>,
    /// The role serving the page, for its title.
    pub role: &'static str,
}

/// Finished operations on the overview.
const RECENT: usize = 50;
/// Queued operations listed on the overview.
const QUEUED: usize = 50;
/// Bytes of stdout or stderr shown inline on an operation's page.
const INLINE_LOG: u64 = 64 << 10;
/// Bytes of a blob its page serves.
const BLOB_VIEW: u64 = 1 << 20;
/// Largest Action, Command or Directory the pages decode.
const MAX_MESSAGE: u64 = 4 << 20;

/// The pages, for the operations port's router.
pub fn router(page: StatusPage) -> axum::Router {
    axum::Router::new()
        .route("/", get(overview))
        .route("/operations/{id}", get(operation))
        .route("/actions/{function}/{hash}/{size}", get(action))
        .route("/directories/{function}/{hash}/{size}", get(directory))
        .route("/blobs/{function}/{hash}/{size}", get(blob))
        .with_state(Arc::new(page))
}

/// The instance a digest page reads (`?instance=NAME`; empty by default).
#[derive(serde::Deserialize)]
struct At {
    #[serde(default)]
    instance: String,
}

type Page = State<Arc<StatusPage>>;

async fn overview(State(page): Page) -> Response {
    let mut body = String::new();
    let operations = page.scheduler.operations();
    let (mut queued, mut running, mut finished) = (Vec::new(), Vec::new(), Vec::new());
    for op in &operations {
        match &op.state.stage {
            Stage::Queued => queued.push(op),
            Stage::Executing { .. } => running.push(op),
            Stage::Completed(_) => finished.push(op),
        }
    }

    // Store and cache.
    let (hits, misses) = crate::action_cache::lookup_counts();
    let (ac_bytes, ac_entries) = page.storage.action_cache().usage().await.unwrap_or_default();
    let disk = page.storage.disk();
    let _ = write!(
        body,
        "<h2>Storage</h2><table><tr><th>CAS on disk</th><td>{} of {}</td></tr>\
         <tr><th>CAS in memory</th><td>{}</td></tr>\
         <tr><th>action cache</th><td>{ac_entries} results, {}</td></tr>\
         <tr><th>lookups since start</th><td>{hits} hits, {misses} misses{}</td></tr></table>",
        bytes(disk.bytes_used()),
        bytes(disk.budget()),
        bytes(page.storage.memory().bytes_used()),
        bytes(ac_bytes),
        match hits + misses {
            0 => String::new(),
            n => format!(" ({:.0}% hits)", 100.0 * hits as f64 / n as f64),
        },
    );

    // Workers.
    match &page.workers {
        Some(pool) => {
            let (workers, waiting) = pool.snapshot();
            let _ = write!(
                body,
                "<h2>Workers ({})</h2><p>{waiting} actions wait for a worker.</p><table>\
                 <tr><th>worker</th><th>slots</th><th>usable</th><th>running</th><th>platform</th>\
                 <th>last heartbeat</th></tr>",
                workers.len()
            );
            for w in &workers {
                let platform: Vec<String> = w.platform.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let actions: Vec<String> = w.running.iter().map(|(instance, d)| action_link(d, instance)).collect();
                let _ = write!(
                    body,
                    "<tr class=worker><td>{}{}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{} ago</td></tr>",
                    esc(&w.name),
                    if w.connected { "" } else { " (no lease stream)" },
                    w.slots,
                    w.usable,
                    w.running.len(),
                    actions.join(" "),
                    esc(&platform.join(", ")),
                    seconds(w.since_heartbeat)
                );
            }
            body.push_str("</table>");
        }
        None => body.push_str("<h2>Workers</h2><p>The worker runs inside this process (<code>casbuild up</code>).</p>"),
    }

    // Operations.
    let now = SystemTime::now();
    let since = |t: SystemTime| seconds(now.duration_since(t).unwrap_or_default());
    let _ = write!(
        body,
        "<h2>Queued ({})</h2><table><tr><th>operation</th><th>action</th><th>waiting</th></tr>",
        queued.len()
    );
    queued.sort_by_key(|op| op.state.queued);
    for op in queued.iter().take(QUEUED) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            operation_link(&op.name),
            action_link(&op.state.action, &op.instance),
            since(op.state.queued)
        );
    }
    let _ = write!(
        body,
        "</table><h2>Running ({})</h2><table><tr><th>operation</th><th>action</th><th>worker</th><th>running for</th></tr>",
        running.len()
    );
    for op in &running {
        if let Stage::Executing { worker, since: started } = &op.state.stage {
            let _ = write!(
                body,
                "<tr class=running><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                operation_link(&op.name),
                action_link(&op.state.action, &op.instance),
                esc(worker),
                since(*started)
            );
        }
    }
    let _ = write!(
        body,
        "</table><h2>Recent ({} kept)</h2><table><tr><th>operation</th><th>action</th><th>outcome</th>\
         <th>exit code</th><th>took</th><th>worker</th><th>report</th></tr>",
        finished.len()
    );
    finished.sort_by_key(|op| std::cmp::Reverse(finished_at(op)));
    for op in finished.iter().take(RECENT) {
        let Stage::Completed(response) = &op.state.stage else { continue };
        let result = response.result.as_ref();
        let metadata = result.and_then(|r| r.execution_metadata.as_ref());
        let _ = write!(
            body,
            "<tr class=\"finished {outcome}\"><td>{}</td><td>{}</td><td>{outcome}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            operation_link(&op.name),
            action_link(&op.state.action, &op.instance),
            result.map_or(String::new(), |r| r.exit_code.to_string()),
            metadata.and_then(|m| span(m.worker_start_timestamp.as_ref(), m.worker_completed_timestamp.as_ref())).unwrap_or_default(),
            esc(metadata.map_or("", |m| m.worker.as_str())),
            esc(&report(response)).replace('\n', "<br>"),
            outcome = outcome(response),
        );
    }
    body.push_str("</table>");
    html(StatusCode::OK, &format!("casbuild {}", page.role), &body, true)
}

async fn operation(State(page): Page, Path(id): Path<String>) -> Response {
    let name = format!("operations/{id}");
    let Some((instance, updates)) = page.scheduler.watch(&name) else {
        return failure(
            StatusCode::NOT_FOUND,
            &format!("no operation {name} (finished operations are kept for a while only)"),
        );
    };
    let op = OperationEntry { name, instance, state: updates.borrow().clone() };
    let mut body = format!(
        "<table><tr><th>operation</th><td>{}</td></tr><tr><th>instance</th><td>{}</td></tr>\
         <tr><th>action</th><td>{}</td></tr><tr><th>stage</th><td>{}</td></tr></table>",
        esc(&op.name),
        esc(&op.instance),
        action_link(&op.state.action, &op.instance),
        match &op.state.stage {
            Stage::Queued => "queued".to_owned(),
            Stage::Executing { worker, .. } => format!("running on {}", esc(worker)),
            Stage::Completed(response) => outcome(response).to_owned(),
        }
    );
    if let Stage::Completed(response) = &op.state.stage {
        let report = report(response);
        if !report.is_empty() {
            let _ = write!(body, "<h2>Report</h2><pre class=report>{}</pre>", esc(&report));
        }
        if let Some(result) = &response.result {
            body.push_str(&result_html(&page, &op.instance, result).await);
        }
    }
    html(StatusCode::OK, &op.name, &body, false)
}

async fn action(State(page): Page, DigestPath(digest): DigestPath, Query(q): Query<At>) -> Response {
    let action: Action = match message(&page, &q.instance, &digest).await {
        Ok(a) => a,
        Err((code, why)) => return failure(code, &format!("action {digest}: {why}")),
    };
    let mut body = String::from("<table>");
    let _ = write!(body, "<tr><th>instance</th><td>{}</td></tr>", esc(&q.instance));
    let row = |body: &mut String, name: &str, value: String| {
        let _ = write!(body, "<tr><th>{name}</th><td>{value}</td></tr>");
    };
    let proto_digest =
        |d: Option<&casbuild_proto::reapi::Digest>| d.and_then(|d| Digest::from_proto(digest.function, d).ok());
    let command_digest = proto_digest(action.command_digest.as_ref());
    let input_root = proto_digest(action.input_root_digest.as_ref());
    row(&mut body, "input root", input_root.map_or("none".into(), |d| link("directories", &d, &q.instance)));
    row(&mut body, "timeout", action.timeout.map_or("none".into(), |t| format!("{} s", t.seconds)));
    row(&mut body, "do not cache", action.do_not_cache.to_string());
    body.push_str("</table>");
    match command_digest {
        None => body.push_str("<p>The action names no valid command.</p>"),
        Some(d) => match message::<Command>(&page, &q.instance, &d).await {
            Err((_, why)) => {
                let _ = write!(body, "<p>Command {}: {}</p>", link("blobs", &d, &q.instance), esc(&why));
            }
            Ok(command) => {
                let _ = write!(
                    body,
                    "<h2>Command</h2><pre class=command>{}</pre><table>",
                    esc(&shell_words(&command.arguments))
                );
                let env: Vec<String> =
                    command.environment_variables.iter().map(|v| format!("{}={}", v.name, v.value)).collect();
                row(&mut body, "environment", esc(&env.join("\n")).replace('\n', "<br>"));
                row(&mut body, "working directory", esc(&command.working_directory));
                let (outputs, properties) = outputs_and_platform(&command, &action);
                row(&mut body, "outputs", esc(&outputs.join(" ")));
                row(&mut body, "platform", esc(&properties.join(", ")));
                body.push_str("</table>");
            }
        },
    }
    match page.storage.action_cache().get(&q.instance, &digest).await {
        Ok(Some(result)) => {
            body.push_str("<h2>Cached result</h2>");
            body.push_str(&result_html(&page, &q.instance, &result).await);
        }
        Ok(None) => body.push_str("<p>No result in the action cache.</p>"),
        Err(e) => {
            let _ = write!(body, "<p>The action cache: {}</p>", esc(&e.to_string()));
        }
    }
    html(StatusCode::OK, &format!("action {digest}"), &body, false)
}

async fn directory(State(page): Page, DigestPath(digest): DigestPath, Query(q): Query<At>) -> Response {
    let dir: Directory = match message(&page, &q.instance, &digest).await {
        Ok(d) => d,
        Err((code, why)) => return failure(code, &format!("directory {digest}: {why}")),
    };
    let entry = |d: Option<&casbuild_proto::reapi::Digest>, kind: &str| {
        d.and_then(|d| Digest::from_proto(digest.function, d).ok())
            .map_or("invalid digest".to_owned(), |d| link(kind, &d, &q.instance))
    };
    let mut body = String::from("<table><tr><th>name</th><th>kind</th><th>content</th></tr>");
    for d in &dir.directories {
        let _ = write!(
            body,
            "<tr><td>{}/</td><td>directory</td><td>{}</td></tr>",
            esc(&d.name),
            entry(d.digest.as_ref(), "directories")
        );
    }
    for f in &dir.files {
        let kind = if f.is_executable { "executable" } else { "file" };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{kind}</td><td>{}</td></tr>",
            esc(&f.name),
            entry(f.digest.as_ref(), "blobs")
        );
    }
    for l in &dir.symlinks {
        let _ = write!(body, "<tr><td>{}</td><td>symlink</td><td>→ {}</td></tr>", esc(&l.name), esc(&l.target));
    }
    body.push_str("</table>");
    html(StatusCode::OK, &format!("directory {digest}"), &body, false)
}

async fn blob(State(page): Page, DigestPath(digest): DigestPath, Query(q): Query<At>) -> Response {
    match read(&page, &q.instance, &digest, BLOB_VIEW).await {
        Ok(data) => {
            let mut response = data.into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            secure(headers);
            response
        }
        Err((code, why)) => failure(code, &format!("blob {digest}: {why}")),
    }
}

/// An ActionResult: exit code, timings, logs (inline, cut at
/// [`INLINE_LOG`]) and outputs, each linked by digest.
async fn result_html(page: &StatusPage, instance: &str, result: &ActionResult) -> String {
    let mut body = format!("<table><tr><th>exit code</th><td class=exit-code>{}</td></tr>", result.exit_code);
    if let Some(m) = &result.execution_metadata {
        let _ = write!(
            body,
            "<tr><th>worker</th><td>{}</td></tr><tr><th>queued → done</th><td>{}</td></tr>\
             <tr><th>inputs</th><td>{}</td></tr><tr><th>command</th><td>{}</td></tr><tr><th>outputs</th><td>{}</td></tr>",
            esc(&m.worker),
            span(m.queued_timestamp.as_ref(), m.worker_completed_timestamp.as_ref()).unwrap_or_default(),
            span(m.input_fetch_start_timestamp.as_ref(), m.input_fetch_completed_timestamp.as_ref()).unwrap_or_default(),
            span(m.execution_start_timestamp.as_ref(), m.execution_completed_timestamp.as_ref()).unwrap_or_default(),
            span(m.output_upload_start_timestamp.as_ref(), m.output_upload_completed_timestamp.as_ref()).unwrap_or_default(),
        );
    }
    body.push_str("</table>");
    let function = |d: &casbuild_proto::reapi::Digest| {
        // Results name their digests without a function: both are tried.
        [DigestFunction::Sha256, DigestFunction::Blake3].into_iter().find_map(|f| Digest::from_proto(f, d).ok())
    };
    for (name, raw, digest) in
        [("stdout", &result.stdout_raw, &result.stdout_digest), ("stderr", &result.stderr_raw, &result.stderr_digest)]
    {
        let text = match digest.as_ref().and_then(function) {
            Some(d) if raw.is_empty() => {
                let _ = write!(body, "<h3>{name} {}</h3>", link("blobs", &d, instance));
                read(page, instance, &d, INLINE_LOG)
                    .await
                    .map(|b| b.to_vec())
                    .unwrap_or_else(|(_, why)| why.into_bytes())
            }
            _ if !raw.is_empty() => {
                let _ = write!(body, "<h3>{name}</h3>");
                raw.to_vec()
            }
            _ => continue,
        };
        let _ = write!(body, "<pre class={name}>{}</pre>", esc(&String::from_utf8_lossy(&text)));
    }
    if !(result.output_files.is_empty() && result.output_directories.is_empty() && result.output_symlinks.is_empty()) {
        body.push_str("<h3>outputs</h3><table>");
        for f in &result.output_files {
            let content =
                f.digest.as_ref().and_then(function).map_or("invalid digest".into(), |d| link("blobs", &d, instance));
            let _ = write!(body, "<tr><td>{}</td><td>{content}</td></tr>", esc(&f.path));
        }
        for d in &result.output_directories {
            let _ = write!(
                body,
                "<tr><td>{}/</td><td>tree {}</td></tr>",
                esc(&d.path),
                d.tree_digest
                    .as_ref()
                    .and_then(function)
                    .map_or("invalid digest".into(), |d| link("blobs", &d, instance))
            );
        }
        for l in &result.output_symlinks {
            let _ = write!(body, "<tr><td>{}</td><td>→ {}</td></tr>", esc(&l.path), esc(&l.target));
        }
        body.push_str("</table>");
    }
    body
}

/// A command's outputs and its platform's properties, from the current
/// fields or the legacy ones (deprecated in REAPI 2.1, still what Bazel 4
/// sends).
#[allow(deprecated)]
fn outputs_and_platform(command: &Command, action: &Action) -> (Vec<String>, Vec<String>) {
    let mut outputs = command.output_paths.clone();
    outputs.extend(command.output_files.iter().chain(&command.output_directories).cloned());
    let platform = action.platform.as_ref().or(command.platform.as_ref());
    let properties = platform.map(|p| p.properties.iter().map(|p| format!("{}={}", p.name, p.value)).collect());
    (outputs, properties.unwrap_or_default())
}

/// The digest a page's URL ends in (`FUNCTION/HASH/SIZE`); a malformed one
/// is answered with a 400 page.
struct DigestPath(Digest);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for DigestPath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        let bad = |why: String| failure(StatusCode::BAD_REQUEST, &why);
        let Path((function, hash, size)) =
            Path::<(String, String, i64)>::from_request_parts(parts, state).await.map_err(|e| bad(e.body_text()))?;
        let function: DigestFunction =
            function.parse().map_err(|_| bad(format!("{function:?} is not a digest function")))?;
        Digest::from_hex(function, &hash, size).map(DigestPath).map_err(|e| bad(e.to_string()))
    }
}

/// The first `limit` bytes of a blob.
async fn read(
    page: &StatusPage,
    instance: &str,
    digest: &Digest,
    limit: u64,
) -> Result<bytes::Bytes, (StatusCode, String)> {
    // A page view must not create an instance (each takes one of the
    // store's bounded instance slots): only existing ones are read.
    if !page.storage.disk().namespace_known(instance).0 {
        return Err((StatusCode::NOT_FOUND, format!("no instance {instance:?} here")));
    }
    let stream = page.storage.cas(instance).read(digest, 0, Some(limit.min(digest.size_bytes))).await;
    let data = match stream {
        Ok(stream) => casbuild_cas::store::collect(stream, limit.min(digest.size_bytes)).await,
        Err(e) => Err(e),
    };
    data.map_err(|e| {
        let code = if e.is_not_found() { StatusCode::NOT_FOUND } else { StatusCode::INTERNAL_SERVER_ERROR };
        (code, e.to_string())
    })
}

/// A whole blob decoded as `M`.
async fn message<M: Message + Default>(
    page: &StatusPage,
    instance: &str,
    digest: &Digest,
) -> Result<M, (StatusCode, String)> {
    if digest.size_bytes > MAX_MESSAGE {
        return Err((StatusCode::BAD_REQUEST, format!("{} bytes is more than this page decodes", digest.size_bytes)));
    }
    let data = read(page, instance, digest, digest.size_bytes).await?;
    M::decode(data).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, format!("not a valid message: {e}")))
}

/// When a finished operation finished, as far as its result says.
fn finished_at(op: &OperationEntry) -> SystemTime {
    let Stage::Completed(response) = &op.state.stage else { return op.state.queued };
    response
        .result
        .as_ref()
        .and_then(|r| r.execution_metadata.as_ref())
        .and_then(|m| m.worker_completed_timestamp.as_ref())
        .and_then(casbuild_proto::system_time)
        .unwrap_or(op.state.queued)
}

/// The time between two timestamps, as text.
fn span(
    from: Option<&casbuild_proto::protobuf::Timestamp>,
    to: Option<&casbuild_proto::protobuf::Timestamp>,
) -> Option<String> {
    let (from, to) = (casbuild_proto::system_time(from?)?, casbuild_proto::system_time(to?)?);
    Some(seconds(to.duration_since(from).ok()?))
}

fn seconds(d: Duration) -> String {
    match d.as_secs_f64() {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 120.0 => format!("{s:.1} s"),
        s => format!("{:.0} min", s / 60.0),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.1} GiB", n as f64 / (1 << 30) as f64),
    }
}

/// What casbuild says about an operation: the hermeticity report of a
/// failed command, or the error that kept it from running.
fn report(response: &ExecuteResponse) -> String {
    let status = response.status.as_ref().filter(|s| s.code != 0).map(|s| s.message.as_str()).unwrap_or_default();
    [response.message.as_str(), status].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("\n")
}

/// Arguments as one line a shell would read back.
fn shell_words(args: &[String]) -> String {
    let word = |a: &String| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    args.iter().map(word).collect::<Vec<_>>().join(" ")
}

fn link(kind: &str, digest: &Digest, instance: &str) -> String {
    let query = if instance.is_empty() { String::new() } else { format!("?instance={}", percent(instance)) };
    format!(
        "<a href=\"/{kind}/{}/{}/{}{}\"><code>{}/{}</code></a>",
        digest.function.name(),
        digest.hash_hex(),
        digest.size_bytes,
        esc(&query),
        &digest.hash_hex()[..12],
        digest.size_bytes
    )
}

fn action_link(digest: &Digest, instance: &str) -> String {
    link("actions", digest, instance)
}

fn operation_link(name: &str) -> String {
    let id = name.strip_prefix("operations/").unwrap_or(name);
    format!("<a href=\"/operations/{}\"><code>{}</code></a>", percent(id), esc(id))
}

/// Escapes text for HTML element content and quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Headers every page carries: nothing it shows is run, framed or sniffed.
fn secure(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

fn failure(code: StatusCode, why: &str) -> Response {
    html(code, "casbuild", &format!("<p class=error>{}</p>", esc(why)), false)
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}\
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}\
pre{background:#f7f7f7;padding:.5em;white-space:pre-wrap;max-height:40em;overflow:auto}\
tr.failure td,tr.error td,tr.timeout td{background:#fde8e8}code{font-size:90%}";

fn html(code: StatusCode, title: &str, body: &str, refresh: bool) -> Response {
    let refresh = if refresh { "<meta http-equiv=refresh content=10>" } else { "" };
    let page = format!(
        "<!DOCTYPE html><html><head><meta charset=utf-8>{refresh}<title>{title}</title><style>{STYLE}</style></head>\
         <body><p><a href=\"/\">casbuild status</a> · <a href=\"/metrics\">metrics</a></p><h1>{title}</h1>{body}</body></html>",
        title = esc(title)
    );
    let mut response = (code, page).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_actions_cannot_become_markup() {
        assert_eq!(esc("<script>alert('x')</script>&\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;");
        assert_eq!(percent("a b/\"<"), "a%20b%2F%22%3C");
        assert_eq!(
            shell_words(&["sh".into(), "-c".into(), "echo 'hi' > out".into()]),
            "sh -c 'echo '\\''hi'\\'' > out'"
        );
        assert_eq!(operation_link("operations/<x>"), "<a href=\"/operations/%3Cx%3E\"><code>&lt;x&gt;</code></a>");
    }
}
