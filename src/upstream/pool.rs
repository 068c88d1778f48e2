//! The pool of one endpoint: its open connections, the choice of one with
//! a free stream slot per call, and the wait for a slot when all are
//! taken.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use http::Request;
use tokio::time::Instant;
use tracing::debug;

use super::{Connector, UpstreamError};
use crate::{
    config::{HostPort, UpstreamConfig},
    stats::Counters,
};

/// The first retry after a failed dial may dial again at once; from the
/// second consecutive failure on, calls fail fast for this long, doubling.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(10);
/// Longest fail-fast window: an upstream that comes back is used again within
/// a quarter second (clients retry UNAVAILABLE themselves).
pub(super) const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// How long an endpoint that sent GOAWAY counts as draining: long enough
/// for a restarting upstream to come back, short enough that a one-off
/// connection recycle (max-age) is soon forgotten.
const DRAINING_HOLD: Duration = Duration::from_secs(10);

/// The pool of connections to one upstream.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) target: HostPort,
    pub(super) connector: Connector,
    pub(super) name: Arc<str>,
    pub(super) config: UpstreamConfig,
    pub(super) conns: Mutex<Vec<Conn>>,
    pub(super) dial: tokio::sync::Mutex<DialState>,
    /// Bumped after every dial, so a caller that waited for the dial lock
    /// knows whether someone else's dial finished meanwhile.
    pub(super) dial_epoch: AtomicU64,
    pub(super) next_id: AtomicU64,
    pub(super) counters: Arc<Counters>,
    /// Calls on this pool's connections, all together.
    pub(super) in_flight: Arc<AtomicUsize>,
    /// Whether the last dial failed (and none succeeded since).
    pub(super) failing: std::sync::atomic::AtomicBool,
    /// When a connection of this endpoint last received GOAWAY, in ms
    /// since `created` (0: never).
    pub(super) goaway_at_ms: AtomicU64,
    pub(super) created: Instant,
    /// Set by [`Pool::close`]: connections ending now are sluice's doing.
    pub(super) closed: std::sync::atomic::AtomicBool,
    /// Woken when a stream slot frees while calls wait for one.
    pub(super) slot_freed: Arc<tokio::sync::Notify>,
    /// Calls waiting for a slot.
    pub(super) waiting: Arc<AtomicUsize>,
    /// Woken when a connection's task ends.
    pub(super) ended: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) send: SendRequest<Bytes>,
    pub(super) load: Arc<ConnLoad>,
    /// The TLS material generation it was opened with.
    pub(super) generation: u64,
    /// Set when sluice lets go of it: its end is not the upstream's doing.
    pub(super) evicted: Arc<std::sync::atomic::AtomicBool>,
}

/// What the calls on one connection share with the pool.
#[derive(Debug, Default)]
pub(crate) struct ConnLoad {
    /// Calls holding a stream slot.
    pub(super) in_flight: AtomicUsize,
    /// Calls whose request body waits for the upstream's flow-control
    /// window: the upstream is not reading them (yet).
    send_blocked: AtomicUsize,
}

/// What [`Inner::pick`] found.
#[derive(Debug)]
enum Pick {
    Conn(Conn),
    /// Dial another connection; if that fails, the connection given (one
    /// whose calls wait for upstream window) is still usable.
    Dial(Option<Conn>),
    /// Every slot is taken and no connection may be added.
    Wait,
}

#[derive(Debug, Default)]
pub(super) struct DialState {
    pub(super) failures: u32,
    pub(super) last_error: Option<UpstreamError>,
    pub(super) retry_at: Option<Instant>,
}

/// A connection with a stream slot reserved for one call.
#[derive(Debug)]
pub(crate) struct Checkout {
    pool: Pool,
    conn: Conn,
    lease: Lease,
}

