//! Why a call found no endpoint, or no connection to one.

use crate::upstream::UpstreamError;

/// Why the balancer could not hand a call to an endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BalanceError {
    /// No connection to the chosen endpoint (or the one tried after it)
    /// could be had: nothing of the call was sent.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The director chose a route the balancer cannot follow: a fan-out or
    /// mirror route, or a group that does not exist. RouteTable read from a
    /// config never do (the config checks its groups, and its routes have
    /// one destination); a director of a library user can.
    #[error("cannot follow the route: {0}")]
    Unroutable(String),
    /// No strategy of the group found an endpoint for this call.
    #[error("no endpoint of upstream group {0:?} matches this call")]
    NoEndpoint(String),
    /// The group's limit of calls in flight is reached (an xDS cluster's
    /// circuit breaker, or a file group's `max_requests`).
    #[error("circuit breaker open: {0}")]
    CircuitOpen(String),
    /// A route's policy refused the call: its rate limit, its
    /// `max_in_flight`, or an injected fault.
    #[error("{message}")]
    Limited {
        code: sluice_layers::grpc::status::Code,
        message: String,
        reason: crate::telemetry::metrics::RefusalReason,
    },
}
