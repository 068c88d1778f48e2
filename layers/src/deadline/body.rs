//! The response body of [`Deadline`](super::Deadline).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::Expiry;
use crate::grpc::status::{self, Code};

pin_project! {
    /// Response body for [`Deadline`](super::Deadline): the inner body, which
    /// it passes through untouched until the call's timer fires; then it
    /// drops the inner body and ends with `DEADLINE_EXCEEDED` trailers.
    ///
    /// Its `Default` is the empty body of a trailers-only refusal.
    pub struct ResponseBody<B> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B> {
        Running {
            #[pin]
            body: B,
            timer: Option<Pin<Box<Sleep>>>,
            expiry: Expiry,
        },
        // Ended by the timer, or the empty body of a refusal.
        Done,
    }
}

// === impl ResponseBody ===

impl<B> ResponseBody<B> {
    pub(super) fn new(body: B, timer: Option<Pin<Box<Sleep>>>, expiry: Expiry) -> Self {
        Self {
            state: State::Running {
                body,
                timer,
                expiry,
            },
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            State::Running { body, timer, .. } => f
                .debug_struct("ResponseBody")
                .field("body", body)
                .field("timer", timer)
                .finish_non_exhaustive(),
            State::Done => f.write_str("ResponseBody(done)"),
        }
    }
}

impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self { state: State::Done }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut state = self.project().state;
        match state.as_mut().project() {
            StateProj::Running {
                body,
                timer,
                expiry,
            } => {
                // The timer first: a body that is always ready must not
                // outrun its deadline.
                let expired = timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !expired {
                    return body.poll_frame(cx);
                }
                expiry.expired();
                let trailers = status::trailers(Code::DeadlineExceeded, expiry.message());
                state.set(State::Done);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            StateProj::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Running { body, .. } => body.is_end_stream(),
            State::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Running { body, .. } => body.size_hint(),
            State::Done => SizeHint::with_exact(0),
        }
    }
}
