//! Sending on an h2 stream no faster than the peer's flow-control windows
//! allow: what both directions of a call do with every chunk they move.
//!
//! h2 accepts any amount of DATA and buffers what the windows do not cover
//! yet, without bound. A pump that asks for capacity for the chunk in hand
//! and sends only what was granted keeps h2's buffer empty: the chunk waits
//! in the pump, and what sluice holds for a call is bounded by the windows
//! plus that one chunk. Capacity is only ever claimed for bytes in hand, so
//! a waiting stream pins no connection window it cannot use (hyper#4003).

use std::task::{Context, Poll};

use bytes::Bytes;
use h2::SendStream;

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