/// A call's claim on a connection's stream slot; released on drop.
#[derive(Debug)]
pub(crate) struct Lease {
    load: Arc<ConnLoad>,
    pool_in_flight: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    slot_freed: Arc<tokio::sync::Notify>,
    /// What the call holds as long as its stream: its places in wider
    /// limits (a group's circuit breaker, a route's `max_in_flight`),
    /// shared by the call's attempts.
    slot: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

/// One call's place in a count of calls in flight, given back on drop:
/// what a limit over more than one endpoint (an xDS cluster's
/// `max_requests`) counts.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place in `count` if fewer than `max` are taken.
    pub(crate) fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a call as waiting for the upstream to take its request body
/// while held (see [`ConnLoad::send_blocked`]).
#[derive(Debug)]
pub(crate) struct SendBlocked {
    load: Arc<ConnLoad>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.pool_in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.slot_freed.notify_one();
        }
    }
}

impl Lease {
    /// Marks the call's request body as waiting for upstream window, until
    /// the returned guard drops.
    pub(crate) fn send_blocked(load: &Arc<ConnLoad>) -> SendBlocked {
        load.send_blocked.fetch_add(1, Ordering::Relaxed);
        SendBlocked { load: load.clone() }
    }

    /// The connection's load, for [`Lease::send_blocked`].
    pub(crate) fn load(&self) -> &Arc<ConnLoad> {
        &self.load
    }
}

