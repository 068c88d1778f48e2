use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::{DeadlineLayer, body::ResponseBody, future::ResponseFuture};
use crate::grpc::timeout;

/// Middleware that ends a call with `DEADLINE_EXCEEDED` when its
/// `grpc-timeout` runs out, whether the call is still waiting for response
/// headers or is streaming its response body.
///
/// See the [module docs](crate::deadline) for an example.
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

// === impl Deadline ===

impl<S> Deadline<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
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

    /// Starts the call's timer (if it has a valid `grpc-timeout`) and calls
    /// the inner service.
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let timer = timeout::from_headers(req.headers()).map(|t| Box::pin(tokio::time::sleep(t)));
        ResponseFuture::new(self.inner.call(req), timer)
    }
}
