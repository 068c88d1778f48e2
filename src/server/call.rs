//! One call on a downstream connection: the request as a body over h2's
//! receive stream, the stack's answer sent back frame by frame, and the
//! answers the server gives itself (415, RESOURCE_EXHAUSTED).
//!
//! Every call is a future polled by its connection's task: no task per
//! stream, and every frame the call sends goes out in the connection's
//! next write.

use std::{
    future::poll_fn,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use sluice_layers::BoxError;
use tower::{Service, ServiceExt};
use tracing::debug;

use crate::window::{Outgoing, Sent};

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

/// A downstream request body: DATA and trailers as h2 receives them.
///
/// The flow-control window for a chunk is given back to the client when the
/// consumer asks for the next frame, by which time it has passed the chunk
/// on (the forwarder hands it to the upstream stream first), or when the
/// body is dropped. So what a call holds of its client's data is bounded
/// by the client's stream window, the chunk in hand included.
#[derive(Debug)]
pub(crate) struct RequestBody {
    recv: RecvStream,
    unreleased: usize,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

impl RequestBody {
    fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            unreleased: 0,
            state: State::Data,
        }
    }

    fn release(&mut self) {
        if self.unreleased > 0 {
            let _ = self.recv.flow_control().release_capacity(self.unreleased);
            self.unreleased = 0;
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.release();
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        this.release();
        if this.state == State::Data {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    this.unreleased = data.len();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.state = State::Trailers,
            }
        }
        if this.state == State::Trailers {
            let trailers = ready!(this.recv.poll_trailers(cx));
            this.state = State::Done;
            return Poll::Ready(match trailers {
                Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            });
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
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

/// Runs one call through the stack and sends its answer.
pub(super) async fn serve<S, B>(
    svc: S,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> CallEnd
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut answer = pin!(svc.oneshot(req.map(RequestBody::new)));
    // The answer, unless the client resets first (dropping the future
    // cancels whatever the stack started upstream).
    let answer = poll_fn(|cx| {
        if let Poll::Ready(res) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let res = match answer {
        None => return CallEnd::ClientReset,
        Some(Ok(res)) => res,
        Some(Err(e)) => {
            let e: BoxError = e.into();
            debug!(error = %e, "call failed; resetting the stream");
            respond.send_reset(reset_reason(&*e));
            return CallEnd::Failed;
        }
    };
    let (parts, body) = res.into_parts();
    let end_of_stream = body.is_end_stream();
    let tx = match respond.send_response(Response::from_parts(parts, ()), end_of_stream) {
        Ok(tx) => tx,
        Err(e) => {
            debug!(error = %e, "cannot send the response head");
            return CallEnd::ClientReset;
        }
    };
    if end_of_stream {
        return CallEnd::Finished;
    }
    send_body(body, tx).await
}

/// Sends a response body on `tx`: each chunk only as the client's windows
/// allow (the next is not asked for until this one is out, so the upstream
/// waits too), then the trailers.
async fn send_body<B>(body: B, mut tx: SendStream<Bytes>) -> CallEnd
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut pending: Option<Outgoing> = None;
    poll_fn(|cx| {
        loop {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(CallEnd::ClientReset);
            }
            if let Some(out) = pending.as_mut() {
                match ready!(out.poll_send(&mut tx, cx, &mut false)) {
                    Sent::Gone => return Poll::Ready(CallEnd::ClientReset),
                    Sent::All if out.ends_stream() => return Poll::Ready(CallEnd::Finished),
                    Sent::All => pending = None,
                }
            }
            match ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = body.is_end_stream();
                        if !data.is_empty() || eos {
                            pending = Some(Outgoing::new(data, eos));
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
    })
    .await
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
    let mut body = RequestBody::new(req.into_body());
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
