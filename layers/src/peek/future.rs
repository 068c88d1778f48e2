use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, request::Parts};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{Peeked, PeekedMessage, ReplayBody};
use crate::{
    BoxError,
    grpc::{
        framing::PREFIX_LEN,
        status::{self, Code},
    },
};

pin_project! {
    /// Response future of [`Peek`](super::Peek): reads the first messages,
    /// then calls the inner service and waits for its response.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        Reading {
            reading: Option<Reading<S, B>>,
        },
        Calling {
            #[pin]
            fut: S::Future,
        },
    }
}

struct Reading<S, B> {
    inner: S,
    parts: Parts,
    body: B,
    chunks: Vec<Bytes>,
    buffered: usize,
    max_messages: usize,
    max_bytes: usize,
}

/// What the bytes read so far hold.
enum Progress {
    /// Enough messages, or the stream is over.
    Done(Peeked, Bytes, Option<usize>),
    /// More bytes needed.
    More,
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("peek::ResponseFuture")
            .finish_non_exhaustive()
    }
}

// === impl ResponseFuture ===

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    pub(super) fn calling(fut: S::Future) -> Self {
        Self {
            state: State::Calling { fut },
        }
    }

    pub(super) fn new(inner: S, req: Request<B>, max_messages: usize, max_bytes: usize) -> Self {
        let (parts, body) = req.into_parts();
        Self {
            state: State::Reading {
                reading: Some(Reading {
                    inner,
                    parts,
                    body,
                    chunks: Vec::new(),
                    buffered: 0,
                    max_messages,
                    max_bytes,
                }),
            },
        }
    }
}

/// The bytes read so far as one buffer: the chunk itself when there is one
/// (no copy), else one concatenation (bounded by the byte budget).
fn contiguous(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut all = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
            for c in many {
                all.extend_from_slice(c);
            }
            all.freeze()
        }
    }
}

/// Splits complete messages off the front of `all`.
fn parse(all: &Bytes, max_messages: usize, ended: bool) -> Progress {
    let mut messages = Vec::new();
    let mut at = 0;
    let mut first_len = None;
    while messages.len() < max_messages && all.len() >= at + PREFIX_LEN {
        let len = u32::from_be_bytes([all[at + 1], all[at + 2], all[at + 3], all[at + 4]]) as usize;
        let end = at + PREFIX_LEN + len;
        if all.len() < end {
            break;
        }
        messages.push(PeekedMessage {
            compressed: all[at] == 1,
            payload: all.slice(at + PREFIX_LEN..end),
        });
        first_len.get_or_insert(end);
        at = end;
    }
    if messages.len() == max_messages || ended {
        Progress::Done(Peeked { messages }, all.clone(), first_len)
    } else {
        Progress::More
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    RB: Default,
{
    type Output = Result<Response<RB>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Calling { fut } => return fut.poll(cx),
                StateProj::Reading { reading } => {
                    let r = reading.as_mut().expect("polled after completion");
                    let mut trailers: Option<HeaderMap> = None;
                    // Whether the request body is over, as opposed to whether
                    // the peek is: with nothing to peek, the body stays whole.
                    let mut ended = r.body.is_end_stream();
                    let mut progress = if ended || r.max_messages == 0 {
                        parse(&contiguous(&r.chunks), r.max_messages, true)
                    } else {
                        Progress::More
                    };
                    while let Progress::More = progress {
                        match ready!(Pin::new(&mut r.body).poll_frame(cx)) {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => {
                                    r.buffered += data.len();
                                    if r.buffered > r.max_bytes {
                                        return Poll::Ready(Ok(status::answer(
                                            status::Answered::PeekBudget,
                                            Code::ResourceExhausted,
                                            "request messages exceed the peek budget",
                                        )));
                                    }
                                    if !data.is_empty() {
                                        r.chunks.push(data);
                                    }
                                    ended = r.body.is_end_stream();
                                }
                                Err(frame) => {
                                    trailers = frame.into_trailers().ok();
                                    ended = true;
                                }
                            },
                            // The client went away while we read: nothing to
                            // forward; the call ends as a cancelled one.
                            Some(Err(_)) => {
                                return Poll::Ready(Ok(status::answer(
                                    status::Answered::PeekBudget,
                                    Code::Cancelled,
                                    "request body failed while peeking",
                                )));
                            }
                            None => ended = true,
                        }
                        progress = parse(&contiguous(&r.chunks), r.max_messages, ended);
                    }
                    let Progress::Done(peeked, head, first_len) = progress else {
                        unreachable!("the loop ends on Done")
                    };
                    let Reading {
                        mut inner,
                        mut parts,
                        body,
                        ..
                    } = reading.take().expect("taken once");
                    parts.extensions.insert(peeked);
                    let rest = (!ended).then_some(body);
                    let req = Request::from_parts(
                        parts,
                        ReplayBody::new(head, first_len, trailers, rest),
                    );
                    state.set(State::Calling {
                        fut: inner.call(req),
                    });
                }
            }
        }
    }
}
