//! Write coalescing for HTTP/2 connections: one socket write per poll of a
//! connection, not one per frame.
//!
//! h2 encodes frames into a buffer of its own, but it flushes that buffer
//! to the socket before every DATA frame of 256 bytes or more (it chains
//! such a payload to the buffer instead of copying it, and has room for one
//! chained payload at a time). A proxy of small gRPC calls then makes a
//! `writev` per message in each direction, and on loopback the kernel's
//! share of that (43 % of a plain forwarder's CPU) is the largest cost.
//!
//! [`BatchIo`] sits between h2 and the transport: small writes are copied
//! into one buffer and h2's flushes return at once; the connection's driver
//! ([`Flushed`]) writes the buffer out after each poll of the connection,
//! when every frame that poll produced is in it. Large payloads (a 16 KiB
//! DATA frame of a stream) are not copied: they go out at once, in one
//! vectored write together with whatever is buffered before them.
//!
//! The buffer holds at most [`HIGH_WATER`] bytes (a write is copied only
//! when it fits); past that a writer waits for the socket, which is how a
//! peer that stops reading pushes back on h2.
//!
//! The same type replays bytes a sniffer read ahead ([`BatchIo::with_prefix`]),
//! so that the protocol can be decided by reading (an event to wait for)
//! instead of peeking.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes at least this large are not copied into the buffer.
pub(crate) const DIRECT_WRITE: usize = 4 * 1024;
/// Most bytes buffered before a writer has to wait for the socket.
pub(crate) const HIGH_WATER: usize = 64 * 1024;
/// Most slices one vectored write passes on.
const MAX_SLICES: usize = 16;

/// A transport whose small writes are coalesced until its [`Flusher`]
/// writes them out. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct BatchIo<T> {
    shared: Arc<Mutex<Inner<T>>>,
}

/// The driver's handle on a [`BatchIo`]: writes out what is buffered.
#[derive(Debug)]
pub(crate) struct Flusher<T> {
    shared: Arc<Mutex<Inner<T>>>,
}

#[derive(Debug)]
struct Inner<T> {
    io: T,
    /// Bytes read ahead by whoever handed the transport over, served to the
    /// first reads.
    prefix: Bytes,
    out: Vec<u8>,
    /// How much of `out` has been written.
    written: usize,
}

pin_project! {
    /// Drives a connection future, then writes out what its poll buffered
    /// (see [`Flusher::poll_flush_batched`]).
    #[derive(Debug)]
    pub(crate) struct Flushed<F, T> {
        #[pin]
        inner: F,
        flusher: Flusher<T>,
        deferred: bool,
    }
}

/// Wraps `io`; the returned [`Flusher`] must be polled after every poll of
/// whatever writes to the [`BatchIo`] (see [`Flushed`]).
pub(crate) fn new<T>(io: T) -> (BatchIo<T>, Flusher<T>) {
    BatchIo::with_prefix(io, Bytes::new())
}

// === impl BatchIo ===

impl<T> BatchIo<T> {
    /// Like [`new`], with `prefix` served before anything read from `io`.
    pub(crate) fn with_prefix(io: T, prefix: Bytes) -> (Self, Flusher<T>) {
        let shared = Arc::new(Mutex::new(Inner {
            io,
            prefix,
            out: Vec::new(),
            written: 0,
        }));
        (
            Self {
                shared: shared.clone(),
            },
            Flusher { shared },
        )
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        lock(&self.shared)
    }
}

fn lock<T>(shared: &Mutex<Inner<T>>) -> MutexGuard<'_, Inner<T>> {
    // A panic while holding the lock leaves nothing half-done that matters
    // more than the connection, which is gone with the panicking task.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        if !inner.prefix.is_empty() {
            let n = inner.prefix.len().min(buf.remaining());
            buf.put_slice(&inner.prefix[..n]);
            inner.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut inner.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.lock().write(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.lock().write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Returns at once: the driver writes the buffer out after the poll.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        ready!(inner.poll_drain(cx))?;
        Pin::new(&mut inner.io).poll_shutdown(cx)
    }
}

// === impl Inner ===

impl<T: AsyncWrite + Unpin> Inner<T> {
    fn buffered(&self) -> usize {
        self.out.len() - self.written
    }

