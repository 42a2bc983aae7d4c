//! Trace context across processes: a W3C `traceparent`
//! (`00-TRACEID-SPANID-FLAGS`) read from a client's gRPC metadata, carried
//! in a worker's lease, and made the parent of the span that does the work
//! there, so that one trace shows a request from the client through the
//! coordinator to the worker. Without an OpenTelemetry exporter installed
//! the spans have no trace context and these do nothing.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The gRPC metadata key (and W3C header) of the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The span context a `traceparent` names; None unless well formed (version
/// 00, non-zero ids).
fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & 1);
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
}

/// Makes `span` continue the trace of a remote parent named by
/// `traceparent`; a malformed value is ignored (the span starts its own).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if let Some(parent) = parse(traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// The `traceparent` naming `span` as the parent of work elsewhere; empty
/// when it has no trace context.
pub fn traceparent(span: &tracing::Span) -> String {
    let context = span.context();
    let span = context.span();
    let ids = span.span_context();
    if !ids.is_valid() {
        return String::new();
    }
    format!("00-{}-{}-{:02x}", ids.trace_id(), ids.span_id(), ids.trace_flags().to_u8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_followed() {
        let good = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(good.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(good.is_sampled() && good.is_remote());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
