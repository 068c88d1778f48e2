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
    config::ServerConfig,
    forward::ForwardError,
    stats::{Counters, Gauge, Kind},
};

/// How long to wait before accepting again after an accept error that is
/// not about one connection (EMFILE, ENOBUFS): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The hyper HTTP/2 server settings from the config.
pub(crate) fn http2_builder(config: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(config.max_concurrent_streams)
        .initial_stream_window_size(config.initial_stream_window.0)
        .initial_connection_window_size(config.initial_connection_window.0)
        .max_frame_size(config.max_frame_size.0)
        .max_header_list_size(config.max_header_list_size.0)
        // Responses are the upstream's, byte for byte: no `date` added.
        .auto_date_header(false);
    b
}

/// Adapts the tower stack to hyper: each call runs the stack once
/// (`Oneshot` polls readiness, then calls).
#[derive(Clone, Debug)]
pub(crate) struct Handler<S> {
    svc: S,
}

impl<S> Handler<S> {
    pub(crate) fn new(svc: S) -> Self {
        Self { svc }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Handler<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = ForwardError> + Clone,
{
    type Response = Response<B>;
    type Error = ForwardError;
    type Future = Oneshot<S, Request<Incoming>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.svc.clone().oneshot(req)
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
                    let conn = builder.serve_connection(TokioIo::new(tcp), handler.clone());
                    let gauge = Gauge::hold(&counters, Kind::DownstreamConnection);
                    conns.spawn(connection(conn, watch.clone(), gauge, peer));
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

/// Serves one connection; when the drain begins, sends GOAWAY and keeps
/// serving the streams already open until they finish.
async fn connection<S, B>(
    conn: http2::Connection<TokioIo<tokio::net::TcpStream>, Handler<S>, TokioExecutor>,
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
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _signaled = watch.signaled() => {
            // h2 sends GOAWAY(2^31-1), then after a PING round trip the real
            // last stream id, so no request already on the wire is lost.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "downstream connection ended with an error");
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
