//! The one place leftover errors of the stack become gRPC statuses: server
//! policy, above every layer that can fail.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::Response;
use sluice_layers::{
    BoxError,
    grpc::status::{self, Code},
};
use tower::Service;

use crate::{
    balance::BalanceError,
    forward::ForwardError,
    telemetry::metrics::{Metrics, RefusalReason},
    upstream::UpstreamError,
};

/// The one place leftover errors become what the client gets: a
/// trailers-only gRPC status, or (for an upstream reset) the same error,
/// which the server passes on as RST_STREAM with the upstream's reason.
#[derive(Clone, Debug)]
pub(crate) struct Rescue<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Rescue<S> {
    pub(crate) fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<S, R, B> Service<R> for Rescue<S>
where
    S: Service<R, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Default,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        RescueFuture {
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Rescue`].
    #[derive(Debug)]
    pub(crate) struct RescueFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<Metrics>,
    }
}

impl<F, B, E> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Default,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        Poll::Ready(result.or_else(|e| rescue(e.into(), this.metrics)))
    }
}

/// The status for an error from the stack (a balancer's or forwarder's
/// error maps by its kind, anything else is INTERNAL), and the reason it
/// is counted under. `None` for an upstream reset, which is passed on as
/// RST_STREAM.
pub(crate) fn status_of(err: &BoxError) -> Option<(Code, RefusalReason)> {
    let unavailable = (Code::Unavailable, RefusalReason::upstream_unavailable);
    let upstream = |e: &UpstreamError| match e {
        UpstreamError::Refused(_) => (Code::Internal, RefusalReason::internal),
        _ => unavailable,
    };
    if let Some(e) = err.downcast_ref::<ForwardError>() {
        return match e {
            ForwardError::UpstreamReset(_) => None,
            ForwardError::Send(e) => Some(upstream(e)),
            ForwardError::UpstreamLost(_) => Some(unavailable),
        };
    }
    if err.downcast_ref::<crate::xds::Unrouted>().is_some() {
        return Some((Code::Unavailable, RefusalReason::xds_unrouted));
    }
    Some(match err.downcast_ref::<BalanceError>() {
        Some(BalanceError::Upstream(e)) => upstream(e),
        Some(BalanceError::Unroutable(_)) => (Code::Internal, RefusalReason::internal),
        Some(BalanceError::NoEndpoint(_)) => (Code::Unavailable, RefusalReason::no_endpoint),
        Some(BalanceError::CircuitOpen(_)) => (Code::Unavailable, RefusalReason::circuit_breaker),
        Some(BalanceError::Limited { code, reason, .. }) => (*code, *reason),
        None => (Code::Internal, RefusalReason::internal),
    })
}

fn rescue<B: Default>(err: BoxError, metrics: &Metrics) -> Result<Response<B>, BoxError> {
    let Some((code, reason)) = status_of(&err) else {
        return Err(err);
    };
    let message = err.to_string();
    if code == Code::Internal {
        tracing::warn!(error = %message, "call failed inside sluice");
    } else {
        tracing::debug!(error = %message, "call refused");
    }
    metrics.refused(reason);
    Ok(status::trailers_only(code, &message))
}
