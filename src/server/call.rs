//! One call on a downstream connection: the request as a body over h2's
//! receive stream, the stack's answer sent back frame by frame, and the
//! answers the server gives itself (415, RESOURCE_EXHAUSTED).
//!
//! Every call is a future polled by its connection's task: no task per
//! stream, and every frame the call sends goes out in the connection's
//! next write.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use sluice_layers::BoxError;
use tracing::debug;

use crate::{
    proto::flow::{Outgoing, RecvBody, Sent},
    stats::Held,
};

/// How a call ended, for the connection's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CallEnd {
    /// The answer went out whole.
    Finished,
    /// The client reset the stream (or went away) before the end.
    ClientReset,
    /// The stack or the response body failed; the stream was reset.
    Failed,
}

/// The RST_STREAM reason for an error: an h2 error's own (an upstream
/// reset passes on with its reason), else INTERNAL_ERROR.
fn reset_reason(err: &(dyn std::error::Error + 'static)) -> Reason {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason().unwrap_or(Reason::INTERNAL_ERROR);
        }
        source = e.source();
    }
    Reason::INTERNAL_ERROR
}

pin_project! {
    /// One call, from the stack's answer to the end of its response body;
    /// it counts as in flight (`calls_in_flight`) while it lives.
    ///
    /// A named future with its state inline (the connection task holds
    /// thousands of them, one allocation each in `FuturesUnordered`), so
    /// that it is no bigger than the stack's own future or the response
    /// body, whichever is larger.
    pub(super) struct CallFuture<F, B> {
        #[pin]
        state: CallState<F, B>,
        _in_flight: Option<Held>,
    }
}

pin_project! {
    #[project = CallProj]
    #[project_replace = CallReplace]
    enum CallState<F, B> {
        // Waiting for the stack's answer, unless the client resets first
        // (dropping the future cancels whatever it started upstream).
        Answer {
            #[pin]
            answer: F,
            respond: Option<SendResponse<Bytes>>,
        },
        // Sending the response body.
        Body {
            #[pin]
            body: B,
            tx: SendStream<Bytes>,
            pending: Option<Outgoing>,
        },
        // An answer the server gave itself.
        Refused { refusal: Pin<Box<dyn Future<Output = CallEnd> + Send>> },
        Done,
    }
}

impl<F, B> CallFuture<F, B> {
    /// A call whose stack future is `answer`; `in_flight` counts it.
    pub(super) fn new(answer: F, respond: SendResponse<Bytes>, in_flight: Held) -> Self {
        Self {
            state: CallState::Answer {
                answer,
                respond: Some(respond),
            },
            _in_flight: Some(in_flight),
        }
    }

    /// A refusal (see [`refuse`]); it does not count as in flight.
    pub(super) fn refused(refusal: impl Future<Output = CallEnd> + Send + 'static) -> Self {
        Self {
            state: CallState::Refused {
                refusal: Box::pin(refusal),
            },
            _in_flight: None,
        }
    }
}

impl<F, B, E> Future for CallFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = CallEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CallEnd> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                CallProj::Answer { answer, respond } => {
                    let Some(respond_ref) = respond.as_mut() else {
                        return Poll::Ready(CallEnd::Failed);
                    };
                    let res = match answer.poll(cx) {
                        Poll::Ready(res) => res,
                        Poll::Pending => {
                            if respond_ref.poll_reset(cx).is_ready() {
                                state.set(CallState::Done);
                                return Poll::Ready(CallEnd::ClientReset);
                            }
                            return Poll::Pending;
                        }
                    };
                    let mut respond = respond.take().expect("checked above");
                    let res = match res {
                        Ok(res) => res,
                        Err(e) => {
                            let e: BoxError = e.into();
                            debug!(error = %e, "call failed; resetting the stream");
                            respond.send_reset(reset_reason(&*e));
                            state.set(CallState::Done);
                            return Poll::Ready(CallEnd::Failed);
                        }
                    };
                    let (parts, body) = res.into_parts();
                    let end_of_stream = body.is_end_stream();
                    match respond.send_response(Response::from_parts(parts, ()), end_of_stream) {
                        Ok(_) if end_of_stream => {
                            state.set(CallState::Done);
                            return Poll::Ready(CallEnd::Finished);
                        }
                        Ok(tx) => CallState::Body {
                            body,
                            tx,
                            pending: None,
                        },
                        Err(e) => {
                            debug!(error = %e, "cannot send the response head");
                            state.set(CallState::Done);
                            return Poll::Ready(CallEnd::ClientReset);
                        }
                    }
                }
                CallProj::Body { body, tx, pending } => {
                    let end = ready!(poll_body(body, tx, pending, cx));
                    state.set(CallState::Done);
                    return Poll::Ready(end);
                }
                CallProj::Refused { refusal } => {
                    let end = ready!(refusal.as_mut().poll(cx));
                    state.set(CallState::Done);
                    return Poll::Ready(end);
                }
                CallProj::Done => return Poll::Ready(CallEnd::Failed),
            };
            state.set(next);
        }
    }
}

