//! A tracing span per call: tower-http's gRPC-aware `TraceLayer`, with our
//! own fields (method, upstream, grpc-status, duration).
//!
//! The span is at DEBUG level: with the default `info` filter, creating it
//! is a cached callsite check and nothing more.

use std::time::Duration;

use http::{HeaderMap, Request};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower_http::{
    classify::{GrpcErrorsAsFailures, GrpcFailureClass, SharedClassifier},
    trace::TraceLayer,
};
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The layer type sluice uses.
pub(crate) type CallTrace =
    TraceLayer<SharedClassifier<GrpcErrorsAsFailures>, MakeSpan, (), (), (), OnEos, OnFailure>;

/// Makes each call's span. Its `upstream` is recorded by the forwarder
/// once it has picked the endpoint ([`record_upstream`]); a `traceparent`
/// sent by the client makes it a child of the client's span.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MakeSpan;

impl<B> tower_http::trace::MakeSpan<B> for MakeSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let span = tracing::debug_span!(
            "call",
            method = %req.uri().path(),
            upstream = field::Empty,
            grpc_status = field::Empty,
            duration_ms = field::Empty,
        );
        if !span.is_disabled() && req.headers().contains_key(TRACEPARENT) {
            let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
            // Without the OpenTelemetry layer there is nothing to parent.
            let _ = span.set_parent(parent);
        }
        span
    }
}

/// Records the endpoint a call went to in the current call span.
pub(crate) fn record_upstream(address: &dyn std::fmt::Display) {
    let span = Span::current();
    if !span.is_disabled() {
        span.record("upstream", field::display(address));
    }
}

const TRACEPARENT: &str = "traceparent";

/// Request headers as the W3C propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Records the status of a call that ended with trailers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OnEos;

impl tower_http::trace::OnEos for OnEos {
    fn on_eos(self, trailers: Option<&HeaderMap>, duration: Duration, span: &Span) {
        // A number, as in every other event (none without a status).
        let status: Option<i64> = trailers
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if let Some(status) = status {
            span.record("grpc_status", status);
        }
        span.record("duration_ms", duration.as_secs_f64() * 1000.0);
        tracing::debug!(parent: span, grpc_status = status, ?duration, "call ended");
    }
}

/// Records calls that failed: a non-OK status, or an error.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OnFailure;

impl tower_http::trace::OnFailure<GrpcFailureClass> for OnFailure {
    fn on_failure(&mut self, failure: GrpcFailureClass, duration: Duration, span: &Span) {
        span.record("duration_ms", duration.as_secs_f64() * 1000.0);
        match failure {
            GrpcFailureClass::Status(status) => {
                span.record("grpc_status", i64::from(status.code_raw()));
                // `grpc_message`, not `message`: that key is the event's
                // own text, and a JSON line must have one of each.
                tracing::debug!(
                    parent: span,
                    grpc_status = i64::from(status.code_raw()),
                    grpc_message = status.message().unwrap_or_default(),
                    ?duration,
                    "call failed"
                );
            }
            other => {
                tracing::debug!(parent: span, failure = %other, ?duration, "call failed");
            }
        }
    }
}

/// The per-call tracing layer.
pub(crate) fn layer() -> CallTrace {
    TraceLayer::new_for_grpc()
        .make_span_with(MakeSpan)
        .on_request(())
        .on_response(())
        .on_body_chunk(())
        .on_eos(OnEos)
        .on_failure(OnFailure)
}
