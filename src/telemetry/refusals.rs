//! The calls sluice answered itself, by why: what both the per-call
//! metrics and the rest of the process count.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
};

/// Why sluice refused a call itself.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum RefusalReason {
    /// The upstream could not be reached or was lost (UNAVAILABLE).
    upstream_unavailable,
    /// No endpoint of the routed group matches the call (UNAVAILABLE).
    no_endpoint,
    /// The call already passed through this sluice (ABORTED).
    routing_loop,
    /// A route refused the call with the status it names.
    route,
    /// The first message was larger than `routing.peek_max_bytes`
    /// (RESOURCE_EXHAUSTED).
    peek_budget,
    /// The call's deadline passed in sluice (DEADLINE_EXCEEDED).
    deadline,
    /// The drain deadline cut the call off (UNAVAILABLE).
    drained,
    /// Something unexpected inside sluice (INTERNAL).
    internal,
    /// An HTTP/2 request that is not gRPC (answered 415).
    not_grpc,
    /// Past `server.max_in_flight` (answered RESOURCE_EXHAUSTED).
    overloaded,
    /// An xDS cluster's `max_requests` calls were in flight (UNAVAILABLE).
    circuit_breaker,
    /// xDS does not route the call: no Listener, virtual host, route or
    /// cluster for it (UNAVAILABLE).
    xds_unrouted,
    /// Over a route's `rate_limit` (RESOURCE_EXHAUSTED).
    rate_limit,
    /// Over a route's `max_in_flight` (RESOURCE_EXHAUSTED).
    max_in_flight,
    /// A route's `fault` aborted the call (the status it names).
    fault,
}

impl RefusalReason {
    /// The reason for an answer a layer gave itself.
    pub(crate) fn answered_by(by: sluice_layers::grpc::status::Answered) -> Self {
        use sluice_layers::grpc::status::Answered;
        match by {
            Answered::Refused => Self::route,
            Answered::PeekBudget => Self::peek_budget,
            Answered::Deadline => Self::deadline,
            Answered::Draining => Self::drained,
            _ => Self::internal,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub(crate) reason: RefusalReason,
}

/// `sluice_refusals_total{reason}`: a handle, cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct Refusals(pub(crate) Family<RefusalLabels, Counter>);

impl Refusals {
    pub(crate) fn refused(&self, reason: RefusalReason) {
        self.0.get_or_create(&RefusalLabels { reason }).inc();
    }
}

impl prometheus_client::encoding::EncodeMetric for Refusals {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }
}
