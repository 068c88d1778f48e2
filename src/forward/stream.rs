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
    /// `None` once taken back for another attempt.
    body: Option<B>,
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
            body: Some(body),
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

    /// Marks a request that ended with its headers: nothing to pump, and
    /// nothing to reset when dropped.
    pub(super) fn already_done(mut self) -> Self {
        self.done = true;
        self
    }

    /// The request body, back for another attempt; the stream is reset
    /// if it had not ended.
    pub(super) fn into_body(mut self) -> Option<B> {
        self.body.take()
    }

    /// The request body, while the pump has it.
    pub(super) fn body_mut(&mut self) -> Option<&mut B> {
        self.body.as_mut()
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
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(());
            };
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = body.is_end_stream();
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
    /// What only some calls have: boxed, so that a call without them
    /// carries one pointer.
    extra: Option<Box<Extra>>,
}

#[derive(Debug)]
struct Extra {
    outcome: Option<Arc<dyn Outcome>>,
    age: Option<Age>,
}

/// A route's `max_stream_age` on one call: its timer, then a grace for
/// the message in flight, then UNAVAILABLE trailers.
#[derive(Debug)]
struct Age {
    timer: Pin<Box<tokio::time::Sleep>>,
    limit: std::time::Duration,
    /// The timer has fired once; it now runs the grace.
    fired: bool,
    /// gRPC framing of the response, to end between messages: bytes of
    /// the current message's 5-byte prefix read, and bytes of its payload
    /// still to come.
    prefix: [u8; 5],
    prefix_read: usize,
    payload_left: u64,
}

/// How long a stream past its `max_stream_age` may take to finish the
/// message it is sending before it is cut.
pub(crate) const MAX_STREAM_AGE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Age {
    fn new(limit: std::time::Duration) -> Self {
        // Up to 10 % later, never earlier, so that streams opened together
        // do not all end together.
        let jitter = limit.mul_f64(crate::balance::random_below(1001) as f64 / 10_000.0);
        Self {
            timer: Box::pin(tokio::time::sleep(limit + jitter)),
            limit,
            fired: false,
            prefix: [0; 5],
            prefix_read: 0,
            payload_left: 0,
        }
    }

    fn between_messages(&self) -> bool {
        self.prefix_read == 0 && self.payload_left == 0
    }

    fn saw(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(5 - self.prefix_read);
            self.prefix[self.prefix_read..self.prefix_read + n].copy_from_slice(&data[..n]);
            self.prefix_read += n;
            data = &data[n..];
            if self.prefix_read == 5 {
                self.prefix_read = 0;
                let len = [
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ];
                self.payload_left = u64::from(u32::from_be_bytes(len));
            }
        }
    }

    /// Whether the stream must end now.
    fn due(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.fired {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.fired = true;
            let grace = tokio::time::Instant::now() + MAX_STREAM_AGE_GRACE;
            self.timer.as_mut().reset(grace);
        }
        self.between_messages() || self.timer.as_mut().poll(cx).is_ready()
    }
}

/// Told how each forwarded call ended, for outlier detection: the status
/// the upstream gave, or `None` when it gave none (a reset, a lost
/// connection).
pub(crate) trait Outcome: Send + Sync + std::fmt::Debug {
    fn ended(&self, code: Option<Code>);
}

impl ResponseBody {
    pub(super) fn new(recv: RecvStream, lease: Lease) -> Self {
        Self {
            recv: RecvBody::new(recv),
            failed: false,
            _lease: lease,
            extra: None,
        }
    }

    /// Tells `outcome` how the call ends, and ends it after `max_age`.
    pub(super) fn with(
        mut self,
        outcome: Option<Arc<dyn Outcome>>,
        max_age: Option<std::time::Duration>,
    ) -> Self {
        if outcome.is_some() || max_age.is_some() {
            self.extra = Some(Box::new(Extra {
                outcome,
                age: max_age.map(Age::new),
            }));
        }
        self
    }

    fn report(&mut self, code: Option<Code>) {
        if let Some(outcome) = self.extra.as_mut().and_then(|e| e.outcome.take()) {
            outcome.ended(code);
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
        if let Some(age) = self.extra.as_mut().and_then(|e| e.age.as_mut())
            && age.due(cx)
        {
            let message = format!(
                "the stream reached its route's max_stream_age ({:?}) at sluice: retry to reach a \
                 rebalanced backend",
                age.limit
            );
            self.failed = true;
            self.report(Some(Code::Ok));
            return Poll::Ready(Some(Ok(Frame::trailers(status::trailers(
                Code::Unavailable,
                &message,
            )))));
        }
        let err = match ready!(Pin::new(&mut self.recv).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(extra) = self.extra.as_mut() {
                    if let (Some(age), Some(data)) = (extra.age.as_mut(), frame.data_ref()) {
                        age.saw(data);
                    }
                    if let Some(t) = frame.trailers_ref() {
                        let code = status::code_of(t);
                        self.report(code.or(Some(Code::Unknown)));
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            None => {
                self.report(Some(Code::Ok));
                return Poll::Ready(None);
            }
            Some(Err(err)) => err,
        };
        self.failed = true;
        self.report(None);
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
