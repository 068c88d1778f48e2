//! A call's request body, kept while the call may still be sent again.
//!
//! Every chunk read from the client is kept (by reference count: the bytes
//! are not copied) until the call is *committed*: response headers that
//! are not a trailers-only answer reached the client, or the kept bytes
//! would pass `retry.buffer_per_call` for this call or `retry.buffer_total`
//! for the process. Until then [`Replay::rewind`] makes the body give the
//! same chunks again, then go on reading the client. So what retries make
//! sluice hold is at most `min(buffer_total, calls in flight ×
//! buffer_per_call)`, plus the read buffers those chunks share.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use sluice_layers::BoxError;

/// The process-wide bound on kept request bytes (`retry.buffer_total`),
/// shared by every stack a reload builds.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    held: AtomicUsize,
}

impl Budget {
    /// Bytes kept now, all calls together.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize, max: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|t| *t <= max)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// How much a call may keep: its own bound, and the process's.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) per_call: usize,
    pub(crate) total: usize,
    pub(crate) budget: Arc<Budget>,
}

/// The chunks a body keeps: most requests are one chunk, kept without a
/// `Vec` of their own.
#[derive(Clone, Debug, Default)]
enum Chunks {
    #[default]
    None,
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Chunks {
    fn len(&self) -> usize {
        match self {
            Self::None => 0,
            Self::One(_) => 1,
            Self::Many(v) => v.len(),
        }
    }

    fn get(&self, i: usize) -> Option<&Bytes> {
        match self {
            Self::One(b) if i == 0 => Some(b),
            Self::Many(v) => v.get(i),
            _ => None,
        }
    }

    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::take(self) {
            Self::None => Self::One(chunk),
            Self::One(first) => Self::Many(vec![first, chunk]),
            Self::Many(mut v) => {
                v.push(chunk);
                Self::Many(v)
            }
        };
    }

    /// Forgets the first `n` chunks.
    fn drop_front(&mut self, n: usize) {
        match self {
            Self::One(_) if n > 0 => *self = Self::None,
            Self::Many(v) => {
                v.drain(..n.min(v.len()));
            }
            _ => {}
        }
    }

    fn clear(&mut self) {
        *self = Self::None;
    }

    /// The bytes of the chunks from `i` on.
    fn bytes_from(&self, i: usize) -> u64 {
        match self {
            Self::None => 0,
            Self::One(b) => {
                if i == 0 {
                    b.len() as u64
                } else {
                    0
                }
            }
            Self::Many(v) => v.iter().skip(i).map(|c| c.len() as u64).sum(),
        }
    }
}

/// The request body of one call, replayable until committed.
#[derive(Debug)]
pub(crate) struct Replay<B> {
    inner: B,
    /// The client's body has ended (its last frame or trailers were read).
    inner_done: bool,
    kept: Chunks,
    trailers: Option<HeaderMap>,
    /// The next kept chunk to give; `kept.len()`: read the client.
    at: usize,
    trailers_given: bool,
    /// Bytes kept, counted in the budget; `None` once committed.
    keeping: Option<usize>,
    limits: Limits,
}

impl<B> Replay<B> {
    pub(crate) fn new(inner: B, limits: Limits) -> Self {
        Self {
            inner,
            inner_done: false,
            kept: Chunks::None,
            trailers: None,
            at: 0,
            trailers_given: false,
            keeping: Some(0),
            limits,
        }
    }

    /// Starts the body again from its first chunk, for another attempt;
    /// false when it was committed (what was read is gone).
    pub(crate) fn rewind(&mut self) -> bool {
        if self.keeping.is_none() {
            return false;
        }
        self.at = 0;
        self.trailers_given = false;
        true
    }

    /// Whether it can still be rewound.
    pub(crate) fn replayable(&self) -> bool {
        self.keeping.is_some()
    }

    /// Whether the client's whole body has been read and kept: another
    /// attempt can start from it alone (what a hedge needs).
    pub(crate) fn complete(&self) -> bool {
        self.inner_done && self.keeping.is_some()
    }

    /// Reads the client's body ahead, giving it to no one: what is read
    /// stays owed to the next reader, kept or not. Resolves to `Ok(true)`
    /// once the whole body is read and kept, `Ok(false)` when it could not
    /// all be kept (the call is committed; nothing read is lost), and
    /// `Err` when the client's body failed.
    pub(crate) async fn read_ahead(&mut self) -> Result<bool, BoxError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        std::future::poll_fn(|cx| {
            loop {
                if self.inner_done {
                    return Poll::Ready(Ok(self.keeping.is_some()));
                }
                match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) if data.is_empty() => {}
                        Ok(data) => {
                            let n = data.len();
                            if let Some(held) = self.keeping {
                                if held + n <= self.limits.per_call
                                    && self.limits.budget.take(n, self.limits.total)
                                {
                                    self.keeping = Some(held + n);
                                } else {
                                    self.commit();
                                }
                            }
                            // Owed either way: `at` does not move.
                            self.kept.push(data);
                            if self.keeping.is_none() {
                                return Poll::Ready(Ok(false));
                            }
                        }
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                self.inner_done = true;
                                self.trailers = Some(trailers);
                                self.trailers_given = false;
                            }
                        }
                    },
                    Some(Err(e)) => {
                        self.commit();
                        return Poll::Ready(Err(e.into()));
                    }
                    None => {
                        self.inner_done = true;
                        self.trailers_given = self.trailers.is_none();
                    }
                }
            }
        })
        .await
    }

    /// A copy of a complete body, from its start, for a hedged attempt.
    pub(crate) fn snapshot(&self) -> Option<Replay<http_body_util::Empty<Bytes>>> {
        self.complete().then(|| Replay {
            inner: http_body_util::Empty::new(),
            inner_done: true,
            kept: self.kept.clone(),
            trailers: self.trailers.clone(),
            at: 0,
            trailers_given: false,
            // The original counts the bytes; the copy shares them.
            keeping: Some(0),
            limits: self.limits.clone(),
        })
    }

    /// Stops keeping: the call will not be sent again.
    pub(crate) fn commit(&mut self) {
        if let Some(held) = self.keeping.take() {
            self.limits.budget.give(held);
        }
        // Chunks not yet given again are still owed to this attempt.
        self.kept.drop_front(self.at);
        self.at = 0;
        self.trailers = self.trailers.take().filter(|_| !self.trailers_given);
    }

    fn keep(&mut self, chunk: &Bytes) {
        let Some(held) = self.keeping else {
            return;
        };
        let n = chunk.len();
        if n == 0 {
            // Nothing to give again (an empty last DATA frame).
            return;
        }
        let fits =
            held + n <= self.limits.per_call && self.limits.budget.take(n, self.limits.total);
        if fits {
            self.kept.push(chunk.clone());
            self.at = self.kept.len();
            self.keeping = Some(held + n);
        } else {
            self.commit();
        }
    }
}

