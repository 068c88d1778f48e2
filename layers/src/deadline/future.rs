//! The response future of [`Deadline`](super::Deadline).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::{Expiry, body::ResponseBody};
use crate::grpc::status::{self, Code};

pin_project! {
    /// Response future for [`Deadline`](super::Deadline).
    ///
    /// Resolves to the inner response with its body wrapped (the timer moves
    /// into the body), or to a trailers-only `DEADLINE_EXCEEDED` if the
    /// timer fires first.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Boxed because it moves into the body once headers arrive; only
        // calls with a `grpc-timeout` pay for it.
        timer: Option<Pin<Box<Sleep>>>,
        expiry: Expiry,
    }
}

impl<F: std::fmt::Debug> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .field("timer", &self.timer)
            .finish_non_exhaustive()
    }
}

// === impl ResponseFuture ===

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, timer: Option<Pin<Box<Sleep>>>, expiry: Expiry) -> Self {
        Self {
            inner,
            timer,
            expiry,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(timer) = this.timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(status::answer(
                status::Answered::Deadline,
                Code::DeadlineExceeded,
                this.expiry.message(),
            )));
        }
        let res = ready!(this.inner.poll(cx))?;
        let timer = this.timer.take();
        let expiry = std::mem::take(this.expiry);
        Poll::Ready(Ok(res.map(|body| ResponseBody::new(body, timer, expiry))))
    }
}
