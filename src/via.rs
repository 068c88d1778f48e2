//! Loop detection: each sluice appends its id to `sluice-via`, and a call
//! that already carries this instance's id is answered ABORTED (as linkerd
//! answers loops: retrying the same call would loop again, which is not
//! FAILED_PRECONDITION's "fix the system state first").
//!
//! It sits above the fan-out, so the header is appended once per call and
//! every destination gets it.

use std::{
    future::{Ready, ready},
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::Either;
use http::{HeaderName, HeaderValue, Request, Response};
use sluice_layers::grpc::status::{self, Code};
use tower::Service;

use crate::telemetry::metrics::{Metrics, RefusalReason};

/// The header that records which sluice instances a call passed through.
const VIA: HeaderName = HeaderName::from_static("sluice-via");

/// Middleware that refuses a call that already passed through this
/// instance and marks the others.
#[derive(Clone, Debug)]
pub(crate) struct Via<S> {
    inner: S,
    /// This instance's id (behind a pointer: every connection's stack
    /// holds a copy).
    id: Arc<HeaderValue>,
    metrics: Arc<Metrics>,
}

impl<S> Via<S> {
    /// Wraps `inner` with a fresh random id for this process.
    pub(crate) fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        let id =
            std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id());
        let id = HeaderValue::try_from(format!("{id:016x}")).expect("hex is a valid header value");
        Self {
            inner,
            id: Arc::new(id),
            metrics,
        }
    }
}

impl<S, B, RB> Service<Request<B>> for Via<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let looped = req.headers().get_all(&VIA).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|id| id.trim_ascii() == self.id.as_bytes())
        });
        if looped {
            self.metrics.refused(RefusalReason::routing_loop);
            let message = format!(
                "routing loop: this call already passed through this sluice (sluice-via {})",
                String::from_utf8_lossy(self.id.as_bytes())
            );
            tracing::debug!(error = %message, "call refused");
            return Either::Right(ready(Ok(status::trailers_only(Code::Aborted, &message))));
        }
        req.headers_mut().append(VIA, HeaderValue::clone(&self.id));
        Either::Left(self.inner.call(req))
    }
}
