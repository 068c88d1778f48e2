//! The downstream side: the accept loop, what each connection speaks, and
//! HTTP/2 served with h2 directly (see [`conn`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sluice_layers::{BoxError, drain::Watch, identity::PeerIdentity};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    task::JoinSet,
    time::Instant,
};
use tower::Service;
use tracing::{debug, warn};

use crate::{
    proto::flow::RecvBody,
    proto::transport::Listener,
    stats::{Held, Kind},
    tls::server::ServerTls,
};

mod call;
mod conn;
mod sniff;

pub(crate) use self::conn::ListenerSettings;

/// How long to wait before accepting again after an accept error that is
/// not about one connection (EMFILE, ENOBUFS): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long a connection over `max_connections` gets to take its GOAWAY.
const REFUSE_GRACE: Duration = Duration::from_secs(1);

/// What the server hands each call to, in one bound (hyper's
/// `HttpService` idea): a cloneable service answering a request whose body
/// is the client's h2 stream with a response whose body carries `Bytes`.
pub(crate) trait CallService:
    Service<Request<RecvBody>, Response = Response<Self::ResBody>, Error = Self::Err> + Clone
{
    /// The response body.
    type ResBody: Body<Data = Bytes, Error: Into<BoxError>>;
    /// The service's error.
    type Err: Into<BoxError>;
}

impl<S, B> CallService for S
where
    S: Service<Request<RecvBody>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type ResBody = B;
    type Err = S::Error;
}

/// Who is at the other end of a connection.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    /// Its address (none over a Unix socket).
    pub(crate) addr: Option<SocketAddr>,
    /// The identity its verified client certificate proves.
    pub(crate) identity: Option<PeerIdentity>,
    /// A tunnel this agent dialled to a hub: no idle or first-request
    /// deadline, and no per-connection reset limit (the calls of every
    /// client of the hub share it; the hub limits each client).
    pub(crate) tunnel: bool,
    /// What every call of the connection may hold of peeked messages
    /// together (`routing.peek_max_bytes_per_connection`); made at the
    /// first call that peeks, so a connection of a config that never
    /// peeks does not carry one.
    pub(crate) peek_budget: std::sync::OnceLock<sluice_layers::peek::ConnectionBudget>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unix"),
        }
    }
}

/// Accepts connections until the drain begins; then tells every
/// connection to go (GOAWAY in two steps, in-flight streams complete) and
/// waits for them to close, unless `abort` turns true first (the drain
/// deadline passed and the flush window ran out), which closes them at once.
///
/// Each connection task holds a drain guard until its connection closes.
/// With `tls`, each connection's TLS handshake runs first, in its own task
/// and under the handshake deadline.
pub(crate) async fn serve<S>(
    listener: Listener,
    tls: Option<Arc<ServerTls>>,
    shared: Arc<ListenerSettings>,
    svc: S,
    max_connections: usize,
    watch: Watch,
    mut abort: watch::Receiver<bool>,
) where
    S: CallService + Send + Sync + 'static,
    S::Err: Send,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Error: Send,
{
    let mut conns = JoinSet::new();
    let draining = watch.clone().signaled();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            _ = &mut draining => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((io, addr)) => {
                    let peer = Peer {
                        addr,
                        identity: None,
                        tunnel: false,
                        peek_budget: std::sync::OnceLock::new(),
                    };
                    if shared.counters().snapshot().downstream_connections >= max_connections {
                        // Over TLS the connection is closed at once: a
                        // GOAWAY would need a handshake first, a private-key
                        // operation per connection of a flood.
                        match &tls {
                            None => {
                                conns.spawn(refuse_connection(io, peer));
                            }
                            Some(_) => debug!(%peer, "connection limit reached; closing a TLS connection before its handshake"),
                        }
                        continue;
                    }
                    let gauge = Held::count(shared.counters(), Kind::DownstreamConnection);
                    match &tls {
                        None => conns.spawn(connection(io, shared.clone(), svc.clone(), watch.clone(), gauge, peer)),
                        Some(tls) => conns.spawn(tls_connection(io, tls.clone(), shared.clone(), svc.clone(), watch.clone(), gauge, peer)),
                    };
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
/// knows to go elsewhere rather than seeing a bare close.
async fn refuse_connection<T>(io: T, peer: Peer)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    debug!(%peer, "connection limit reached; refusing connection");
    let refused = async {
        let Ok(mut conn) = h2::server::handshake(io).await else {
            return;
        };
        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    };
    let _ = tokio::time::timeout(REFUSE_GRACE, refused).await;
}

/// The TLS handshake of a connection from `peer`, by `deadline`; a
/// failure is logged (debug: clients fail handshakes all the time) and
/// counted by reason.
async fn handshake<T>(
    io: T,
    tls: &ServerTls,
    shared: &ListenerSettings,
    peer: &Peer,
    deadline: Instant,
) -> Option<(tokio_rustls::server::TlsStream<T>, Option<PeerIdentity>)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match tls.accept(io, deadline).await {
        Ok(accepted) => Some(accepted),
        Err(e) => {
            let reason = crate::tls::failure_reason(&e);
            debug!(%peer, reason, error = %e, "TLS handshake failed");
            shared.metrics().tls_handshake_failed("downstream", reason);
            None
        }
    }
}

