//! The response future of [`Drain`](super::Drain).

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;

use super::{ExpiryMessage, Guard, body::ResponseBody};
use crate::grpc::status::{self, Code};

pin_project! {
    /// Response future for [`Drain`](super::Drain): the inner future, or a
    /// refusal.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Called {
            #[pin]
            fut: F,
            #[pin]
            expired: OwnedNotified,
            guard: Option<Guard>,
            expiry_message: ExpiryMessage,
        },
        Refused {
            message: Cow<'static, str>,
        },
    }
}

// === impl ResponseFuture ===

impl<F> ResponseFuture<F> {
    pub(super) fn called(fut: F, guard: Guard, expiry_message: ExpiryMessage) -> Self {
        let expired = guard.shared().expired();
        Self {
            state: State::Called {
                fut,
                expired,
                guard: Some(guard),
                expiry_message,
            },
        }
    }

    pub(super) fn refused(message: Cow<'static, str>) -> Self {
        Self {
            state: State::Refused { message },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Refused { message } => Poll::Ready(Ok(status::answer(
                status::Answered::Draining,
                Code::Unavailable,
                message,
            ))),
            StateProj::Called {
                fut,
                expired,
                guard,
                expiry_message,
            } => {
                let cut_off = guard.as_ref().is_some_and(|g| g.shared().is_expired())
                    || expired.poll(cx).is_ready();
                if cut_off {
                    guard.take();
                    return Poll::Ready(Ok(status::answer(
                        status::Answered::Draining,
                        Code::Unavailable,
                        expiry_message.as_str(),
                    )));
                }
                let res = ready!(fut.poll(cx))?;
                let guard = guard.take().expect("polled after completion");
                let expiry_message = std::mem::take(expiry_message);
                Poll::Ready(Ok(
                    res.map(|body| ResponseBody::new(body, guard, expiry_message))
                ))
            }
        }
    }
}