impl Drop for SendBlocked {
    fn drop(&mut self) {
        self.load.send_blocked.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Checkout ===

impl Checkout {
    /// Makes the call hold `slot` until its stream ends.
    pub(crate) fn hold(&mut self, slot: Arc<dyn std::any::Any + Send + Sync>) {
        self.lease.slot = Some(slot);
    }

    /// Opens the stream and sends `req`'s headers on the checked-out
    /// connection.
    ///
    /// A connection that has received GOAWAY or failed is never checked
    /// out, so this fails only in the race where it breaks in between; the
    /// call then fails with UNAVAILABLE (its body may already be in
    /// flight, so it is not retried here).
    pub(crate) fn send(
        self,
        req: Request<()>,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>, Lease), UpstreamError> {
        let Self {
            pool,
            mut conn,
            lease,
        } = self;
        match conn.send.send_request(req, end_of_stream) {
            Ok((response, stream)) => Ok((response, stream, lease)),
            Err(e) if e.is_io() || e.is_go_away() || e.is_reset() => {
                pool.inner.remove(conn.id);
                Err(UpstreamError::Connection {
                    target: pool.inner.name.clone(),
                    source: Arc::new(e),
                })
            }
            Err(e) => Err(UpstreamError::Refused(Arc::new(e))),
        }
    }
}

// === impl Pool ===

impl Pool {
    pub(crate) fn new(
        config: UpstreamConfig,
        connector: Connector,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: Arc::from(config.address.to_string()),
                target: config.address.clone(),
                connector,
                config,
                conns: Mutex::default(),
                dial: tokio::sync::Mutex::default(),
                dial_epoch: AtomicU64::new(0),
                next_id: AtomicU64::new(0),
                counters,
                in_flight: Arc::default(),
                failing: std::sync::atomic::AtomicBool::new(false),
                goaway_at_ms: AtomicU64::new(0),
                created: Instant::now(),
                closed: std::sync::atomic::AtomicBool::new(false),
                slot_freed: Arc::default(),
                waiting: Arc::default(),
                ended: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Takes a stream slot on an open connection, dialling one if needed.
    /// Nothing of the call has been sent when this fails, so the caller
    /// may try another endpoint.
    pub(crate) async fn checkout(&self) -> Result<Checkout, UpstreamError> {
        let (conn, lease) = self.checkout_conn().await?;
        Ok(Checkout {
            pool: self.clone(),
            conn,
            lease,
        })
    }

    /// Opens the stream and sends `req`'s headers on a checked-out
    /// connection (see [`Checkout::send`]).
    pub(crate) fn send(
        &self,
        checkout: Checkout,
        req: Request<()>,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>, Lease), UpstreamError> {
        checkout.send(req, end_of_stream)
    }

    /// Whether the upstream can be reached: a connection is open, or one can
    /// be dialled now (the connection is kept for the next call).
    pub(crate) async fn reachable(&self) -> bool {
        // Pruning drops dead connections; any left is open, if busy.
        self.inner.prune();
        if !self.inner.conns.lock().expect("pool lock").is_empty() {
            return true;
        }
        let epoch = self.inner.dial_epoch.load(Ordering::Acquire);
        self.dial(epoch).await.is_ok()
    }

    /// Calls in flight on this endpoint.
    pub(crate) fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the last attempt to reach this endpoint failed.
    pub(crate) fn is_failing(&self) -> bool {
        self.inner.failing.load(Ordering::Relaxed)
    }

    /// Whether this endpoint sent GOAWAY within [`DRAINING_HOLD`]: it is
    /// shutting down or restarting, and other endpoints are preferred.
    ///
    /// Looks at the endpoint's connections first, so a GOAWAY that arrived
    /// since the last call counts at once.
    pub(crate) fn is_draining(&self) -> bool {
        self.inner.prune();
        let at = self.inner.goaway_at_ms.load(Ordering::Relaxed);
        at != 0 && self.inner.created.elapsed() < Duration::from_millis(at) + DRAINING_HOLD
    }

    /// Opens a connection now (a tunnel's, which the agent already
    /// dialled), rather than at the first call.
    pub(crate) async fn warm(&self) -> Result<(), UpstreamError> {
        self.checkout_conn().await.map(drop)
    }

    /// Resolves once no connection of this pool is open (after
    /// [`Pool::warm`]: when the tunnel is gone).
    pub(crate) async fn gone(&self) {
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.inner.conns.lock().expect("pool lock").is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Closes every connection once its streams are done: the connections
    /// send GOAWAY and end when idle.
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.conns.lock().expect("pool lock").clear();
    }

    async fn checkout_conn(&self) -> Result<(Conn, Lease), UpstreamError> {
        let mut waited_since = None;
        loop {
            let epoch = self.inner.dial_epoch.load(Ordering::Acquire);
            let conn = match self.inner.pick() {
                Pick::Conn(conn) => conn,
                Pick::Dial(fallback) => match self.dial(epoch).await {
                    Ok(Some(conn)) => conn,
                    Ok(None) => continue,
                    Err(e) => fallback.ok_or(e)?,
                },
                Pick::Wait => {
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    self.wait_for_slot(since).await?;
                    continue;
                }
            };
            return Ok(self.lease(conn));
        }
    }

    /// Waits until a stream slot frees (a lease drops), or fails once
    /// `connect_timeout` has passed since `since`.
    async fn wait_for_slot(&self, since: Instant) -> Result<(), UpstreamError> {
        let inner = &self.inner;
        let timeout = inner.config.connect_timeout;
        let busy = || UpstreamError::Busy {
            target: inner.name.clone(),
            slots: inner.config.max_connections * inner.config.max_streams_per_connection as usize,
            waited: timeout,
        };
        let freed = inner.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        inner.waiting.fetch_add(1, Ordering::Relaxed);
        // Check again now that a release would wake us.
        let outcome = if matches!(inner.pick(), Pick::Wait) {
            tokio::time::timeout_at(since + timeout, freed)
                .await
                .map_err(|_| busy())
        } else {
            Ok(())
        };
        inner.waiting.fetch_sub(1, Ordering::Relaxed);
        outcome
    }

    pub(super) fn lease(&self, conn: Conn) -> (Conn, Lease) {
        conn.load.in_flight.fetch_add(1, Ordering::Relaxed);
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            load: conn.load.clone(),
            pool_in_flight: self.inner.in_flight.clone(),
            waiting: self.inner.waiting.clone(),
            slot_freed: self.inner.slot_freed.clone(),
            slot: None,
        };
        (conn, lease)
    }
}

// === impl Inner ===

impl Inner {
    /// Drops connections that can no longer open streams (GOAWAY
    /// received, or failed), noting a GOAWAY as draining; their tasks
    /// finish the streams they carry.
    fn prune(&self) {
        let mut conns = self.conns.lock().expect("pool lock");
        self.prune_locked(&mut conns);
    }

    fn prune_locked(&self, conns: &mut Vec<Conn>) {
        let mut cx = Context::from_waker(Waker::noop());
        conns.retain_mut(|c| match c.send.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => {
                if e.is_go_away() && e.is_remote() {
                    self.mark_draining();
                }
                false
            }
            Poll::Pending => false,
        });
    }

    /// The least-loaded connection with a free stream slot, passing over
    /// connections with calls blocked on upstream window while another can
    /// be dialled (see the [module docs](self)).
    fn pick(&self) -> Pick {
        let mut conns = self.conns.lock().expect("pool lock");
        self.prune_locked(&mut conns);
        let max_streams = self.config.max_streams_per_connection as usize;
        let load = |c: &&Conn| c.load.in_flight.load(Ordering::Relaxed);
        // Connections opened with TLS material since replaced are used only
        // while no connection with the new material can be had (its dial
        // may fail: an upstream that does not trust the new certificate
        // yet must not fail calls that the old one still serves).
        let generation = self.connector.generation();
        let has_slot = |c: &&Conn| load(c) < c.send.current_max_send_streams().min(max_streams);
        let stale = conns
            .iter()
            .filter(|c| c.generation < generation)
            .filter(has_slot)
            .min_by_key(|c| load(c))
            .cloned();
        if stale.is_some() && conns.len() >= self.config.max_connections {
            // Make room for a connection with the new material: idle old
            // ones go now, busy ones once their calls end.
            let before = conns.len();
            self.retire_locked(&mut conns, generation, true);
            if conns.len() < before {
                let fallback = conns
                    .iter()
                    .filter(has_slot)
                    .min_by_key(|c| load(c))
                    .cloned();
                return Pick::Dial(fallback);
            }
        }
        let mut free = conns
            .iter()
            .filter(|c| c.generation >= generation)
            .filter(has_slot);
        let (mut best_clear, mut best_any): (Option<&Conn>, Option<&Conn>) = (None, None);
        for c in &mut free {
            if best_any.is_none_or(|b| load(&c) < load(&b)) {
                best_any = Some(c);
            }
            if c.load.send_blocked.load(Ordering::Relaxed) == 0
                && best_clear.is_none_or(|b| load(&c) < load(&b))
            {
                best_clear = Some(c);
            }
        }
        if let Some(c) = best_clear {
            return Pick::Conn(c.clone());
        }
        let fallback = best_any.cloned().or(stale);
        if conns.len() < self.config.max_connections {
            return Pick::Dial(fallback);
        }
        fallback.map_or(Pick::Wait, Pick::Conn)
    }

    /// Takes connections opened with material older than `generation` out
    /// of the pool (only the idle ones when `idle_only`): no new calls;
    /// the calls on them finish, then h2 closes them.
    pub(super) fn retire_locked(&self, conns: &mut Vec<Conn>, generation: u64, idle_only: bool) {
        conns.retain(|c| {
            let retire = c.generation < generation
                && (!idle_only || c.load.in_flight.load(Ordering::Relaxed) == 0);
            if retire {
                debug!(upstream = %self.name, id = c.id, "TLS material reloaded; replacing the connection once its calls end");
                c.evicted.store(true, Ordering::Relaxed);
            }
            !retire
        });
    }

    pub(super) fn mark_draining(&self) {
        debug!(upstream = %self.name, "upstream endpoint draining (GOAWAY or closed by the peer)");
        let at = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.goaway_at_ms.store(at.max(1), Ordering::Relaxed);
    }

    pub(super) fn remove(&self, id: u64) {
        self.conns.lock().expect("pool lock").retain(|c| c.id != id);
    }
}
