//! Connections to the upstream: dialled on demand, multiplexed, shared by
//! every call, and replaced when they break.
//!
//! A call takes the least-loaded open connection with a free stream slot:
//! below `max_streams_per_connection` and the upstream's
//! MAX_CONCURRENT_STREAMS. Connections where a call is waiting for the
//! upstream to take more of its upload (its flow-control window is spent,
//! so the upstream stopped reading) are passed over while another can be
//! used or dialled: an upstream that gives a connection no more window
//! than one stream (hyper's default, and so tonic's) lets one unread
//! upload stop every request body on it. Only when no connection has a
//! slot and `max_connections` are open does a call wait, up to
//! `connect_timeout`, for a slot to free.
//!
//! Dials are serialised: callers that waited on a dial share its outcome,
//! so an unreachable upstream costs one connect attempt, not one per call,
//! and every waiting call fails at once with UNAVAILABLE. After consecutive
//! failures, further calls fail fast without dialling for a short backoff.
//!
//! Each connection's receive window is `max_streams_per_connection ×
//! initial_stream_window` unless configured: calls whose clients stop
//! reading hold their stream windows, never the connection's.

use std::{
    sync::{
        Arc, Mutex, Weak,
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
use tracing::{debug, warn};

mod connect;
mod group;
mod health;

pub(crate) use self::connect::Connector;
use crate::net::Stream;

pub(crate) use self::group::{AgentEndpoint, Group, Groups};
use crate::{
    batch::{self, BatchIo, Flushed},
    config::{HostPort, UpstreamConfig},
    stats::{Counters, Gauge, Kind},
};

/// The first retry after a failed dial may dial again at once; from the
/// second consecutive failure on, calls fail fast for this long, doubling.
const BACKOFF_BASE: Duration = Duration::from_millis(10);
/// Longest fail-fast window: an upstream that comes back is used again within
/// a quarter second (clients retry UNAVAILABLE themselves).
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// How long an endpoint that sent GOAWAY counts as draining: long enough
/// for a restarting upstream to come back, short enough that a one-off
/// connection recycle (max-age) is soon forgotten.
const DRAINING_HOLD: Duration = Duration::from_secs(10);

/// Why no upstream stream could be opened.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum UpstreamError {
    /// Dialling the upstream failed (refused, unreachable, timed out).
    #[error("upstream {target} unreachable: {reason}")]
    Unreachable { target: Arc<str>, reason: Arc<str> },
    /// The connection failed while opening the stream.
    #[error("upstream {target} connection failed: {source}")]
    Connection {
        target: Arc<str>,
        #[source]
        source: Arc<h2::Error>,
    },
    /// h2 refused to send the request head: not the connection's fault.
    #[error("cannot send the request upstream: {0}")]
    Refused(#[source] Arc<h2::Error>),
    /// Every stream slot of every connection stayed taken for the whole
    /// `connect_timeout`.
    #[error("upstream {target}: all {slots} streams busy for {waited:?}")]
    Busy {
        target: Arc<str>,
        slots: usize,
        waited: Duration,
    },
}

/// The pool of connections to one upstream.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: HostPort,
    connector: Connector,
    name: Arc<str>,
    config: UpstreamConfig,
    conns: Mutex<Vec<Conn>>,
    dial: tokio::sync::Mutex<DialState>,
    /// Bumped after every dial, so a caller that waited for the dial lock
    /// knows whether someone else's dial finished meanwhile.
    dial_epoch: AtomicU64,
    next_id: AtomicU64,
    counters: Arc<Counters>,
    /// Calls on this pool's connections, all together.
    in_flight: Arc<AtomicUsize>,
    /// Whether the last dial failed (and none succeeded since).
    failing: std::sync::atomic::AtomicBool,
    /// When a connection of this endpoint last received GOAWAY, in ms
    /// since `created` (0: never).
    goaway_at_ms: AtomicU64,
    created: Instant,
    /// Set by [`Pool::close`]: connections ending now are sluice's doing.
    closed: std::sync::atomic::AtomicBool,
    /// Woken when a stream slot frees while calls wait for one.
    slot_freed: Arc<tokio::sync::Notify>,
    /// Calls waiting for a slot.
    waiting: Arc<AtomicUsize>,
    /// Woken when a connection's task ends.
    ended: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    load: Arc<ConnLoad>,
    /// The TLS material generation it was opened with.
    generation: u64,
    /// Set when sluice lets go of it: its end is not the upstream's doing.
    evicted: Arc<std::sync::atomic::AtomicBool>,
}

/// What the calls on one connection share with the pool.
#[derive(Debug, Default)]
pub(crate) struct ConnLoad {
    /// Calls holding a stream slot.
    in_flight: AtomicUsize,
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
struct DialState {
    failures: u32,
    last_error: Option<UpstreamError>,
    retry_at: Option<Instant>,
}

/// A connection with a stream slot reserved for one call.
#[derive(Debug)]
pub(crate) struct Checkout {
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
        Ok(Checkout { conn, lease })
    }

    /// Opens the stream and sends `req`'s headers on a checked-out
    /// connection.
    ///
    /// A connection that has received GOAWAY or failed is never checked
    /// out, so this fails only in the race where it breaks in between; the
    /// call then fails with UNAVAILABLE (its body may already be in
    /// flight, so it is not retried here).
    pub(crate) fn send(
        &self,
        checkout: Checkout,
        req: Request<()>,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>, Lease), UpstreamError> {
        let Checkout { mut conn, lease } = checkout;
        match conn.send.send_request(req, end_of_stream) {
            Ok((response, stream)) => Ok((response, stream, lease)),
            Err(e) if e.is_io() || e.is_go_away() || e.is_reset() => {
                self.inner.remove(conn.id);
                Err(UpstreamError::Connection {
                    target: self.inner.name.clone(),
                    source: Arc::new(e),
                })
            }
            Err(e) => Err(UpstreamError::Refused(Arc::new(e))),
        }
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

    fn lease(&self, conn: Conn) -> (Conn, Lease) {
        conn.load.in_flight.fetch_add(1, Ordering::Relaxed);
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            load: conn.load.clone(),
            pool_in_flight: self.inner.in_flight.clone(),
            waiting: self.inner.waiting.clone(),
            slot_freed: self.inner.slot_freed.clone(),
        };
        (conn, lease)
    }

    /// Dials a connection, unless someone else's dial finished while this
    /// call waited for its turn (`None`: pick again).
    async fn dial(&self, epoch: u64) -> Result<Option<Conn>, UpstreamError> {
        let inner = &self.inner;
        let mut state = inner.dial.lock().await;
        if inner.dial_epoch.load(Ordering::Acquire) != epoch {
            // Someone dialled while we waited: share their outcome.
            if let Some(err) = &state.last_error {
                return Err(err.clone());
            }
            return Ok(None);
        }
        if let (Some(at), Some(err)) = (state.retry_at, &state.last_error)
            && Instant::now() < at
        {
            return Err(err.clone());
        }
        // In a task of its own: a call dropped while it waits (a deadline,
        // a mirror copy let go, a client's cancel) must not cut the dial
        // off mid-handshake; the connection it makes serves the next call.
        let pool = self.clone();
        let result = tokio::spawn(async move { pool.connect().await })
            .await
            .unwrap_or_else(|e| {
                Err(UpstreamError::Unreachable {
                    target: inner.name.clone(),
                    reason: Arc::from(format!("the dial task failed: {e}")),
                })
            });
        inner.dial_epoch.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(conn) => {
                *state = DialState::default();
                inner.failing.store(false, Ordering::Relaxed);
                Ok(Some(conn))
            }
            Err(err) => {
                inner.failing.store(true, Ordering::Relaxed);
                state.failures = state.failures.saturating_add(1);
                let backoff = (state.failures > 1).then(|| {
                    BACKOFF_BASE
                        .saturating_mul(1 << (state.failures - 2).min(16))
                        .min(BACKOFF_MAX)
                });
                state.retry_at = backoff.map(|b| Instant::now() + b);
                state.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let inner = &self.inner;
        let unreachable = |reason: String| UpstreamError::Unreachable {
            target: inner.name.clone(),
            reason: Arc::from(reason),
        };
        // Read before dialling: material swapped during the handshake makes
        // this connection one to replace, never one wrongly kept.
        let generation = inner.connector.generation();
        let tcp = match tokio::time::timeout(
            inner.config.connect_timeout,
            inner.connector.connect(&inner.target),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unreachable(e.0)),
            Err(_) => {
                return Err(unreachable(format!(
                    "connect timed out after {:?}",
                    inner.config.connect_timeout
                )));
            }
        };
        let (io, flusher) = batch::new(tcp);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(inner.config.initial_stream_window.0)
            .initial_connection_window_size(inner.config.connection_window())
            .max_frame_size(inner.config.max_frame_size.0)
            .data_frame_budget(inner.config.data_frame_budget.0 as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| unreachable(format!("HTTP/2 handshake failed: {e}")))?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conn = Conn {
            id,
            send,
            load: Arc::default(),
            generation,
            evicted: evicted.clone(),
        };
        let gauge = Gauge::hold(&inner.counters, Kind::UpstreamConnection);
        let pool = Arc::downgrade(&self.inner);
        let name = inner.name.clone();
        // A tunnel is pinged when idle too: an agent whose host went away
        // silently must leave the group within a keepalive, not at its
        // next call.
        let keepalive = (
            inner.config.keepalive_interval,
            inner.config.keepalive_timeout,
            inner.connector.is_tunnel(),
        );
        let idle_timeout = inner.config.idle_timeout;
        let load = conn.load.clone();
        let evict = {
            let pool = pool.clone();
            move || {
                if let Some(pool) = Weak::upgrade(&pool) {
                    pool.remove(id);
                }
            }
        };
        let evict = {
            let evicted = evicted.clone();
            move || {
                evicted.store(true, Ordering::Relaxed);
                evict();
            }
        };
        // Over TLS 1.3 an upstream that refuses sluice's client certificate
        // says so only after sluice's side of the handshake is done (and an
        // agent closes a duplicate tunnel without a word): one PING
        // answered proves the peer took the connection, before any call
        // (or the retirement of a working older connection) depends on it.
        let (verified, verdict) = if inner.connector.verifies() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some((tx, inner.config.connect_timeout)), Some(rx))
        } else {
            (None, None)
        };
        tokio::spawn(async move {
            let _gauge = gauge;
            let ended = drive(
                Flushed::new(connection, flusher),
                keepalive,
                idle_timeout,
                &load.in_flight,
                &name,
                evict,
                verified,
            )
            .await;
            if let Err(e) = &ended {
                if e.is_io() || e.is_go_away() {
                    debug!(upstream = %name, error = %e, "upstream connection closed");
                } else {
                    warn!(upstream = %name, error = %e, "upstream connection failed");
                }
            }
            if let Some(pool) = Weak::upgrade(&pool) {
                // A connection that ends without sluice letting go of it
                // was ended by the upstream (GOAWAY, or a close): the
                // endpoint is draining.
                if !evicted.load(Ordering::Relaxed) && !pool.closed.load(Ordering::Relaxed) {
                    pool.mark_draining();
                }
                pool.remove(id);
                pool.ended.notify_waiters();
            }
        });
        if let Some(verdict) = verdict {
            // The drive task bounds the wait by connect_timeout.
            let refused = match verdict.await {
                Ok(Ok(())) => None,
                Ok(Err(reason)) => Some(reason),
                Err(_) => Some("the connection ended at once".to_owned()),
            };
            if let Some(reason) = refused {
                // Not the endpoint draining: sluice gives the connection up.
                conn.evicted.store(true, Ordering::Relaxed);
                return Err(unreachable(reason));
            }
        }
        if inner.closed.load(Ordering::Relaxed) {
            // Closed while dialling (a drain, an endpoint that left): the
            // connection goes at once.
            conn.evicted.store(true, Ordering::Relaxed);
            return Err(unreachable(
                "the endpoint was closed while dialling".to_owned(),
            ));
        }
        {
            let mut conns = inner.conns.lock().expect("pool lock");
            conns.push(conn.clone());
            // A connection with new TLS material exists: the old ones go.
            inner.retire_locked(&mut conns, generation, false);
        }
        debug!(upstream = %inner.name, id, "upstream connection open");
        Ok(conn)
    }
}

