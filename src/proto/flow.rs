//! Flow control as both directions of a call use it: sending on an h2
//! stream no faster than the peer's windows allow ([`Outgoing`]), and
//! receiving without giving window back before a chunk is passed on
//! ([`RecvBody`]).
//!
//! h2 accepts any amount of DATA and buffers what the windows do not cover
//! yet, without bound. A pump that asks for capacity for the chunk in hand
//! and sends only what was granted keeps h2's buffer empty: the chunk waits
//! in the pump, and what sluice holds for a call is bounded by the windows
//! plus that one chunk. Capacity is only ever claimed for bytes in hand, so
//! a waiting stream pins no connection window it cannot use (hyper#4003).

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};

/// A chunk on its way out: DATA, and whether it ends the stream.
#[derive(Debug)]
pub(crate) struct Outgoing {
    data: Bytes,
    end_of_stream: bool,
}

/// How far [`Outgoing::poll_send`] got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// All of it is with h2 (and, with end of stream, the stream is ended).
    All,
    /// The stream is gone (reset or closed): nothing more can be sent.
    Gone,
}

impl Outgoing {
    pub(crate) fn new(data: Bytes, end_of_stream: bool) -> Self {
        Self {
            data,
            end_of_stream,
        }
    }

    pub(crate) fn ends_stream(&self) -> bool {
        self.end_of_stream
    }

    /// Sends as much of the chunk as the windows allow. `Pending` when the
    /// windows are spent with bytes left (the task is woken when h2 grants
    /// more); `progressed` says whether any byte went out in this call.
    pub(crate) fn poll_send(
        &mut self,
        tx: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
        progressed: &mut bool,
    ) -> Poll<Sent> {
        loop {
            if self.data.is_empty() {
                // Nothing left but, perhaps, the end of the stream: an empty
                // DATA frame costs no window.
                if self.end_of_stream && tx.send_data(Bytes::new(), true).is_err() {
                    return Poll::Ready(Sent::Gone);
                }
                return Poll::Ready(Sent::All);
            }
            let mut room = tx.capacity();
            if room == 0 {
                tx.reserve_capacity(self.data.len());
                match tx.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(Sent::Gone),
                    Poll::Pending => {}
                }
                room = tx.capacity();
                if room == 0 {
                    return Poll::Pending;
                }
            }
            let (chunk, last) = if room >= self.data.len() {
                (std::mem::take(&mut self.data), self.end_of_stream)
            } else {
                (self.data.split_to(room), false)
            };
            *progressed = true;
            if tx.send_data(chunk, last).is_err() {
                return Poll::Ready(Sent::Gone);
            }
            if last {
                return Poll::Ready(Sent::All);
            }
        }
    }
}

/// A received body, either way: DATA and trailers as h2 receives them.
///
/// The flow-control window for a chunk is given back to the sender when the
/// consumer asks for the next frame, by which time it has passed the chunk
/// on (a pump sends it within the other peer's windows first), or when the
/// body is dropped. So what a call holds of a sender's data is bounded by
/// the stream window it gave that sender, the chunk in hand included.
#[derive(Debug)]
pub(crate) struct RecvBody {
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

impl RecvBody {
    pub(crate) fn new(recv: RecvStream) -> Self {
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

impl Drop for RecvBody {
    fn drop(&mut self) {
        self.release();
    }
}

impl Body for RecvBody {
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
