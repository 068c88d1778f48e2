//! One downstream connection: the HTTP/2 handshake, then every call on it
//! driven by this one task, with the connection's own timers: the first
//! request and idle deadlines, keepalive PINGs, the drain, and the guard
//! against clients that cancel calls faster than any honest one does.
//!
//! The task polls the calls, then h2 (which encodes what they queued and
//! reads what arrived), then writes everything out in one go
//! ([`crate::proto::batch`]). h2 does the protocol: settings, flow control, stream
//! limits, every check RFC 9113 asks of a server.

use std::{
    future::{Future, poll_fn},
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{
    StreamExt,
    stream::FuturesUnordered,
    task::{ArcWake, AtomicWaker},
};
use h2::{Ping, Reason, RecvStream, server::SendResponse};
use http::Request;
use sluice_layers::{BoxError, drain::Watch, grpc::status::Code};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::{Instant, sleep_until, timeout_at},
};
use tracing::{debug, warn};

use super::call::{self, CallEnd, CallFuture};
use crate::{
    config::ServerConfig,
    proto::batch::BatchIo,
    proto::flow::RecvBody,
    stats::{Counters, Held, Kind},
    telemetry::metrics::{Metrics, RefusalReason},
};

/// After sluice told a connection to go (idle, or abusive), how long it may
/// take to finish before it is closed outright.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// How long a refused request may go on sending before its stream is reset
/// (see [`call::refuse`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(10);
/// Rounds of "calls, then h2" one poll of a connection runs while h2 keeps
/// waking calls.
const MAX_ROUNDS: u32 = 8;

/// How long a connection whose calls all ended keeps its buffers before
/// giving them back: a client making one call after another (one in flight)
/// would otherwise free and allocate h2's read and write buffers and the
/// batch buffer on every call.
const SHRINK_AFTER: Duration = Duration::from_millis(50);
/// The text of the 415 answer to HTTP/2 requests that are not gRPC.
const NOT_GRPC: &str = "sluice serves gRPC only: content-type must be application/grpc\n";

/// What every connection of a listener shares.
#[derive(Debug)]
pub(crate) struct ListenerSettings {
    builder: h2::server::Builder,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    max_resets_per_second: u32,
    max_in_flight: usize,
    refuse_non_grpc: bool,
    max_connection_age: Option<Duration>,
    max_connection_age_grace: Duration,
    /// Whether each call gets the peer's address as a request extension
    /// (only when an enrich rule reads it: it costs an allocation). A
    /// config reload may change it.
    tag_peer: AtomicBool,
    /// Whether calls may be peeked (a route on a message field): each then
    /// carries its connection's peek budget. A config reload may change it.
    peeks: AtomicBool,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
}

impl ListenerSettings {
    pub(crate) fn new(
        config: &ServerConfig,
        tag_peer: bool,
        counters: Arc<Counters>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(config.initial_stream_window.0)
            .initial_connection_window_size(config.initial_connection_window.0)
            .max_frame_size(config.max_frame_size.0)
            .max_header_list_size(config.max_header_list_size.0)
            .max_concurrent_streams(config.max_concurrent_streams)
            // h2's CVE-2023-44487 defence: streams reset before they are
            // accepted count, and past the limit the connection gets
            // GOAWAY(ENHANCE_YOUR_CALM).
            .max_pending_accept_reset_streams(config.max_pending_accept_resets);
        Self {
            builder,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            max_resets_per_second: config.max_resets_per_second,
            max_in_flight: config.max_in_flight,
            refuse_non_grpc: config.non_grpc == crate::config::NonGrpc::Refuse,
            max_connection_age: config.max_connection_age,
            max_connection_age_grace: config.max_connection_age_grace,
            tag_peer: AtomicBool::new(tag_peer),
            peeks: AtomicBool::new(false),
            counters,
            metrics,
        }
    }

