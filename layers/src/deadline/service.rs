use std::{
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tower_service::Service;

use super::{DeadlineLayer, Expiry, body::ResponseBody, future::ResponseFuture};
use crate::{
    direct::{Destination, Route},
    grpc::timeout,
};

/// Middleware that ends a call with `DEADLINE_EXCEEDED` when its
/// `grpc-timeout` runs out, whether the call is still waiting for response
/// headers or is streaming its response body.
///
/// See the [module docs](crate::deadline) for an example.
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    offset: Duration,
    expiry: Expiry,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Deadline<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline")
            .field("inner", &self.inner)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

// === impl Deadline ===

impl<S> Deadline<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self::with(inner, Duration::ZERO, Expiry::NONE)
    }

    pub(super) const fn with(inner: S, offset: Duration, expiry: Expiry) -> Self {
        Self {
            inner,
            offset,
            expiry,
        }
    }

    /// Returns a [`DeadlineLayer`] (same as [`DeadlineLayer::new`]).
    pub const fn layer() -> DeadlineLayer {
        DeadlineLayer::new()
    }

    inner_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Deadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    /// Ready when the inner service is ready.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    /// Starts the call's timer (if it has a valid `grpc-timeout`, or its
    /// [`Route`](crate::direct::Route) caps the deadline), forwards the
    /// budget less the offset, and calls the inner service.
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let cap = req
            .extensions()
            .get::<Route>()
            .and_then(|r| r.destinations().next())
            .and_then(Destination::timeout);
        let sent = timeout::from_headers(req.headers());
        let budget = match (sent, cap) {
            (Some(t), Some(c)) => Some(t.min(c)),
            (t, c) => t.or(c),
        };
        let Some(budget) = budget else {
            return ResponseFuture::new(self.inner.call(req), None, Expiry::default());
        };
        // The header passes as the client wrote it unless this hop changes
        // the budget.
        if sent != Some(budget) || !self.offset.is_zero() {
            let forwarded = budget.saturating_sub(self.offset);
            req.headers_mut().insert(
                timeout::GRPC_TIMEOUT,
                timeout::encode(forwarded.max(Duration::from_millis(1))),
            );
        }
        let timer = Box::pin(tokio::time::sleep(budget));
        ResponseFuture::new(self.inner.call(req), Some(timer), self.expiry.clone())
    }
}
