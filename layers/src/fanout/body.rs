//! The request body each destination gets and the response body the
//! client gets.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::{interleave::Interleaved, mirror::MirrorBody, tee::Tee};
use crate::BoxError;

/// The request body below a [`Fanout`](super::Fanout): the client's own
/// body for a call with one destination, else that destination's copy.
#[derive(Debug)]
pub struct RequestBody<B> {
    kind: RequestKind<B>,
}

#[derive(Debug)]
enum RequestKind<B> {
    Direct(B),
    Tee(Tee),
}

impl<B> RequestBody<B> {
    pub(super) fn direct(body: B) -> Self {
        Self {
            kind: RequestKind::Direct(body),
        }
    }

    pub(super) fn tee(tee: Tee) -> Self {
        Self {
            kind: RequestKind::Tee(tee),
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            RequestKind::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestKind::Tee(t) => t.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Direct(b) => b.is_end_stream(),
            RequestKind::Tee(t) => t.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Direct(b) => b.size_hint(),
            RequestKind::Tee(_) => SizeHint::default(),
        }
    }
}

/// The response body of a [`Fanout`](super::Fanout): the inner body for a
/// call with one destination, a merged reply, the interleaved replies of a
/// streaming fan-out, or a mirror's primary.
#[derive(Debug)]
pub struct ResponseBody<B> {
    kind: ResponseKind<B>,
}

#[derive(Debug)]
enum ResponseKind<B> {
    Direct(B),
    Merged {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Interleaved(Box<Interleaved>),
    Mirror(Box<MirrorBody<B>>),
}

impl<B> Default for ResponseBody<B> {
    /// An empty body (for a trailers-only answer).
    fn default() -> Self {
        Self::merged(None, None)
    }
}

impl<B> ResponseBody<B> {
    pub(super) fn direct(body: B) -> Self {
        Self {
            kind: ResponseKind::Direct(body),
        }
    }

    pub(super) fn merged(data: Option<Bytes>, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: ResponseKind::Merged { data, trailers },
        }
    }

    pub(super) fn interleaved(body: Interleaved) -> Self {
        Self {
            kind: ResponseKind::Interleaved(Box::new(body)),
        }
    }

    pub(super) fn mirror(body: MirrorBody<B>) -> Self {
        Self {
            kind: ResponseKind::Mirror(Box::new(body)),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            ResponseKind::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ResponseKind::Merged { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ResponseKind::Interleaved(b) => b.poll_frame(cx),
            ResponseKind::Mirror(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Direct(b) => b.is_end_stream(),
            ResponseKind::Merged { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Interleaved(_) | ResponseKind::Mirror(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Direct(b) => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