/// Drives an upstream connection, pinging it every `interval` while calls
/// are in flight; a PING unanswered within `timeout` means the upstream is
/// gone (a dead host, a silent network drop), and the connection is
/// dropped so its calls fail with UNAVAILABLE instead of hanging.
async fn drive(
    connection: Flushed<h2::client::Connection<BatchIo<Stream>, Bytes>, Stream>,
    (interval, timeout, ping_idle): (Duration, Duration, bool),
    idle_timeout: Duration,
    in_flight: &AtomicUsize,
    name: &str,
    evict: impl Fn(),
    verified: Option<(tokio::sync::oneshot::Sender<Result<(), String>>, Duration)>,
) -> Result<(), h2::Error> {
    tokio::pin!(connection);
    let mut pinger = connection.as_mut().get_pin_mut().ping_pong();
    // Drives the connection; while no call is on it, h2's buffers are
    // given back after each poll.
    let mut poll_connection = |cx: &mut Context<'_>| {
        let polled = connection.as_mut().poll(cx);
        if polled.is_pending() && in_flight.load(Ordering::Relaxed) == 0 {
            connection.as_mut().get_pin_mut().shrink_buffers();
        }
        polled
    };
    if let (Some((tx, within)), Some(p)) = (verified, pinger.as_mut()) {
        tokio::select! {
            result = std::future::poll_fn(&mut poll_connection) => {
                let reason = match &result {
                    Ok(()) => "the upstream closed the connection at once".to_owned(),
                    Err(e) => format!("the upstream refused the connection: {e}"),
                };
                let _ = tx.send(Err(reason));
                return result;
            }
            pong = tokio::time::timeout(within, p.ping(h2::Ping::opaque())) => match pong {
                Ok(Ok(_)) => {
                    if tx.send(Ok(())).is_err() {
                        // The dial gave up meanwhile.
                        return Ok(());
                    }
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(format!("the upstream refused the connection: {e}")));
                    return Err(e);
                }
                Err(_) => {
                    let _ = tx.send(Err(format!("no answer to the first PING within {within:?}")));
                    return Ok(());
                }
            },
        }
    }
    let mut next = Instant::now() + interval;
    // Idle when no call was in flight at two checks `idle_timeout` apart:
    // then the pool lets go of the connection, and h2 closes it (GOAWAY)
    // once the last handle is gone.
    let mut idle_check = Instant::now() + idle_timeout;
    let mut was_idle = false;
    let mut evicted = false;
    loop {
        tokio::select! {
            result = std::future::poll_fn(&mut poll_connection) => return result,
            () = tokio::time::sleep_until(idle_check), if !evicted => {
                idle_check = Instant::now() + idle_timeout;
                let idle = in_flight.load(Ordering::Relaxed) == 0;
                if idle && was_idle {
                    debug!(upstream = %name, "upstream connection idle; closing");
                    evict();
                    evicted = true;
                }
                was_idle = idle;
            }
            () = tokio::time::sleep_until(next), if pinger.is_some() => {
                next = Instant::now() + interval;
                if in_flight.load(Ordering::Relaxed) == 0 && !ping_idle {
                    continue;
                }
                let Some(pinger) = pinger.as_mut() else { continue };
                let pong = tokio::time::timeout(timeout, pinger.ping(h2::Ping::opaque()));
                tokio::select! {
                    result = std::future::poll_fn(&mut poll_connection) => return result,
                    answered = pong => match answered {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            warn!(upstream = %name, ?timeout, "upstream did not answer PING; dropping the connection");
                            return Ok(());
                        }
                    },
                }
            }
        }
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
    fn retire_locked(&self, conns: &mut Vec<Conn>, generation: u64, idle_only: bool) {
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

    fn mark_draining(&self) {
        debug!(upstream = %self.name, "upstream endpoint draining (GOAWAY or closed by the peer)");
        let at = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.goaway_at_ms.store(at.max(1), Ordering::Relaxed);
    }

    fn remove(&self, id: u64) {
        self.conns.lock().expect("pool lock").retain(|c| c.id != id);
    }
}
