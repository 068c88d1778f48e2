//! Per-connection bookkeeping that hyper does not do for HTTP/2: how many
//! calls are in flight (for the idle and first-request timeouts) and how
//! many calls the client has cancelled lately (rapid reset on streams that
//! were already accepted, which h2's pending-accept count cannot see).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::{sync::Notify, time::Instant};

/// The state one connection task and its calls share.
#[derive(Debug)]
pub(crate) struct ConnState {
    start: Instant,
    active: AtomicUsize,
    /// Milliseconds since `start` when the last call ended (or 0).
    idle_since_ms: AtomicU64,
    seen_request: AtomicBool,
    /// Wakes the connection task when the connection goes idle or when the
    /// client has reset too many calls.
    changed: Notify,
    max_resets_per_second: u32,
    reset_window_ms: AtomicU64,
    resets_in_window: AtomicU32,
    too_many_resets: AtomicBool,
}

impl ConnState {
    pub(crate) fn new(max_resets_per_second: u32) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            seen_request: AtomicBool::new(false),
            changed: Notify::new(),
            max_resets_per_second,
            reset_window_ms: AtomicU64::new(0),
            resets_in_window: AtomicU32::new(0),
            too_many_resets: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn call_started(self: &Arc<Self>) -> CallGuard {
        self.seen_request.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        CallGuard {
            conn: self.clone(),
            finished: false,
        }
    }

    fn call_ended(&self, cancelled_by_client: bool) {
        if cancelled_by_client {
            self.record_reset();
        }
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn record_reset(&self) {
        let now = self.now_ms();
        let window = self.reset_window_ms.load(Ordering::Relaxed);
        if now.saturating_sub(window) >= 1000 {
            self.reset_window_ms.store(now, Ordering::Relaxed);
            self.resets_in_window.store(1, Ordering::Relaxed);
            return;
        }
        let n = self.resets_in_window.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.max_resets_per_second && !self.too_many_resets.swap(true, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// When the connection is due to be closed for doing nothing, if it is
    /// idle: the first-request deadline before any request, the idle
    /// deadline after.
    pub(crate) fn idle_deadline(&self, handshake: Duration, idle: Duration) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.seen_request.load(Ordering::Relaxed) {
            return Some(self.start + handshake);
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.start + since + idle)
    }

    pub(crate) fn too_many_resets(&self) -> bool {
        self.too_many_resets.load(Ordering::Acquire)
    }

    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// One call on the connection; ends (as finished or as cancelled by the
/// client) when its response body ends or is dropped.
#[derive(Debug)]
pub(crate) struct CallGuard {
    conn: Arc<ConnState>,
    finished: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.conn.call_ended(!self.finished);
    }
}

pin_project! {
    /// Wraps the stack's response future so the call's guard moves into
    /// the response body.
    #[derive(Debug)]
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<CallGuard>,
    }
}

impl<F> TrackedFuture<F> {
    pub(crate) fn new(inner: F, guard: CallGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx));
        let mut guard = this.guard.take().expect("polled after completion");
        match res {
            Ok(res) => {
                // A trailers-only answer is over already.
                guard.finished = res.body().is_end_stream();
                Poll::Ready(Ok(res.map(|body| Tracked { body, guard })))
            }
            Err(e) => {
                // An error becomes a reset by sluice, not by the client.
                guard.finished = true;
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project! {
    /// A response body that ends its call when it ends, or (dropped
    /// early) counts the call as cancelled by the client.
    #[derive(Debug)]
    pub(crate) struct Tracked<B> {
        #[pin]
        body: B,
        guard: CallGuard,
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.body.as_mut().poll_frame(cx));
        // hyper stops polling once it has sent the trailers, or a DATA frame
        // after which the body says it is over: those end the call too.
        let finished = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(f)) => f.is_trailers() || this.body.is_end_stream(),
        };
        if finished {
            this.guard.finished = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