    /// Says whether calls may be peeked (see [`ListenerSettings::peeks`]).
    #[must_use]
    pub(crate) fn peeking(self, peeks: bool) -> Self {
        self.peeks.store(peeks, Ordering::Relaxed);
        self
    }

    /// What a config reload changes: whether calls carry the peer's
    /// address, and whether they may be peeked.
    pub(crate) fn set_per_call(&self, tag_peer: bool, peeks: bool) {
        self.tag_peer.store(tag_peer, Ordering::Relaxed);
        self.peeks.store(peeks, Ordering::Relaxed);
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Wakes the connection task for its calls, and notes that it did.
#[derive(Debug, Default)]
struct CallsWoken {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for CallsWoken {
    fn wake_by_ref(arc: &Arc<Self>) {
        arc.woken.store(true, Ordering::Relaxed);
        arc.task.wake();
    }
}

/// A connection's deadlines, all on one timer.
#[derive(Debug)]
struct Due {
    /// While no call is in flight: the first-request deadline, then the
    /// idle deadline.
    idle: Option<Instant>,
    /// Once sluice has told the client to go on its own account (idle, too
    /// many resets): when the connection is closed outright.
    grace: Option<Instant>,
    /// The next keepalive PING.
    ping: Instant,
    /// While a PING is unanswered: when the client counts as dead.
    pong: Option<Instant>,
    /// After the last call ended: when the idle connection gives back its
    /// buffers.
    shrink: Option<Instant>,
    /// When the connection reaches `server.max_connection_age`.
    age: Option<Instant>,
}

impl Due {
    fn next(&self) -> Instant {
        [self.idle, self.grace, self.pong, self.shrink, self.age]
            .into_iter()
            .flatten()
            .fold(self.ping, Instant::min)
    }
}

/// Client-cancelled calls in the current one-second window.
#[derive(Debug)]
struct Resets {
    window_start: Instant,
    count: u32,
}

impl Resets {
    /// Counts one; whether the limit is now passed.
    fn record(&mut self, limit: u32) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > limit
    }
}

/// Serves HTTP/2 on `io` (whose first bytes, already read, are `prefix`)
/// until the peer goes, the connection idles out, the client resets too
/// many calls, or the drain begins (GOAWAY, then the streams already open
/// finish). The preface and SETTINGS must arrive by `deadline`, and the
/// first request too.
pub(super) async fn serve<T, S>(
    io: T,
    prefix: Bytes,
    deadline: Instant,
    svc: &mut S,
    shared: &ListenerSettings,
    watch: Watch,
    peer: &super::Peer,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    S: super::CallService,
{
    let (io, flusher) = BatchIo::with_prefix(io, prefix);
    // Boxed: the handshake's state is only needed until it completes, and
    // every connection's future would otherwise carry it for its life.
    let handshake = Box::pin(flusher.around(shared.builder.handshake::<_, Bytes>(io)));
    let mut conn = match timeout_at(deadline, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "no HTTP/2 handshake within the handshake timeout; closing");
            return;
        }
    };
    let mut pinger = conn.ping_pong();
    // Created with the first call and dropped when the last one ends: an
    // idle connection holds no FuturesUnordered (its stub node is as large
    // as a call).
    let mut calls = None;
    let mut due = Due {
        // A tunnel is the agent's own connection to its hub: it idles as
        // long as it likes (keepalive PINGs still find a dead hub).
        idle: (!peer.tunnel).then_some(deadline),
        grace: None,
        ping: Instant::now() + shared.keepalive_interval,
        pong: None,
        shrink: None,
        // Up to 10 % later, so that connections opened together do not
        // all go together.
        age: shared
            .max_connection_age
            .filter(|_| !peer.tunnel)
            .map(|age| {
                let jitter = age.mul_f64(crate::balance::random_below(1001) as f64 / 10_000.0);
                Instant::now() + age + jitter
            }),
    };
    let mut timer = pin!(sleep_until(due.next()));
    let mut draining = pin!(watch.signaled());
    let mut drain_guard = None;
    let mut resets = Resets {
        window_start: Instant::now(),
        count: 0,
    };
    let mut flush_deferred = false;
    // The calls are polled with a waker that also notes the wake, so that a
    // call h2 woke while this task polled it (a reply arrived, window
    // opened) runs in the same poll instead of in another poll, and another
    // write, of its own.
    let woken = Arc::new(CallsWoken::default());
    let calls_waker = futures_util::task::waker(woken.clone());

    let ended = poll_fn(|cx| {
        woken.task.register(cx.waker());
        let mut calls_cx = Context::from_waker(&calls_waker);
        // Calls woken while h2 ran get a few more rounds in this poll; past
        // that (a call that keeps waking itself), the wake that was noted
        // has scheduled this task again anyway.
        let mut rounds = 0;
        loop {
            rounds += 1;
            // The calls first: what they queued, the h2 poll below encodes.
            woken.woken.store(false, Ordering::Relaxed);
            while let Some(Poll::Ready(Some(end))) = calls
                .as_mut()
                .map(|c: &mut FuturesUnordered<_>| c.poll_next_unpin(&mut calls_cx))
            {
                if end == CallEnd::ClientReset
                    && !peer.tunnel
                    && resets.record(shared.max_resets_per_second)
                    && due.grace.is_none()
                {
                    warn!(%peer, "client reset calls faster than server.max_resets_per_second; GOAWAY(ENHANCE_YOUR_CALM)");
                    conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    due.grace = Some(Instant::now() + GOAWAY_GRACE);
                }
            }
            if calls.as_ref().is_some_and(FuturesUnordered::is_empty) {
                calls = None;
                due.shrink = Some(Instant::now() + SHRINK_AFTER);
            }
            if calls.is_none() && due.idle.is_none() && due.grace.is_none() && !peer.tunnel {
                due.idle = Some(Instant::now() + shared.idle_timeout);
            }
            // Then h2, until it has read every frame that arrived: new
            // calls start only after that, so a frame that came right
            // behind a request (a WINDOW_UPDATE, a bad second HEADERS) is
            // judged on the stream as the client left it, whoever answers.
            let mut accepted = false;
            loop {
                // One stack serves every call of the connection; a new
                // stream is taken only when it is ready (it always is:
                // every layer passes readiness through, and the forwarder
                // waits inside its future), otherwise h2 is driven without
                // accepting.
                let ready = match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => true,
                    Poll::Ready(Err(e)) => {
                        let e: BoxError = e.into();
                        warn!(%peer, error = %e, "the call stack failed; closing the connection");
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => false,
                };
                if !ready {
                    if conn.poll_closed(cx)?.is_ready() {
                        return Poll::Ready(Ok(()));
                    }
                    break;
                }
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        due.idle = None;
                        due.shrink = None;
                        calls
                            .get_or_insert_with(FuturesUnordered::new)
                            .push(admit(svc, req, respond, shared, peer));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if accepted || (woken.woken.load(Ordering::Relaxed) && rounds < MAX_ROUNDS) {
                continue;
            }
            let mut told = false;
            if drain_guard.is_none()
                && let Poll::Ready(guard) = draining.as_mut().poll(cx)
            {
                // h2 sends GOAWAY(2^31-1), then after a PING round trip the
                // real last stream id, so no request already on the wire is
                // lost. The guard holds the drain open until this ends.
                drain_guard = Some(guard);
                conn.graceful_shutdown();
                told = true;
            }
            if let Some(pinger) = pinger.as_mut()
                && due.pong.is_some()
                && pinger.poll_pong(cx).is_ready()
            {
                due.pong = None;
            }
            // One timer for every deadline of the connection.
            if timer.deadline() != due.next() {
                timer.as_mut().reset(due.next());
            }
            if timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if due.grace.is_some_and(|t| t <= now) {
                    return Poll::Ready(Ok(()));
                }
                if due.pong.is_some_and(|t| t <= now) {
                    debug!(%peer, "client did not answer PING; closing");
                    return Poll::Ready(Ok(()));
                }
                if due.idle.is_some_and(|t| t <= now) {
                    debug!(%peer, "connection idle; GOAWAY(NO_ERROR)");
                    conn.graceful_shutdown();
                    due.idle = None;
                    due.grace = Some(now + GOAWAY_GRACE);
                }
                if due.shrink.is_some_and(|t| t <= now) {
                    due.shrink = None;
                }
                if due.age.is_some_and(|t| t <= now) {
                    debug!(%peer, "connection reached server.max_connection_age; GOAWAY(NO_ERROR)");
                    due.age = None;
                    if due.grace.is_none() {
                        conn.graceful_shutdown();
                        due.grace = Some(now + shared.max_connection_age_grace);
                    }
                }
                if due.ping <= now {
                    due.ping = now + shared.keepalive_interval;
                    if due.pong.is_none()
                        && let Some(pinger) = pinger.as_mut()
                        && pinger.send_ping(Ping::opaque()).is_ok()
                    {
                        due.pong = Some(now + shared.keepalive_timeout);
                    }
                }
                told = true;
            }
            if !told {
                break;
            }
        }
        let _ = flusher.poll_flush_batched(cx, &mut flush_deferred);
        if calls.is_none() && due.shrink.is_none() {
            // Idle (from the start, or SHRINK_AFTER since the last call):
            // h2's buffers and ours hold nothing the connection needs.
            conn.shrink_buffers();
            flusher.shrink();
        }
        Poll::Pending
    })
    .await;
    // Whatever is still buffered (a GOAWAY) goes out before the close.
    let _ = timeout_at(
        Instant::now() + GOAWAY_GRACE,
        poll_fn(|cx| flusher.poll_flush(cx)),
    )
    .await;
    if let Err(e) = ended {
        debug!(%peer, error = %e, "downstream connection ended with an error");
    }
}

/// One stream: refused by the server itself, or a call through the stack
/// (which must be ready).
fn admit<S>(
    svc: &mut S,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    shared: &ListenerSettings,
    peer: &super::Peer,
) -> CallFuture<S::Future, S::ResBody>
where
    S: super::CallService,
{
    if shared.refuse_non_grpc {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(sluice_layers::grpc::is_grpc_content_type);
        if !grpc {
            shared.metrics.refused(RefusalReason::not_grpc);
            let refusal = call::plain(http::StatusCode::UNSUPPORTED_MEDIA_TYPE, NOT_GRPC);
            return CallFuture::refused(call::refuse(req, respond, refusal, REFUSAL_LINGER));
        }
    }
    if shared.counters.calls_in_flight() >= shared.max_in_flight {
        shared.metrics.refused(RefusalReason::overloaded);
        let refusal = call::grpc(
            Code::ResourceExhausted,
            "sluice is at server.max_in_flight calls; retry later",
        );
        return CallFuture::refused(call::refuse(req, respond, refusal, REFUSAL_LINGER));
    }
    let mut req = req;
    if shared.tag_peer.load(Ordering::Relaxed)
        && let Some(addr) = peer.addr
    {
        req.extensions_mut()
            .insert(sluice_layers::enrich::PeerAddr(addr));
    }
    if let Some(identity) = &peer.identity {
        req.extensions_mut().insert(identity.clone());
    }
    if shared.peeks.load(Ordering::Relaxed) {
        // One peek budget per connection, however the stack is cloned.
        req.extensions_mut().insert(
            peer.peek_budget
                .get_or_init(sluice_layers::peek::ConnectionBudget::new)
                .clone(),
        );
    }
    // The call counts as in flight until its answer is out or abandoned.
    let in_flight = Held::count(&shared.counters, Kind::Call);
    CallFuture::new(svc.call(req.map(RecvBody::new)), respond, in_flight)
}
