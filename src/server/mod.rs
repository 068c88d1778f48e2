//! The downstream side: accept loop, HTTP/2 settings, and the edge where
//! errors become gRPC statuses.

use std::{sync::Arc, time::Duration};

use http::{Request, Response};
use http_body::Body;
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tower::{Service, ServiceExt, util::Oneshot};
use tracing::{debug, warn};

use sluice_layers::drain::Watch;

use crate::{
    batch::{self, Flushed},
    config::ServerConfig,
    forward::ForwardError,
    stats::{Counters, Gauge, Kind},
};

/// How long to wait before accepting again after an accept error that is
/// not about one connection (EMFILE, ENOBUFS): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

mod conn;
mod sniff;

/// After sluice told a connection to go (idle, or abusive), how long it may
/// take to finish before it is closed outright.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// The limits each connection task enforces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_resets_per_second: u32,
}

impl Limits {
    pub(crate) fn from_config(config: &ServerConfig) -> Self {
        Self {
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
            max_resets_per_second: config.max_resets_per_second,
        }
    }
}

/// The hyper HTTP/2 server settings from the config.
pub(crate) fn http2_builder(config: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        // h2's CVE-2023-44487 defence: streams reset before they are
        // accepted count, and past the limit the connection gets
        // GOAWAY(ENHANCE_YOUR_CALM).
        .max_pending_accept_reset_streams(config.max_pending_accept_resets)
        .max_concurrent_streams(config.max_concurrent_streams)
        .initial_stream_window_size(config.initial_stream_window.0)
        .initial_connection_window_size(config.initial_connection_window.0)
        .max_frame_size(config.max_frame_size.0)
        .max_header_list_size(config.max_header_list_size.0)
        // Responses are the upstream's, byte for byte: no `date` added.
        .auto_date_header(false);
    b
}

/// Adapts the tower stack to hyper for one connection: each call runs the
/// stack once (`Oneshot` polls readiness, then calls), and is counted on
/// the connection until its response body ends.
#[derive(Clone, Debug)]
pub(crate) struct Handler<S> {
    svc: S,
    conn: Option<Arc<conn::ConnState>>,
}

impl<S> Handler<S> {
    pub(crate) fn new(svc: S) -> Self {
        Self { svc, conn: None }
    }

    fn for_connection(&self, conn: Arc<conn::ConnState>) -> Self
    where
        S: Clone,
    {
        Self {
            svc: self.svc.clone(),
            conn: Some(conn),
        }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Handler<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = ForwardError> + Clone,
    B: Body,
{
    type Response = Response<conn::Tracked<B>>;
    type Error = ForwardError;
    type Future = conn::TrackedFuture<Oneshot<S, Request<Incoming>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let conn = self.conn.as_ref().expect("handlers serve a connection");
        conn::TrackedFuture::new(self.svc.clone().oneshot(req), conn.call_started())
    }
}

/// Accepts connections until the drain begins; then tells every
/// connection to go (GOAWAY in two steps, in-flight streams complete) and
/// waits for them to close, unless `abort` turns true first (the drain
/// deadline passed and the flush window ran out), which closes them at once.
///
/// Each connection task holds a drain guard until its connection closes.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    builder: http2::Builder<TokioExecutor>,
    handler: Handler<S>,
    limits: Limits,
    watch: Watch,
    mut abort: watch::Receiver<bool>,
    counters: Arc<Counters>,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = ForwardError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder);
    let mut conns = JoinSet::new();
    let draining = watch.clone().signaled();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            _ = &mut draining => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    if counters.snapshot().downstream_connections >= limits.max_connections {
                        conns.spawn(refuse_connection(tcp, peer));
                        continue;
                    }
                    let gauge = Gauge::hold(&counters, Kind::DownstreamConnection);
                    conns.spawn(connection(tcp, builder.clone(), handler.clone(), limits, watch.clone(), gauge, peer));
                }
                Err(e) if is_per_connection(&e) => debug!(error = %e, "accept failed"),
                Err(e) => {
                    warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    // Stop accepting: new connections are refused by the kernel from here.
    drop(listener);
    tokio::select! {
        () = async { while conns.join_next().await.is_some() {} } => {}
        () = stopped(&mut abort) => {
            warn!(connections = conns.len(), "closing connections still open after the drain deadline");
            conns.shutdown().await;
        }
    }
}

