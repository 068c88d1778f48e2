//! Live counts of what sluice holds open, read by tests (leak checks) and,
//! later, by the admin endpoint. Each count moves through an RAII guard, so
//! it comes back down however the thing it counts ends.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Notify;

/// A snapshot of sluice's live counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Downstream connections being served.
    pub downstream_connections: usize,
    /// Upstream connections open (including ones shutting down).
    pub upstream_connections: usize,
    /// Calls forwarded and not yet finished (response body ended or dropped).
    pub calls_in_flight: usize,
    /// Spawned request-body pumps still running (streaming requests whose
    /// client was still sending when response headers came back).
    pub request_pumps: usize,
    /// Request bytes kept for another attempt by calls not yet committed
    /// (at most `retry.buffer_total`).
    pub retry_buffer_bytes: usize,
}

/// The shared counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    downstream_connections: AtomicUsize,
    upstream_connections: AtomicUsize,
    calls_in_flight: AtomicUsize,
    /// The forwarder's count of request pumps on tasks of their own.
    pub(crate) pumps: crate::forward::Pumps,
    /// Request bytes kept for retries, every stack together.
    pub(crate) retry_buffer: Arc<crate::forward::Budget>,
    /// Woken when the last upstream connection closes.
    upstream_gone: Notify,
}

/// Which count a [`Held`] holds up.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    DownstreamConnection,
    UpstreamConnection,
    Call,
}

/// Holds one unit of a counter until dropped.
#[derive(Debug)]
pub(crate) struct Held {
    counters: Arc<Counters>,
    kind: Kind,
}

// === impl Counters ===

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            downstream_connections: self.downstream_connections.load(Ordering::Relaxed),
            upstream_connections: self.upstream_connections.load(Ordering::Relaxed),
            calls_in_flight: self.calls_in_flight.load(Ordering::Relaxed),
            request_pumps: self.pumps.running(),
            retry_buffer_bytes: self.retry_buffer.held(),
        }
    }

    /// Calls in flight now (one load, for the admission check per call).
    pub(crate) fn calls_in_flight(&self) -> usize {
        self.calls_in_flight.load(Ordering::Relaxed)
    }

    /// Resolves once no upstream connection is open.
    pub(crate) async fn upstream_connections_closed(&self) {
        loop {
            let gone = self.upstream_gone.notified();
            tokio::pin!(gone);
            // Register before checking, so a close in between is not lost.
            gone.as_mut().enable();
            if self.upstream_connections.load(Ordering::Acquire) == 0 {
                return;
            }
            gone.await;
        }
    }

    fn counter(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::DownstreamConnection => &self.downstream_connections,
            Kind::UpstreamConnection => &self.upstream_connections,
            Kind::Call => &self.calls_in_flight,
        }
    }
}

// === impl Held ===

impl Held {
    pub(crate) fn count(counters: &Arc<Counters>, kind: Kind) -> Self {
        counters.counter(kind).fetch_add(1, Ordering::Relaxed);
        Self {
            counters: counters.clone(),
            kind,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let before = self
            .counters
            .counter(self.kind)
            .fetch_sub(1, Ordering::AcqRel);
        if before == 1 && matches!(self.kind, Kind::UpstreamConnection) {
            self.counters.upstream_gone.notify_waiters();
        }
    }
}
