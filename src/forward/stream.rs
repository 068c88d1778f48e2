//! The per-call pumps: request DATA and trailers from the downstream body to
//! the upstream stream, and the upstream's response back as a body.
//!
//! Both move `Bytes` by reference count, never copy a payload, and hold at
//! most one frame beyond what the peer's flow-control window allows.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use sluice_layers::{
    BoxError,
    grpc::status::{self, Code},
};
use tracing::debug;

use super::ForwardError;
use crate::{
    proto::flow::{Outgoing, RecvBody, Sent},
    upstream::{ConnLoad, Lease, SendBlocked},
};

/// Copies a downstream request body into an upstream h2 stream.
///
/// Ends when the body ends (END_STREAM on the last DATA frame, or trailers),
/// when the body fails (the client reset or went away: the upstream gets
/// RST_STREAM(CANCEL)), or when the upstream resets its stream (including
/// the RST_STREAM(NO_ERROR) a server sends when it has answered early).
#[derive(Debug)]
pub(super) struct RequestPump<B> {
    body: B,
    tx: SendStream<Bytes>,
    /// A chunk in hand, waiting for stream capacity.
    pending: Option<Outgoing>,
    done: bool,
    /// The upstream connection's load, where a pump waiting for window is
    /// counted (the pool then prefers other connections for new calls).
    load: Arc<ConnLoad>,
    blocked: Option<SendBlocked>,
    /// Whether the upstream has ever given this stream window.
    sent_any: bool,
    /// Counts the pump while it runs on its own task.
    pub(super) held: Option<super::PumpHeld>,
    /// The reset sent when the pump is dropped before the body ended (the
    /// call was cancelled or cut off).
    cut_reason: Reason,
}

impl<B> Drop for RequestPump<B> {
    fn drop(&mut self) {
        if !self.done {
            // Explicit, so the reason is ours rather than h2's implicit
            // CANCEL (which it sends once every handle of the stream is
            // gone; this one goes first).
            self.tx.send_reset(self.cut_reason);
        }
    }
}

impl<B> RequestPump<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(
        body: B,
        tx: SendStream<Bytes>,
        load: Arc<ConnLoad>,
        cut_reason: Reason,
    ) -> Self {
        Self {
            cut_reason,
            body,
            tx,
            pending: None,
            done: false,
            load,
            blocked: None,
            sent_any: false,
            held: None,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // Wake on RST_STREAM from the upstream while waiting for the
            // client or for capacity.
            if let Poll::Ready(reason) = self.tx.poll_reset(cx) {
                debug!(?reason, "upstream reset the request stream");
                return Poll::Ready(());
            }
            if let Some(mut out) = self.pending.take() {
                // Only what the upstream's windows allow goes to h2, so zero
                // capacity here means the upstream's stream or connection
                // window is spent: it is not reading, which the pool wants
                // to know. A stream h2 has not opened yet (its HEADERS still
                // queued) gets no capacity either, so only a stream that has
                // sent before counts as blocked.
                let mut progressed = false;
                let sent = out.poll_send(&mut self.tx, cx, &mut progressed);
                self.sent_any |= progressed;
                match sent {
                    Poll::Pending => {
                        if self.blocked.is_none() && self.sent_any {
                            self.blocked = Some(Lease::send_blocked(&self.load));
                        }
                        self.pending = Some(out);
                        return Poll::Pending;
                    }
                    Poll::Ready(Sent::Gone) => return Poll::Ready(()),
                    Poll::Ready(Sent::All) if out.ends_stream() => return Poll::Ready(()),
                    Poll::Ready(Sent::All) => {
                        self.blocked = None;
                        continue;
                    }
                }
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() && !eos {
                            continue;
                        }
                        self.pending = Some(Outgoing::new(data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.tx.reserve_capacity(0);
                            let _ = self.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    debug!(error = %e, "downstream request body failed; cancelling upstream");
                    self.tx.send_reset(self.cut_reason);
                    return Poll::Ready(());
                }
                None => {
                    // The body ended without saying so on its last frame:
                    // the one case that needs an empty END_STREAM frame.
                    let _ = self.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

impl<B> Future for RequestPump<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        ready!(self.step(cx));
        self.done = true;
        self.blocked = None;
        self.held = None;
        Poll::Ready(())
    }
}

/// The upstream's response body, passed downstream frame by frame.
///
/// Flow-control window goes back to the upstream only for chunks the server
/// has sent on within the client's window ([`RecvBody`]), so what a call whose
/// client stops reading holds is the upstream stream window, the chunk in
/// hand included. An upstream RST_STREAM surfaces as an error carrying its
/// reason (the server resets the downstream stream with the same reason); a
/// broken upstream connection ends the body with `grpc-status: UNAVAILABLE`
/// trailers instead of a bare reset.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    recv: RecvBody,
    failed: bool,
    _lease: Lease,
}

impl ResponseBody {
    pub(super) fn new(recv: RecvStream, lease: Lease) -> Self {
        Self {
            recv: RecvBody::new(recv),
            failed: false,
            _lease: lease,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ForwardError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ForwardError>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let err = match ready!(Pin::new(&mut self.recv).poll_frame(cx)) {
            Some(Ok(frame)) => return Poll::Ready(Some(Ok(frame))),
            None => return Poll::Ready(None),
            Some(Err(err)) => err,
        };
        self.failed = true;
        if err.is_reset() && err.is_remote() {
            return Poll::Ready(Some(Err(ForwardError::UpstreamReset(err))));
        }
        let message = format!("upstream connection lost during the response: {err}");
        debug!(%message);
        Poll::Ready(Some(Ok(Frame::trailers(status::trailers(
            Code::Unavailable,
            &message,
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
