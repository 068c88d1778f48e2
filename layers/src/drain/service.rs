use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{DrainLayer, Settings, Watch, body::ResponseBody, future::ResponseFuture};

/// Middleware that refuses calls with `UNAVAILABLE` while draining, and
/// holds a drain [`Guard`](super::Guard) for every call it lets through
/// until the call's response body ends or is dropped.
///
/// See the [module docs](crate::drain) for an example.
#[derive(Clone, Debug)]
pub struct Drain<S> {
    inner: S,
    watch: Watch,
    // Behind a pointer: a server holds one copy of its stack per
    // connection.
    settings: Arc<Settings>,
}

// === impl Drain ===

impl<S> Drain<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, watch: Watch) -> Self {
        Self::with_settings(inner, watch, Arc::default())
    }

    pub(super) fn with_settings(inner: S, watch: Watch, settings: Arc<Settings>) -> Self {
        Self {
            inner,
            watch,
            settings,
        }
    }

    fn refusing(&self) -> bool {
        !self.settings.admit && self.watch.is_draining()
    }

    /// Returns a [`DrainLayer`] (same as [`DrainLayer::new`]).
    pub fn layer(watch: Watch) -> DrainLayer {
        DrainLayer::new(watch)
    }

    inner_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Drain<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    /// Ready at once while draining (the call will be refused, and a
    /// refusal must not wait on a saturated inner service); otherwise the
    /// inner service's readiness.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.refusing() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    /// Refuses with a trailers-only `UNAVAILABLE` while draining (unless
    /// [`DrainLayer::admit_while_draining`]); otherwise takes a guard and
    /// calls the inner service.
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if self.refusing() {
            return ResponseFuture::refused(self.settings.message.clone());
        }
        let guard = self.watch.guard();
        ResponseFuture::called(
            self.inner.call(req),
            guard,
            self.settings.expiry_message.clone(),
        )
    }
}