/// Serves one TLS connection: the handshake, then [`connection`]'s work
/// on the decrypted stream, all by the one handshake deadline. The
/// handshake and the TLS stream are boxed: rustls's connection state is
/// large, and unboxed it would be in every connection future.
async fn tls_connection<T, S>(
    io: T,
    tls: Arc<ServerTls>,
    shared: Arc<ListenerSettings>,
    mut svc: S,
    watch: Watch,
    _gauge: Held,
    mut peer: Peer,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    S: CallService,
{
    let _guard = watch.guard();
    let deadline = Instant::now() + shared.handshake_timeout();
    let Some((io, identity)) = Box::pin(handshake(io, &tls, &shared, &peer, deadline)).await else {
        return;
    };
    drop(tls);
    peer.identity = identity;
    serve_io(Box::new(io), &shared, &mut svc, watch, &peer, deadline).await;
}

/// Serves one connection: decides what it speaks, under the handshake
/// deadline, then serves HTTP/2 or refuses it.
async fn connection<T, S>(
    io: T,
    shared: Arc<ListenerSettings>,
    mut svc: S,
    watch: Watch,
    _gauge: Held,
    peer: Peer,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    S: CallService,
{
    let _guard = watch.guard();
    let deadline = Instant::now() + shared.handshake_timeout();
    serve_io(io, &shared, &mut svc, watch, &peer, deadline).await;
}

/// What [`connection`] and [`tls_connection`] share: the sniff, then
/// HTTP/2 or a refusal. Everything but the transport by reference: an
/// async fn keeps its arguments for its whole life, so values moved in
/// here would take their space in every connection future twice.
async fn serve_io<T, S>(
    mut io: T,
    shared: &ListenerSettings,
    svc: &mut S,
    watch: Watch,
    peer: &Peer,
    deadline: Instant,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    S: CallService,
{
    let (protocol, prefix) = match sniff::sniff(&mut io, deadline).await {
        Ok(sniffed) => sniffed,
        Err(e) => {
            debug!(%peer, error = %e, "no protocol decided within the handshake timeout; closing");
            return;
        }
    };
    match protocol {
        sniff::Protocol::Http2 => {
            conn::serve(io, prefix, deadline, svc, shared, watch, peer).await;
        }
        // The refusals are boxed: rare, and the connection future of every
        // HTTP/2 connection would otherwise carry their size.
        sniff::Protocol::Http1 => {
            debug!(%peer, "HTTP/1 request on the h2c port; answering 505");
            Box::pin(sniff::refuse_http1(io, prefix, deadline)).await;
        }
        sniff::Protocol::BadPreface => {
            debug!(%peer, "not an HTTP/2 preface (or a first frame that is not SETTINGS); GOAWAY(PROTOCOL_ERROR)");
            Box::pin(sniff::refuse_bad_preface(io, deadline)).await;
        }
        sniff::Protocol::Tls => {
            debug!(%peer, "a TLS handshake on the h2c port; answering with a TLS alert");
            Box::pin(sniff::refuse_tls(io, deadline)).await;
        }
        sniff::Protocol::Closed => {}
    }
}

/// Serves a connection sluice dialled itself (an agent's tunnel to a
/// hub) as a downstream one: the hub is the HTTP/2 client.
pub(crate) async fn serve_tunnel<S>(
    io: crate::proto::transport::Stream,
    shared: Arc<ListenerSettings>,
    svc: S,
    watch: Watch,
) where
    S: CallService,
{
    let gauge = Held::count(shared.counters(), Kind::DownstreamConnection);
    let peer = Peer {
        addr: None,
        identity: None,
        tunnel: true,
        peek_budget: std::sync::OnceLock::new(),
    };
    connection(io, shared, svc, watch, gauge, peer).await;
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
