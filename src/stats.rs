//! Live counts of what sluice holds open, read by tests (leak checks) and,
//! later, by the admin endpoint. Each count moves through an RAII guard, so
//! it comes back down however the thing it counts ends.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

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
}

/// The shared counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    downstream_connections: AtomicUsize,
    upstream_connections: AtomicUsize,
    calls_in_flight: AtomicUsize,
    request_pumps: AtomicUsize,
}

/// Which counter a [`Gauge`] holds up.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    DownstreamConnection,
    UpstreamConnection,
    Call,
    RequestPump,
}

/// Holds one unit of a counter until dropped.
#[derive(Debug)]
pub(crate) struct Gauge {
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
            request_pumps: self.request_pumps.load(Ordering::Relaxed),
        }
    }

    /// Calls in flight now (one load, for the admission check per call).
    pub(crate) fn calls_in_flight(&self) -> usize {
        self.calls_in_flight.load(Ordering::Relaxed)
    }

    fn counter(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::DownstreamConnection => &self.downstream_connections,
            Kind::UpstreamConnection => &self.upstream_connections,
            Kind::Call => &self.calls_in_flight,
            Kind::RequestPump => &self.request_pumps,
        }
    }
}

// === impl Gauge ===

impl Gauge {
    pub(crate) fn hold(counters: &Arc<Counters>, kind: Kind) -> Self {
        counters.counter(kind).fetch_add(1, Ordering::Relaxed);
        Self {
            counters: counters.clone(),
            kind,
        }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.counters
            .counter(self.kind)
            .fetch_sub(1, Ordering::Relaxed);
    }
}