/// A connection over `max_connections`: completes the HTTP/2 handshake and
/// answers GOAWAY(ENHANCE_YOUR_CALM) with last-stream-id 0, so the client
/// knows to go elsewhere rather than seeing a bare close. hyper's
/// connection cannot send a GOAWAY reason, so this uses h2 directly.
async fn refuse_connection(tcp: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    debug!(%peer, "connection limit reached; refusing connection");
    let refused = async {
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            return;
        };
        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    };
    let _ = tokio::time::timeout(GOAWAY_GRACE, refused).await;
}

/// Serves one connection: sniffs the protocol, then serves HTTP/2 until the
/// peer goes, the connection idles out, the client resets too many calls,
/// or the drain begins (GOAWAY, then the streams already open finish).
async fn connection<S, B>(
    tcp: tokio::net::TcpStream,
    builder: Arc<http2::Builder<TokioExecutor>>,
    handler: Handler<S>,
    limits: Limits,
    watch: Watch,
    _gauge: Gauge,
    peer: std::net::SocketAddr,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = ForwardError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _guard = watch.guard();
    match tokio::time::timeout(limits.handshake_timeout, sniff::sniff(&tcp)).await {
        Ok(Ok(sniff::Protocol::Http2)) => {}
        Ok(Ok(sniff::Protocol::Http1)) => {
            debug!(%peer, "HTTP/1 request on the h2c port; answering 505");
            return sniff::refuse_http1(tcp).await;
        }
        Ok(Ok(sniff::Protocol::NotSettingsFirst)) => {
            debug!(%peer, "first frame after the preface is not SETTINGS; GOAWAY(PROTOCOL_ERROR)");
            return sniff::refuse_bad_preface(tcp).await;
        }
        Ok(Ok(sniff::Protocol::Closed) | Err(_)) => return,
        Err(_) => {
            debug!(%peer, "no HTTP/2 preface within the handshake timeout; closing");
            return;
        }
    }
    let state = conn::ConnState::new(limits.max_resets_per_second);
    let (io, flusher) = batch::new(tcp);
    let conn = builder.serve_connection(TokioIo::new(io), handler.for_connection(state.clone()));
    let conn = Flushed::new(conn, flusher);
    tokio::pin!(conn);
    let draining = watch.signaled();
    tokio::pin!(draining);
    let result = loop {
        let deadline = state.idle_deadline(limits.handshake_timeout, limits.idle_timeout);
        tokio::select! {
            result = conn.as_mut() => break result,
            _signaled = &mut draining => {
                // h2 sends GOAWAY(2^31-1), then after a PING round trip the
                // real last stream id, so no request already on the wire is
                // lost.
                conn.as_mut().get_pin_mut().graceful_shutdown();
                break conn.await;
            }
            () = sleep_until_some(deadline) => {
                let still_idle = state
                    .idle_deadline(limits.handshake_timeout, limits.idle_timeout)
                    .is_some_and(|d| d <= tokio::time::Instant::now());
                if still_idle {
                    debug!(%peer, "connection idle; GOAWAY(NO_ERROR)");
                    conn.as_mut().get_pin_mut().graceful_shutdown();
                    break tokio::time::timeout(GOAWAY_GRACE, conn.as_mut()).await.unwrap_or(Ok(()));
                }
            }
            () = state.changed() => {
                if state.too_many_resets() {
                    warn!(%peer, "client reset calls faster than server.max_resets_per_second; GOAWAY");
                    conn.as_mut().get_pin_mut().graceful_shutdown();
                    break tokio::time::timeout(GOAWAY_GRACE, conn.as_mut()).await.unwrap_or(Ok(()));
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "downstream connection ended with an error");
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `flag` says true (or its sender is gone).
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Accept errors that concern only the connection being accepted.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}
