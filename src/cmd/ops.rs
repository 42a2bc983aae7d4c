//! The operations endpoint of every long-running role (`--metrics-listen`):
//! Prometheus metrics at `/metrics`, liveness at `/healthz` (the process
//! answers) and readiness at `/readyz` (the role can do its work now; what
//! that means is the role's own check).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// A role's readiness check: `Err` says what is not ready.
pub type Readiness = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Histogram buckets of durations in seconds (100 µs to 10 min).
const SECONDS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];

/// Installs the process's Prometheus recorder (every `metrics` call from
/// here on is kept) and serves the endpoint on `listen`; returns the bound
/// address (port 0 picks one).
pub async fn serve(listen: SocketAddr, ready: Readiness, pages: Option<axum::Router>) -> anyhow::Result<SocketAddr> {
    let handle = install_recorder()?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--metrics-listen {listen}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let router = router(handle, ready);
        let router = match pages {
            Some(pages) => router.merge(pages),
            None => router,
        };
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(addr)
}

/// The process's Prometheus recorder, installed on first use (so that a
/// role can install it before it opens anything that records, and serve it
/// later); the handle renders it.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    static INSTALLED: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .context("configuring the metrics buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    describe();
    // Histograms keep their samples until drained; drain them even when
    // nobody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Readiness of a role that serves `storage`: it takes writes.
pub fn storage_ready(storage: Arc<casbuild_cas::storage::Storage>) -> Readiness {
    Arc::new(move || Box::pin(casbuild_coordinator::metrics::probe_storage(storage.clone())))
}

/// Serves the endpoint, with the role's own `pages` (the status page), when
/// `listen` is given and says where.
pub async fn serve_if(listen: Option<SocketAddr>, ready: Readiness, pages: Option<axum::Router>) -> anyhow::Result<()> {
    if let Some(listen) = listen {
        let addr = serve(listen, ready, pages).await?;
        println!("metrics on http://{addr}/metrics");
    }
    Ok(())
}

fn router(handle: PrometheusHandle, ready: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(move || {
                let check = ready();
                async move {
                    match check.await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                    }
                }
            }),
        )
}

/// Help texts for the metrics casbuild records.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("casbuild_grpc_requests_total", "gRPC calls served, by method and status code");
    describe_histogram!(
        "casbuild_grpc_request_duration_seconds",
        Unit::Seconds,
        "Time from a gRPC call's arrival to its response headers"
    );
    describe_counter!("casbuild_action_cache_lookups_total", "Action-cache lookups, by caller and hit or miss");
    describe_counter!(
        "casbuild_actions_finished_total",
        "Actions executed to the end, by outcome (success, failure, timeout, cancelled, error)"
    );
    describe_histogram!("casbuild_action_execution_seconds", Unit::Seconds, "Time an action spent with its executor");
    describe_histogram!("casbuild_queue_wait_seconds", Unit::Seconds, "Time an action waited for an execution slot");
    describe_gauge!("casbuild_actions_queued", "Actions waiting for an execution slot");
    describe_gauge!("casbuild_workers_connected", "Remote workers registered with this coordinator");
    describe_gauge!("casbuild_worker_slots", "Slots the registered workers offer together");
    describe_gauge!("casbuild_worker_leases", "Actions the workers hold leases for (running or starting)");
    describe_gauge!(
        "casbuild_worker_queue",
        "Actions waiting for a worker, by the platform of the workers that could run them (none: no worker can)"
    );
    describe_histogram!(
        "casbuild_worker_queue_wait_seconds",
        Unit::Seconds,
        "Time from queueing to a lease, by the platform of the worker that took it"
    );
    describe_gauge!("casbuild_healthy", "1 while the storage takes writes (the gRPC health service says SERVING)");
    // Storage tiers (the coordinator's store, a worker's cache).
    describe_counter!("casbuild_cas_read_bytes_total", Unit::Bytes, "Bytes served from a storage tier, by tier");
    describe_counter!("casbuild_cas_written_bytes_total", Unit::Bytes, "Bytes of new blobs stored, by tier");
    describe_counter!("casbuild_cas_evictions_total", "Blobs evicted to stay within the budget, by tier");
    describe_counter!("casbuild_cas_evicted_bytes_total", Unit::Bytes, "Bytes evicted, by tier");
    describe_gauge!("casbuild_cas_blobs", "Blobs a tier holds");
    describe_gauge!("casbuild_cas_stored_bytes", Unit::Bytes, "Bytes a tier holds");
    describe_gauge!("casbuild_cas_budget_bytes", Unit::Bytes, "A tier's byte budget");
    // The /cas mount (worker, up).
    describe_counter!("casbuild_mount_operations_total", "FUSE requests the mount answered, by operation");
    describe_counter!("casbuild_mount_opens_total", "File opens by where the blob was: memory, disk (cache) or cas");
    describe_histogram!(
        "casbuild_mount_fetch_seconds",
        Unit::Seconds,
        "Time an open or directory read waited for the CAS"
    );
    describe_counter!("casbuild_mount_fetched_bytes_total", Unit::Bytes, "Bytes the mount read from the CAS");
    describe_counter!("casbuild_mount_fetch_errors_total", "Opens and directory reads whose fetch failed");
    // The sandbox (worker, up).
    describe_histogram!(
        "casbuild_sandbox_setup_seconds",
        Unit::Seconds,
        "Sandbox set-up (namespaces, cgroups, mounts) before a command starts"
    );
    describe_counter!(
        "casbuild_hermeticity_violations_total",
        "Failed actions that looked up paths they did not declare"
    );
    // The existence filter (coordinator) and `casbuild cc`'s daemon.
    describe_counter!("casbuild_existence_filter_requests_total", "Existence filters served, full or incremental");
    describe_gauge!("casbuild_existence_filter_bytes", Unit::Bytes, "Size of the last existence filter served");
    describe_gauge!(
        "casbuild_existence_filter_false_positive_estimate",
        "Chance the last filter served calls an absent action present"
    );
    describe_counter!("casbuild_cc_compile_requests_total", "Compiles the wrapper sent to the daemon");
    describe_counter!("casbuild_cc_l1_hits_total", "Compiles answered from the daemon's memory");
    describe_counter!("casbuild_cc_remote_hits_total", "Compiles answered from the cluster's action cache");
    describe_counter!("casbuild_cc_executed_remotely_total", "Compiles run on the cluster");
    describe_counter!("casbuild_cc_remote_compile_errors_total", "Compiles the cluster ran that failed");
    describe_counter!(
        "casbuild_cc_filter_skipped_lookups_total",
        "Cache lookups the existence filter made unnecessary"
    );
    describe_counter!("casbuild_cc_uploaded_bytes_total", Unit::Bytes, "Bytes of inputs uploaded");
    describe_counter!("casbuild_cc_local_fallbacks_total", "Compiles run locally instead, by reason");
    describe_counter!("casbuild_cc_not_sent_total", "Invocations the wrapper ran locally without asking, by reason");
}
