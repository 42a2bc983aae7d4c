//! With `--otlp-endpoint`, a client's trace continues through the
//! coordinator to the worker: a collector (a real OTLP/gRPC receiver on
//! loopback) receives the coordinator's `request` and `action` spans and the
//! worker's `lease` and `run` spans, all in the client's trace and each the
//! child of the one before. Needs root (the worker's sandbox and FUSE).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use casbuild_proto::reapi::execution_client::ExecutionClient;
use common::execute::{execute_request, operations, shell_action, upload};
use common::{casbuild, needs_root, Coordinator, Detach};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Every span received, with the service that sent it.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for batch in request.into_inner().resource_spans {
            let service = batch
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in batch.scope_spans {
                kept.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_trace_continues_through_the_coordinator_to_the_worker() {
    if !needs_root("a_clients_trace_continues_through_the_coordinator_to_the_worker", true) {
        return;
    }
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let receiver = tokio::spawn(server);

    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let coordinator = Coordinator::spawn_with(
        casbuild()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--storage", storage.to_str().unwrap()])
            .args(["--otlp-endpoint", &endpoint])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
        "casbuild coordinator listening on grpc://",
        &storage,
        false,
    );
    let base = dir.path().join("worker");
    let path = |sub: &str| base.join(sub).to_str().unwrap().to_owned();
    let _mount = Detach(base.join("cas"));
    let _worker = Coordinator::spawn_with(
        casbuild()
            .args(["worker", "--coordinator", &coordinator.url(), "--mount", &path("cas")])
            .args(["--cache-dir", &path("cache"), "--scratch", &path("scratch"), "--name", "w1"])
            .args(["--otlp-endpoint", &endpoint])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
        "casbuild worker ",
        &base,
        true,
    );

    let (action, blobs) = shell_action("echo traced > out");
    upload(&coordinator, blobs).await;
    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(execute_request(&action, false));
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let mut execution = ExecutionClient::new(coordinator.channel().await);
    let last = operations(execution.execute(request).await.unwrap().into_inner()).await.pop().unwrap();
    assert!(last.done);

    // The batches arrive within a few schedule delays; each span is looked
    // for in the client's trace.
    let find = |service: &str, name: &str| {
        let spans = collector.0.lock().unwrap();
        let mine = |s: &&(String, Span)| s.0 == service && s.1.name == name && hex(&s.1.trace_id) == trace_id;
        spans.iter().find(mine).map(|(_, span)| span.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let found = (
            find("casbuild-coordinator", "request"),
            find("casbuild-coordinator", "action"),
            find("casbuild-worker", "lease"),
            find("casbuild-worker", "run"),
        );
        if let (Some(a), Some(b), Some(c), Some(d)) = found {
            break [a, b, c, d];
        }
        assert!(Instant::now() < deadline, "spans received: {:?}", collector.0.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let [request, action_span, lease, run] = spans;
    assert_eq!(hex(&request.parent_span_id), client_span, "the Execute call's span continues the client's");
    assert_eq!(action_span.parent_span_id, request.span_id, "the action is the call's child");
    assert_eq!(lease.parent_span_id, action_span.span_id, "the worker's lease is the action's child");
    assert_eq!(run.parent_span_id, lease.span_id, "the run is the lease's child");
    receiver.abort();
}
