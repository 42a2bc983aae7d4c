//! What the server reports to Prometheus about its gRPC calls (and the
//! span each call runs in), and its health.
//!
//! Metrics are recorded through the `metrics` facade; the binary installs
//! the Prometheus recorder and serves it (without a recorder every call here
//! is a no-op). Label values are bounded: the method label is the request's
//! path only for calls the server knows (an unknown path is answered
//! UNIMPLEMENTED and counted as `unknown`), so a client cannot grow the
//! metric set by inventing paths.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use casbuild_cas::storage::Storage;
use futures::future::BoxFuture;
use tonic::Code;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::Instrument;

/// Counts every gRPC call by method and status code, and times it to its
/// response headers (for a streaming call: to the start of its stream).
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let start = Instant::now();
        // One span per call, continuing the client's trace (W3C traceparent).
        let span = tracing::info_span!("request", method = %method);
        if let Some(parent) = request.headers().get(casbuild_proto::trace::TRACEPARENT) {
            casbuild_proto::trace::continue_trace(&span, parent.to_str().unwrap_or_default());
        }
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let response = response.await;
                let code = match &response {
                    // Errors travel in the headers (a trailers-only response);
                    // a call that succeeds sends its status in the trailers.
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(Code::Ok, Code::from_i32),
                    Err(_) => Code::Unknown,
                };
                record_call(method, code, start.elapsed());
                response
            }
            .instrument(span),
        )
    }
}

fn record_call(method: String, code: Code, took: Duration) {
    let method = if code == Code::Unimplemented { "unknown".to_owned() } else { method };
    let code = format!("{code:?}");
    metrics::counter!("casbuild_grpc_requests_total", "method" => method.clone(), "code" => code).increment(1);
    metrics::histogram!("casbuild_grpc_request_duration_seconds", "method" => method).record(took.as_secs_f64());
}

/// Whether the server can do its work: its storage takes writes.
#[derive(Clone)]
pub struct Health {
    storage: Arc<Storage>,
    reporter: HealthReporter,
}

impl Health {
    /// Health of a server on `storage`, reported through `reporter` (the
    /// gRPC health service) for the whole server (service name "").
    pub fn new(storage: Arc<Storage>, reporter: HealthReporter) -> Self {
        Health { storage, reporter }
    }

    /// Probes the storage now; `Err` says what fails.
    pub async fn check(&self) -> Result<(), String> {
        probe_storage(self.storage.clone()).await
    }

    /// Probes the storage every `period` and reports SERVING or NOT_SERVING
    /// to the health service, until the returned handle is dropped.
    pub fn watch(self, period: Duration) -> Watching {
        Watching(tokio::spawn(async move {
            let mut last = None;
            loop {
                let healthy = match self.check().await {
                    Ok(()) => true,
                    Err(why) => {
                        if last != Some(false) {
                            tracing::warn!("not serving: {why}");
                        }
                        false
                    }
                };
                metrics::gauge!("casbuild_healthy").set(if healthy { 1.0 } else { 0.0 });
                if last != Some(healthy) {
                    let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
                    self.reporter.set_service_status("", status).await;
                    last = Some(healthy);
                }
                tokio::time::sleep(period).await;
            }
        }))
    }
}

/// Whether `storage` takes writes now (off the async threads); `Err` says
/// what fails. What the health service and `/readyz` both ask.
pub async fn probe_storage(storage: Arc<Storage>) -> Result<(), String> {
    let disk = storage.clone();
    match tokio::task::spawn_blocking(move || disk.probe_writable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("the storage does not take writes: {e}")),
        Err(e) => return Err(format!("probing the storage: {e}")),
    }
    storage.probe_bucket().await.map_err(|e| format!("the object store does not take writes: {e}"))
}

/// A running [`Health::watch`]; stops it when dropped.
pub struct Watching(tokio::task::JoinHandle<()>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.abort();
    }
}