    fn advance(&mut self, n: usize) {
        self.written += n;
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        }
    }

    fn copy(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        let mut total = 0;
        for b in bufs {
            self.out.extend_from_slice(b);
            total += b.len();
        }
        total
    }

    fn write(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let fits = self.buffered() + total <= HIGH_WATER;
        if total < DIRECT_WRITE && fits {
            return Poll::Ready(Ok(self.copy(bufs)));
        }
        // Large, or the buffer is full: what is buffered and these bytes
        // go out in one vectored write.
        loop {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            slices[0] = IoSlice::new(&self.out[self.written..]);
            let mut count = 1;
            for b in bufs.iter().take(MAX_SLICES - 1) {
                slices[count] = *b;
                count += 1;
            }
            let pending = self.buffered();
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.advance(n.min(pending));
                    if n > pending {
                        return Poll::Ready(Ok(n - pending));
                    }
                    // Only buffered bytes went out: go again.
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if self.buffered() + total <= HIGH_WATER => {
                    return Poll::Ready(Ok(self.copy(bufs)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.buffered() > 0 {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

// === impl Flusher ===

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Writes out what is buffered; `Pending` until the socket took it all
    /// (the task is woken when it can take more).
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = lock(&self.shared);
        ready!(inner.poll_drain(cx))?;
        Pin::new(&mut inner.io).poll_flush(cx)
    }
}

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Like [`Flusher::poll_flush`], but the first time there is something
    /// to write it only reschedules the task: the tasks already runnable go
    /// first, and what they hand this connection goes out in the same
    /// write. `deferred` is the caller's memory of having done so.
    pub(crate) fn poll_flush_batched(
        &self,
        cx: &mut Context<'_>,
        deferred: &mut bool,
    ) -> Poll<io::Result<()>> {
        if lock(&self.shared).buffered() == 0 {
            *deferred = false;
            return Poll::Ready(Ok(()));
        }
        if !*deferred {
            *deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        *deferred = false;
        self.poll_flush(cx)
    }

    /// Drives `fut` (a handshake, a connection) and writes out what each
    /// of its polls buffered.
    pub(crate) async fn around<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let out = fut.as_mut().poll(cx);
            let _ = self.poll_flush(cx);
            out
        })
        .await
    }

    /// Gives back the buffer's memory, if it is empty (for an idle
    /// connection).
    pub(crate) fn shrink(&self) {
        let mut inner = lock(&self.shared);
        if inner.buffered() == 0 && inner.out.capacity() > 0 {
            inner.out = Vec::new();
            inner.written = 0;
        }
    }
}

// === impl Flushed ===

impl<F, T> Flushed<F, T> {
    pub(crate) fn new(inner: F, flusher: Flusher<T>) -> Self {
        Self {
            inner,
            flusher,
            deferred: false,
        }
    }

    pub(crate) fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().inner
    }
}

impl<F, T> Future for Flushed<F, T>
where
    F: Future,
    T: AsyncWrite + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = this.inner.poll(cx);
        // A write error shows up to the connection on its next write or
        // read as well; here it only stops the flush.
        if out.is_ready() {
            let _ = this.flusher.poll_flush(cx);
        } else {
            let _ = this.flusher.poll_flush_batched(cx, this.deferred);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_writes_wait_for_the_flusher_and_large_ones_go_at_once() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (mut io, flusher) = new(a);
        io.write_all(b"head").await.expect("write");
        io.write_all(b"-more").await.expect("write");
        io.flush().await.expect("flush is deferred");
        let mut buf = [0u8; 64];
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut buf));
        assert!(
            nothing.await.is_err(),
            "nothing reached the peer before the flusher ran"
        );
        std::future::poll_fn(|cx| flusher.poll_flush(cx))
            .await
            .expect("flush");
        let n = b.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"head-more");

        // A large write takes what is buffered with it, in order.
        io.write_all(b"small").await.expect("write");
        let large = vec![7u8; DIRECT_WRITE];
        io.write_all(&large).await.expect("write");
        let mut got = vec![0u8; 5 + DIRECT_WRITE];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..5], b"small");
        assert!(got[5..].iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn a_prefix_is_read_before_the_transport() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut io, _flusher) = BatchIo::with_prefix(a, Bytes::from_static(b"PRI"));
        b.write_all(b" * HTTP").await.expect("write");
        let mut buf = vec![0u8; 10];
        io.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"PRI * HTTP");
    }

    #[tokio::test]
    async fn a_full_buffer_makes_writers_wait_for_the_peer() {
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut io, flusher) = new(a);
        let chunk = vec![1u8; DIRECT_WRITE - 1];
        let mut accepted = 0;
        // The transport takes 1 KiB; the buffer HIGH_WATER more.
        while accepted < 2 * HIGH_WATER {
            let write = io.write(&chunk);
            match tokio::time::timeout(std::time::Duration::from_millis(20), write).await {
                Ok(n) => accepted += n.expect("write"),
                Err(_) => break,
            }
        }
        assert!(accepted <= HIGH_WATER + 1024 + DIRECT_WRITE, "{accepted}");
        assert!(accepted >= HIGH_WATER - DIRECT_WRITE, "{accepted}");
        // Reading on the other side lets the flusher finish.
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0;
            while total < accepted {
                total += b.read(&mut sink).await.expect("read");
            }
            total
        });
        std::future::poll_fn(|cx| flusher.poll_flush(cx))
            .await
            .expect("flush");
        assert_eq!(reader.await.expect("reader"), accepted);
    }
}
