use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, request::Parts};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{ConnectionBudget, Peek, PeekLayer, Peeked, PeekedMessage, ReplayBody, Reservation};
use crate::{
    BoxError,
    grpc::{
        framing::{MessageCounter, PREFIX_LEN},
        status::{self, Code},
        timeout,
    },
};

/// Chunks shorter than this are gathered into one buffer, so one-byte DATA
/// frames cost a byte each, not a queue entry each.
const SMALL_CHUNK: usize = 512;

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
    /// Future of [`MakePeek`](super::MakePeek): the wrapped make-service's
    /// future, whose service it wraps in a [`Peek`](super::Peek) with a
    /// fresh [`ConnectionBudget`].
    pub struct MakeFuture<F> {
        #[pin]
        inner: F,
        layer: Option<Arc<PeekLayer>>,
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
    /// Small chunks being gathered, behind every one in `chunks`.
    tail: BytesMut,
    buffered: usize,
    /// Message boundaries in the bytes so far, counted as they arrive (so
    /// the work is linear in the bytes, whatever the chunk sizes).
    counter: MessageCounter,
    started: usize,
    max_messages: usize,
    max_bytes: usize,
    max_bytes_per_connection: usize,
    reservation: Reservation,
    /// The end of the wait for the messages.
    timer: Pin<Box<Sleep>>,
    /// The client's `grpc-timeout`, and when the peek began.
    budget: Option<(Duration, Instant)>,
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

impl<F> std::fmt::Debug for MakeFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("peek::MakeFuture").finish_non_exhaustive()
    }
}

// === impl MakeFuture ===

impl<F> MakeFuture<F> {
    pub(super) fn new(inner: F, layer: Arc<PeekLayer>) -> Self {
        Self {
            inner,
            layer: Some(layer),
        }
    }
}

impl<F, S, E> Future for MakeFuture<F>
where
    F: Future<Output = Result<S, E>>,
{
    type Output = Result<Peek<S>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let svc = ready!(this.inner.poll(cx))?;
        let layer = this.layer.take().expect("polled after completion");
        Poll::Ready(Ok(Peek::shared(svc, layer, ConnectionBudget::new())))
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

    pub(super) fn new(
        inner: S,
        req: Request<B>,
        layer: &PeekLayer,
        budget: ConnectionBudget,
    ) -> Self {
        let (parts, body) = req.into_parts();
        let sent = timeout::from_headers(&parts.headers);
        let now = Instant::now();
        let wait = sent.map_or(layer.max_wait, |t| t.min(layer.max_wait));
        Self {
            state: State::Reading {
                reading: Some(Reading {
                    inner,
                    parts,
                    body,
                    chunks: Vec::new(),
                    tail: BytesMut::new(),
                    buffered: 0,
                    counter: MessageCounter::default(),
                    started: 0,
                    max_messages: layer.max_messages,
                    max_bytes: layer.max_bytes,
                    max_bytes_per_connection: layer.max_bytes_per_connection,
                    reservation: Reservation::new(budget),
                    timer: Box::pin(tokio::time::sleep_until(now + wait)),
                    budget: sent.map(|t| (t, now)),
                }),
            },
        }
    }
}

impl<S, B> Reading<S, B> {
    /// Takes a chunk in; `false` when a budget would be passed.
    fn push(&mut self, data: Bytes) -> bool {
        self.buffered += data.len();
        if self.buffered > self.max_bytes
            || !self
                .reservation
                .take(data.len(), self.max_bytes_per_connection)
        {
            return false;
        }
        self.started += self.counter.push(&data);
        if data.len() < SMALL_CHUNK {
            self.tail.extend_from_slice(&data);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push(self.tail.split().freeze());
            }
            self.chunks.push(data);
        }
        true
    }

    /// Whether the wanted messages are all in.
    fn complete(&self) -> bool {
        let whole = self.started - usize::from(self.counter.in_payload());
        whole >= self.max_messages
    }

    /// The bytes read so far as one buffer: the chunk itself when there is
    /// one (no copy), else one concatenation, once.
    fn contiguous(&mut self) -> Bytes {
        if !self.tail.is_empty() {
            self.chunks.push(self.tail.split().freeze());
        }
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut all = BytesMut::with_capacity(self.buffered);
                for c in many {
                    all.extend_from_slice(c);
                }
                all.freeze()
            }
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
                    while !ended && !r.complete() {
                        if r.timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Ok(status::answer(
                                status::Answered::Deadline,
                                Code::DeadlineExceeded,
                                "the first request messages did not come in time",
                            )));
                        }
                        match ready!(Pin::new(&mut r.body).poll_frame(cx)) {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => {
                                    if !r.push(data) {
                                        return Poll::Ready(Ok(status::answer(
                                            status::Answered::PeekBudget,
                                            Code::ResourceExhausted,
                                            "request messages exceed the peek budget",
                                        )));
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
                    }
                    let all = r.contiguous();
                    let progress = parse(&all, r.max_messages, true);
                    let Progress::Done(peeked, head, first_len) = progress else {
                        unreachable!("the loop ends on Done")
                    };
                    let Reading {
                        mut inner,
                        mut parts,
                        body,
                        reservation,
                        budget,
                        ..
                    } = reading.take().expect("taken once");
                    parts.extensions.insert(peeked);
                    // The deadline runs from the client's send: pass on
                    // what the wait left of it.
                    if let Some((sent, since)) = budget {
                        let left = sent.saturating_sub(since.elapsed());
                        parts.headers.insert(
                            timeout::GRPC_TIMEOUT,
                            timeout::encode(left.max(Duration::from_millis(1))),
                        );
                    }
                    let rest = (!ended).then_some(body);
                    let req = Request::from_parts(
                        parts,
                        ReplayBody::new(head, first_len, trailers, rest).holding(reservation),
                    );
                    state.set(State::Calling {
                        fut: inner.call(req),
                    });
                }
            }
        }
    }
}