impl<B> Drop for Replay<B> {
    fn drop(&mut self) {
        if let Some(held) = self.keeping.take() {
            self.limits.budget.give(held);
        }
    }
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.kept.get(this.at) {
            this.at += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if this.inner_done {
            if this.trailers_given {
                return Poll::Ready(None);
            }
            this.trailers_given = true;
            return Poll::Ready(this.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    this.keep(&data);
                    if this.keeping.is_none() {
                        this.kept.clear();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    if let Some(t) = frame.trailers_ref() {
                        this.inner_done = true;
                        this.trailers_given = true;
                        if this.keeping.is_some() {
                            this.trailers = Some(t.clone());
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Some(Err(e)) => {
                // The client's body failed: nothing can be replayed.
                this.commit();
                this.kept.clear();
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.inner_done = true;
                this.trailers_given = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.at < self.kept.len() {
            return false;
        }
        if self.inner_done {
            return self.trailers_given || self.trailers.is_none();
        }
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let kept = self.kept.bytes_from(self.at);
        if self.inner_done {
            return SizeHint::with_exact(kept);
        }
        let mut hint = self.inner.size_hint();
        hint.set_lower(hint.lower() + kept);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn limits(per_call: usize, total: usize) -> Limits {
        Limits {
            per_call,
            total,
            budget: Arc::default(),
        }
    }

    fn body(
        chunks: &[&'static str],
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(tokio_stream::iter(frames))
    }

    async fn read<B: Body<Data = Bytes> + Unpin>(b: &mut B) -> Vec<Bytes>
    where
        B::Error: std::fmt::Debug,
    {
        let mut out = Vec::new();
        while let Some(frame) = b.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                out.push(data);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_rewound_body_gives_the_same_chunks_and_frees_them_on_commit() {
        let l = limits(100, 1000);
        let budget = l.budget.clone();
        let mut b = Replay::new(body(&["ab", "cd"]), l);
        assert_eq!(read(&mut b).await, ["ab", "cd"]);
        assert_eq!(budget.held(), 4);
        assert!(b.rewind());
        assert_eq!(read(&mut b).await, ["ab", "cd"]);
        assert!(b.complete());
        let copy = b.snapshot().expect("complete");
        b.commit();
        assert_eq!(budget.held(), 0);
        assert!(!b.rewind());
        let mut copy = copy;
        assert_eq!(read(&mut copy).await, ["ab", "cd"]);
    }

    #[tokio::test]
    async fn a_body_past_its_bound_is_committed_and_still_whole() {
        for (per_call, total) in [(3, 1000), (100, 3)] {
            let l = limits(per_call, total);
            let budget = l.budget.clone();
            let mut b = Replay::new(body(&["ab", "cd", "ef"]), l);
            assert_eq!(read(&mut b).await, ["ab", "cd", "ef"]);
            assert!(!b.replayable(), "{per_call} {total}");
            assert_eq!(budget.held(), 0);
        }
    }

    #[tokio::test]
    async fn a_body_read_ahead_past_its_bound_loses_nothing() {
        for (per_call, total) in [(3, 1000), (100, 0)] {
            let l = limits(per_call, total);
            let budget = l.budget.clone();
            let mut b = Replay::new(body(&["ab", "cd", "ef"]), l);
            assert!(!b.read_ahead().await.expect("read"), "{per_call} {total}");
            assert_eq!(budget.held(), 0);
            assert_eq!(read(&mut b).await, ["ab", "cd", "ef"], "{per_call} {total}");
        }
        let mut b = Replay::new(body(&["ab", "cd"]), limits(100, 1000));
        assert!(b.read_ahead().await.expect("read"), "whole and kept");
        let mut copy = b.snapshot().expect("complete");
        assert_eq!(read(&mut copy).await, ["ab", "cd"]);
        assert_eq!(read(&mut b).await, ["ab", "cd"]);
    }

    #[tokio::test]
    async fn a_half_read_body_rewinds_then_reads_on() {
        let mut b = Replay::new(body(&["ab", "cd"]), limits(100, 1000));
        let first = b.frame().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"ab")));
        assert!(b.rewind());
        assert_eq!(read(&mut b).await, ["ab", "cd"]);
    }
}
