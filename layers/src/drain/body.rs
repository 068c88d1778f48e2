//! The response body of [`Drain`](super::Drain).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;

use super::{ExpiryMessage, Guard};
use crate::grpc::status::{self, Code};

pin_project! {
    /// Response body for [`Drain`](super::Drain): the inner body, passed
    /// through untouched, plus the call's drain guard, released when the
    /// body ends or is dropped. If the drain's grace period runs out first,
    /// the inner body is dropped and the body ends with `UNAVAILABLE`
    /// trailers.
    ///
    /// Its `Default` is the empty body of a refusal.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<B> {
        Running {
            #[pin]
            body: B,
            #[pin]
            expired: OwnedNotified,
            guard: Guard,
            expiry_message: ExpiryMessage,
        },
        Done,
    }
}

// === impl ResponseBody ===

impl<B> ResponseBody<B> {
    pub(super) fn new(body: B, guard: Guard, expiry_message: ExpiryMessage) -> Self {
        let expired = guard.shared().expired();
        Self {
            state: State::Running {
                body,
                expired,
                guard,
                expiry_message,
            },
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
        let StateProj::Running {
            body,
            expired,
            guard,
            expiry_message,
        } = state.as_mut().project()
        else {
            return Poll::Ready(None);
        };
        if guard.shared().is_expired() || expired.poll(cx).is_ready() {
            let trailers = status::trailers(Code::Unavailable, expiry_message.as_str());
            state.set(State::Done);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = body.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            // The end of the stream releases the drain guard.
            state.set(State::Done);
        }
        frame
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
