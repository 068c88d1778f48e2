//! The response future of [`Deadline`](super::Deadline).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::body::ResponseBody;
use crate::grpc::status::{self, Code};

pin_project! {
    /// Response future for [`Deadline`](super::Deadline).
    ///
    /// Resolves to the inner response with its body wrapped (the timer moves
    /// into the body), or to a trailers-only `DEADLINE_EXCEEDED` if the
    /// timer fires first.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Boxed because it moves into the body once headers arrive; only
        // calls with a `grpc-timeout` pay for it.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

// === impl ResponseFuture ===

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, timer: Option<Pin<Box<Sleep>>>) -> Self {
        Self { inner, timer }
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
            return Poll::Ready(Ok(status::trailers_only(
                Code::DeadlineExceeded,
                super::MESSAGE,
            )));
        }
        let res = ready!(this.inner.poll(cx))?;
        let timer = this.timer.take();
        Poll::Ready(Ok(res.map(|body| ResponseBody::new(body, timer))))
    }
}
