//! Logs and traces. Log lines go to stderr as text or JSON, filtered by
//! `CASBUILD_LOG`, else `RUST_LOG`, else the role's default; with
//! `--otlp-endpoint` the same spans (and their events) are also exported
//! over OTLP/gRPC, batched, to a collector (Jaeger, Tempo, the
//! OpenTelemetry Collector).

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::LogFormat;

/// What must be flushed before the process exits.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("casbuild: exporting the last traces: {e}");
            }
        }
    }
}

/// Installs the subscriber: logs in `format` at `default` unless the
/// environment says otherwise, and traces to `otlp` when given, as the
/// service `casbuild-ROLE`. Call within the async runtime.
pub fn init(format: LogFormat, default: &str, otlp: Option<&str>, role: Option<&str>) -> anyhow::Result<Telemetry> {
    let from_env = ["CASBUILD_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()).map(|v| (var, v)));
    let filter = match from_env {
        None => EnvFilter::new(default),
        Some((var, value)) => EnvFilter::try_new(&value).unwrap_or_else(|e| {
            eprintln!("casbuild: ignoring {var}={value:?} ({e}); logging at {default}");
            EnvFilter::new(default)
        }),
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).boxed(),
    };
    let provider = match otlp {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
            let service = format!("casbuild-{}", role.unwrap_or("client"));
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
    };
    let traces = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("casbuild")));
    tracing_subscriber::registry().with(logs).with(traces).with(filter).init();
    Ok(Telemetry { provider })
}
