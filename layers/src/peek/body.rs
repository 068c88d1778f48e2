use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A request body that replays the bytes [`Peek`](super::Peek) read,
    /// then streams the rest of the original body on.
    #[derive(Debug)]
    pub struct ReplayBody<B> {
        head: VecDeque<Bytes>,
        // The length of the first message with its prefix, at the front of
        // `head`, for `replace_first_message`.
        first_len: Option<usize>,
        trailers: Option<HeaderMap>,
        // The share of the connection's peek budget the head holds, given
        // back once it is replayed.
        reservation: Option<super::Reservation>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B> ReplayBody<B> {
    pub(super) fn new(
        head: Bytes,
        first_len: Option<usize>,
        trailers: Option<HeaderMap>,
        rest: Option<B>,
    ) -> Self {
        let mut chunks = VecDeque::with_capacity(3);
        if !head.is_empty() {
            chunks.push_back(head);
        }
        Self {
            head: chunks,
            first_len,
            trailers,
            reservation: None,
            rest,
        }
    }

    pub(super) fn holding(mut self, reservation: super::Reservation) -> Self {
        self.reservation = Some(reservation);
        self
    }

    /// A body with nothing to replay around `body`.
    pub fn passthrough(body: B) -> Self {
        Self::new(Bytes::new(), None, None, Some(body))
    }

    /// Replaces the first message (the one that was peeked) with `payload`,
    /// keeping its compressed flag at 0; the rest is untouched. Does nothing
    /// if the stream had no message. This is how a director rewrites the
    /// first request message per destination.
    pub fn replace_first_message(&mut self, payload: &Bytes) {
        let Some(first_len) = self.first_len.take() else {
            return;
        };
        let Some(head) = self.head.pop_front() else {
            return;
        };
        let mut prefix = BytesMut::with_capacity(5);
        prefix.put_u8(0);
        prefix.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
        let rest = head.slice(first_len.min(head.len())..);
        if !rest.is_empty() {
            self.head.push_front(rest);
        }
        self.head.push_front(payload.clone());
        self.head.push_front(prefix.freeze());
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(chunk) = this.head.pop_front() {
            if this.head.is_empty() {
                *this.reservation = None;
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match this.rest.as_pin_mut() {
            Some(rest) => rest.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head: u64 = self.head.iter().map(|c| c.len() as u64).sum();
        let mut hint = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        hint.set_lower(hint.lower() + head);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}
