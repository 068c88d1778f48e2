//! The downstream side: accept loop, HTTP/2 settings, and the edge where
//! errors become gRPC statuses.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response};
use http_body::Body;
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tower::{Service, ServiceExt, util::Oneshot};
use tracing::{debug, warn};

use crate::{
    config::ServerConfig,
    forward::{self, ForwardError},
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

/// Adapts the tower stack to hyper: each call runs the stack once, and an
/// error becomes a trailers-only gRPC status, except an upstream reset,
/// which hyper passes on as RST_STREAM with the upstream's reason.
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
    B: Default,
{
    type Response = Response<B>;
    type Error = ForwardError;
    type Future = Rescue<Oneshot<S, Request<Incoming>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Rescue {
            inner: self.svc.clone().oneshot(req),
        }
    }
}

pin_project! {
    /// Maps the stack's errors to gRPC statuses (see [`forward::rescue`]).
    #[derive(Debug)]
    pub(crate) struct Rescue<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B> Future for Rescue<F>
where
    F: Future<Output = Result<Response<B>, ForwardError>>,
    B: Default,
{
    type Output = Result<Response<B>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(ready!(self.project().inner.poll(cx)).or_else(forward::rescue))
    }
}

/// Accepts connections until `stop` turns true, then asks every connection
/// to finish (GOAWAY, in-flight streams complete) and waits up to `grace`
/// for them before closing what is left.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    builder: http2::Builder<TokioExecutor>,
    handler: Handler<S>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    counters: Arc<Counters>,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = ForwardError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = bytes::Bytes> + Default + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let builder = builder.clone();
                    let handler = handler.clone();
                    let mut stop = stop.clone();
                    let gauge = Gauge::hold(&counters, Kind::DownstreamConnection);
                    conns.spawn(async move {
                        let _gauge = gauge;
                        let conn = builder.serve_connection(TokioIo::new(tcp), handler);
                        tokio::pin!(conn);
                        let result = tokio::select! {
                            result = conn.as_mut() => result,
                            () = stopped(&mut stop) => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                        if let Err(e) = result {
                            debug!(%peer, error = %e, "downstream connection ended with an error");
                        }
                    });
                }
                Err(e) if is_per_connection(&e) => debug!(error = %e, "accept failed"),
                Err(e) => {
                    warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            ?grace,
            "connections still open after the shutdown grace period; closing them"
        );
        conns.shutdown().await;
    }
}

/// Resolves once `stop` says true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Accept errors that concern only the connection being accepted.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}