/// Sends a response body on `tx`: each chunk only as the client's windows
/// allow (the next is not asked for until this one is out, so the upstream
/// waits too), then the trailers.
fn poll_body<B>(
    mut body: Pin<&mut B>,
    tx: &mut SendStream<Bytes>,
    pending: &mut Option<Outgoing>,
    cx: &mut Context<'_>,
) -> Poll<CallEnd>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    loop {
        if tx.poll_reset(cx).is_ready() {
            return Poll::Ready(CallEnd::ClientReset);
        }
        if let Some(out) = pending.as_mut() {
            match ready!(out.poll_send(tx, cx, &mut false)) {
                Sent::Gone => return Poll::Ready(CallEnd::ClientReset),
                Sent::All if out.ends_stream() => return Poll::Ready(CallEnd::Finished),
                Sent::All => *pending = None,
            }
        }
        match ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if !data.is_empty() || eos {
                        *pending = Some(Outgoing::new(data, eos));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Poll::Ready(match tx.send_trailers(trailers) {
                            Ok(()) => CallEnd::Finished,
                            Err(_) => CallEnd::ClientReset,
                        });
                    }
                }
            },
            Some(Err(e)) => {
                let e: BoxError = e.into();
                debug!(error = %e, "response body failed; resetting the stream");
                tx.send_reset(reset_reason(&*e));
                return Poll::Ready(CallEnd::Failed);
            }
            None => {
                // The body ended without saying so on its last frame.
                let _ = tx.send_data(Bytes::new(), true);
                return Poll::Ready(CallEnd::Finished);
            }
        }
    }
}

/// An answer the server gives without the stack.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) head: Response<()>,
    /// A body for non-gRPC answers; trailers-only gRPC answers have none.
    pub(super) body: Option<Bytes>,
}

/// Sends `refusal`, then reads the rest of the request, up to `linger`:
/// the stream stays a proper HTTP/2 exchange (the client may still send,
/// and h2 checks what it sends) instead of being cut off under it. A
/// client still sending after `linger` gets RST_STREAM(NO_ERROR), which
/// RFC 9113 §8.1 allows after a complete response.
pub(super) async fn refuse(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    refusal: Refusal,
    linger: Duration,
) -> CallEnd {
    let mut body = RecvBody::new(req.into_body());
    let eos = refusal.body.is_none();
    let Ok(mut tx) = respond.send_response(refusal.head, eos) else {
        return CallEnd::ClientReset;
    };
    if let Some(text) = refusal.body {
        // A few dozen bytes: within any window but zero, and a client that
        // gives none is cut off with the linger.
        tx.reserve_capacity(text.len());
        let _ = tx.send_data(text, true);
    }
    let _ = tokio::time::timeout(linger, async {
        while let Some(Ok(_)) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {}
    })
    .await;
    CallEnd::Finished
}

/// The head of a refusal that is not gRPC: `status`, with a text body.
pub(super) fn plain(status: http::StatusCode, text: &'static str) -> Refusal {
    let mut head = Response::new(());
    *head.status_mut() = status;
    let headers: &mut HeaderMap = head.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(text.len()),
    );
    Refusal {
        head,
        body: Some(Bytes::from_static(text.as_bytes())),
    }
}

/// A trailers-only gRPC refusal.
pub(super) fn grpc(code: sluice_layers::grpc::status::Code, message: &str) -> Refusal {
    let res: Response<()> = sluice_layers::grpc::status::trailers_only(code, message);
    Refusal {
        head: res,
        body: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_carry_the_reason_of_an_h2_error_in_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] h2::Error);
        let reset = Wrapped(h2::Error::from(Reason::REFUSED_STREAM));
        assert_eq!(reset_reason(&reset), Reason::REFUSED_STREAM);
        let other = std::io::Error::other("boom");
        assert_eq!(reset_reason(&other), Reason::INTERNAL_ERROR);
    }
}
