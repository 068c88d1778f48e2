//! Connections to the upstream: dialled on demand, multiplexed, shared by
//! every call, and replaced when they break.
//!
//! A call takes the least-loaded open connection that is below the
//! upstream's MAX_CONCURRENT_STREAMS; only when every connection is at that
//! limit (and fewer than `max_connections` are open) does it dial another.
//! Dials are serialised: callers that waited on a dial share its outcome, so
//! an unreachable upstream costs one connect attempt, not one per call, and
//! every waiting call fails at once with UNAVAILABLE. After consecutive
//! failures, further calls fail fast without dialling for a short backoff.

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
use tokio::{net::TcpStream, time::Instant};
use tracing::{debug, warn};

mod group;
mod health;

pub(crate) use self::group::Groups;
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
}

/// The pool of connections to one upstream.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: HostPort,
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
}

#[derive(Clone, Debug)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    in_flight: Arc<AtomicUsize>,
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
    in_flight: Arc<AtomicUsize>,
    pool_in_flight: Arc<AtomicUsize>,
    _call: Gauge,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.pool_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Pool ===

impl Pool {
    pub(crate) fn new(config: UpstreamConfig, counters: Arc<Counters>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: Arc::from(config.address.to_string()),
                target: config.address.clone(),
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
        // `pick` prunes dead connections; any left is open, if busy.
        if self.inner.pick(false).is_some()
            || !self.inner.conns.lock().expect("pool lock").is_empty()
        {
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

    /// Closes every connection once its streams are done: the connections
    /// send GOAWAY and end when idle.
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.conns.lock().expect("pool lock").clear();
    }

    async fn checkout_conn(&self) -> Result<(Conn, Lease), UpstreamError> {
        let epoch = self.inner.dial_epoch.load(Ordering::Acquire);
        if let Some(conn) = self.inner.pick(false) {
            return Ok(self.lease(conn));
        }
        let conn = self.dial(epoch).await?;
        Ok(self.lease(conn))
    }

    fn lease(&self, conn: Conn) -> (Conn, Lease) {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            in_flight: conn.in_flight.clone(),
            pool_in_flight: self.inner.in_flight.clone(),
            _call: Gauge::hold(&self.inner.counters, Kind::Call),
        };
        (conn, lease)
    }

    async fn dial(&self, epoch: u64) -> Result<Conn, UpstreamError> {
        let inner = &self.inner;
        let mut state = inner.dial.lock().await;
        if inner.dial_epoch.load(Ordering::Acquire) != epoch {
            // Someone dialled while we waited: share their outcome.
            if let Some(conn) = inner.pick(false) {
                return Ok(conn);
            }
            if let Some(err) = &state.last_error {
                return Err(err.clone());
            }
        }
        if let (Some(at), Some(err)) = (state.retry_at, &state.last_error)
            && Instant::now() < at
        {
            return Err(err.clone());
        }
        if let Some(conn) = inner.pick(true) {
            // Every connection is at its stream limit, and no more may be
            // opened: queue on the least-loaded one (h2 holds the stream
            // until a slot frees).
            return Ok(conn);
        }
        let result = self.connect().await;
        inner.dial_epoch.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(conn) => {
                *state = DialState::default();
                inner.failing.store(false, Ordering::Relaxed);
                Ok(conn)
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
        let target = (inner.target.host(), inner.target.port());
        let tcp =
            match tokio::time::timeout(inner.config.connect_timeout, TcpStream::connect(target))
                .await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(unreachable(e.to_string())),
                Err(_) => {
                    return Err(unreachable(format!(
                        "connect timed out after {:?}",
                        inner.config.connect_timeout
                    )));
                }
            };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on an upstream connection");
        }
        let (io, flusher) = batch::new(tcp);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(inner.config.initial_stream_window.0)
            .initial_connection_window_size(inner.config.initial_connection_window.0)
            .max_frame_size(inner.config.max_frame_size.0)
            .data_frame_budget(inner.config.data_frame_budget.0 as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| unreachable(format!("HTTP/2 handshake failed: {e}")))?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id,
            send,
            in_flight: Arc::default(),
        };
        inner.conns.lock().expect("pool lock").push(conn.clone());
        let gauge = Gauge::hold(&inner.counters, Kind::UpstreamConnection);
        let pool = Arc::downgrade(&self.inner);
        let name = inner.name.clone();
        let keepalive = (
            inner.config.keepalive_interval,
            inner.config.keepalive_timeout,
        );
        let idle_timeout = inner.config.idle_timeout;
        let in_flight = conn.in_flight.clone();
        let evict = {
            let pool = pool.clone();
            move || {
                if let Some(pool) = Weak::upgrade(&pool) {
                    pool.remove(id);
                }
            }
        };
        let evicted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let evict = {
            let evicted = evicted.clone();
            move || {
                evicted.store(true, Ordering::Relaxed);
                evict();
            }
        };
        tokio::spawn(async move {
            let _gauge = gauge;
            let ended = drive(
                Flushed::new(connection, flusher),
                keepalive,
                idle_timeout,
                &in_flight,
                &name,
                evict,
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
            }
        });
        debug!(upstream = %inner.name, id, "upstream connection open");
        Ok(conn)
    }
}

/// Drives an upstream connection, pinging it every `interval` while calls
/// are in flight; a PING unanswered within `timeout` means the upstream is
/// gone (a dead host, a silent network drop), and the connection is
/// dropped so its calls fail with UNAVAILABLE instead of hanging.
async fn drive(
    connection: Flushed<h2::client::Connection<BatchIo<TcpStream>, Bytes>, TcpStream>,
    (interval, timeout): (Duration, Duration),
    idle_timeout: Duration,
    in_flight: &AtomicUsize,
    name: &str,
    evict: impl Fn(),
) -> Result<(), h2::Error> {
    tokio::pin!(connection);
    let mut pinger = connection.as_mut().get_pin_mut().ping_pong();
    let mut next = Instant::now() + interval;
    // Idle when no call was in flight at two checks `idle_timeout` apart:
    // then the pool lets go of the connection, and h2 closes it (GOAWAY)
    // once the last handle is gone.
    let mut idle_check = Instant::now() + idle_timeout;
    let mut was_idle = false;
    let mut evicted = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
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
                if in_flight.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let Some(pinger) = pinger.as_mut() else { continue };
                let pong = tokio::time::timeout(timeout, pinger.ping(h2::Ping::opaque()));
                tokio::select! {
                    result = connection.as_mut() => return result,
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
    /// The least-loaded connection with a free stream slot; or, with
    /// `saturated_ok` and no room for another connection, the least-loaded
    /// one at all.
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

    fn pick(&self, saturated_ok: bool) -> Option<Conn> {
        let mut conns = self.conns.lock().expect("pool lock");
        self.prune_locked(&mut conns);
        let load = |c: &&Conn| c.in_flight.load(Ordering::Relaxed);
        if saturated_ok {
            if conns.len() < self.config.max_connections {
                return None;
            }
            return conns.iter().min_by_key(load).cloned();
        }
        conns
            .iter()
            .filter(|c| load(c) < c.send.current_max_send_streams())
            .min_by_key(load)
            .cloned()
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
