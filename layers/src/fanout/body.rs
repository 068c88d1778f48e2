//! The request body each destination gets and the response body the
//! client gets.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::{first::FirstMessage, interleave::Interleaved, mirror::MirrorBody, tee::Tee};
use crate::BoxError;

/// The request body below a [`Fanout`](super::Fanout): the client's own
/// body for a call with one destination, else that destination's copy;
/// with the destination's own first message in place of the client's when
/// the route gave it one
/// ([`Destination::with_first_message`](crate::direct::Destination::with_first_message)).
#[derive(Debug)]
pub struct RequestBody<B> {
    kind: RequestKind<B>,
    first: Option<Box<Rewrite>>,
}

/// A first-message rewrite under way.
#[derive(Debug)]
struct Rewrite {
    first: FirstMessage,
    /// Trailers held while the bytes of a cut prefix go out first.
    trailers: Option<HeaderMap>,
    /// Whether the bytes left of a cut prefix may still come.
    open: bool,
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
            first: None,
        }
    }

    pub(super) fn tee(tee: Tee) -> Self {
        Self {
            kind: RequestKind::Tee(tee),
            first: None,
        }
    }

    /// Sends `first` in place of the client's first message, if given.
    pub(super) fn with_first_message(mut self, first: Option<&Bytes>) -> Self {
        self.first = first.map(|m| {
            Box::new(Rewrite {
                first: FirstMessage::new(m.clone()),
                trailers: None,
                open: true,
            })
        });
        self
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        match &mut self.kind {
            RequestKind::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestKind::Tee(t) => t.poll_frame(cx),
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
        let this = self.get_mut();
        if this.first.is_none() {
            return this.poll_inner(cx);
        }
        loop {
            let rewrite = this.first.as_mut().expect("checked above");
            if let Some(trailers) = rewrite.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if !rewrite.open {
                return Poll::Ready(None);
            }
            let frame = std::task::ready!(this.poll_inner(cx));
            let rewrite = this.first.as_mut().expect("checked above");
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let data = rewrite.first.rewrite(data);
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        rewrite.open = false;
                        if let Some(rest) = rewrite.first.finish() {
                            rewrite.trailers = Some(trailers);
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    rewrite.open = false;
                    return Poll::Ready(rewrite.first.finish().map(|rest| Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(rewrite) = &self.first
            && (rewrite.trailers.is_some() || rewrite.open && rewrite.first.is_pending())
        {
            return false;
        }
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
            ResponseKind::Interleaved(b) => b.is_end_stream(),
            ResponseKind::Mirror(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Direct(b) => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
