//! The admin server: plain HTTP/1.1 on its own address.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200 when serving; 503 while draining (and, if configured, while no upstream is reachable, no agent is connected, or the xDS control plane has not answered yet) |
//! | `GET /metrics` | Prometheus text exposition |
//! | `POST /drain` | 202, and the drain begins (403 from a peer that is not on loopback, unless `admin.control = "any"`) |
//! | `POST /reload` | the config file read again and applied: 200 with what changed, 422 with the error when it is invalid (nothing changes), 409 without a file; loopback only as `POST /drain` |
//! | `GET /config` | the config in force, as `sluice check` prints it, and where it came from |

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_layers::drain::Watch;
use tokio::{net::TcpListener, sync::Notify};
use tracing::debug;

use crate::{stats::Counters, telemetry::metrics::Metrics};

/// How long the admin accept loop pauses after an accept error.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether the upstream can be reached now (a connection open, or one
/// dialled).
pub(crate) type ReachableFn =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Reloads the config: the text of the answer, or why nothing changed
/// (and whether that is the file's fault, 422, or no file at all, 409).
pub(crate) type ReloadFn = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = (StatusCode, String)> + Send>> + Send + Sync,
>;

/// What the admin routes read and poke: handles the app hands over, never
/// another room's types.
pub(crate) struct State {
    /// The drain handle: `/ready` is 503 from its announcement on.
    pub(crate) drain: Watch,
    pub(crate) drain_requested: Arc<Notify>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) counters: Arc<Counters>,
    /// Asked by `/ready` when `admin.ready_requires_upstream`.
    pub(crate) upstream_reachable: Option<ReachableFn>,
    /// A hub's agents connected now; `/ready` needs one when
    /// `admin.ready_requires_agents`.
    pub(crate) agents: Option<Arc<dyn Fn() -> usize + Send + Sync>>,
    pub(crate) ready_requires_agents: bool,
    /// Who may drain and reload.
    pub(crate) control: crate::config::AdminControl,
    /// `POST /reload`.
    pub(crate) reload: Option<ReloadFn>,
    /// `GET /config`.
    pub(crate) config: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// Whether the xDS control plane answered, when `/ready` waits for it
    /// (`xds.ready_requires_config`).
    pub(crate) xds_ready: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field(
                "ready_requires_upstream",
                &self.upstream_reachable.is_some(),
            )
            .field("ready_requires_agents", &self.ready_requires_agents)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

/// Serves admin connections until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like outlast a retry at once: pause, so the
                // loop does not spin on them.
                debug!(error = %e, "admin accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), peer, req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

/// Whether `peer` may use the endpoints that change state.
fn may_control(control: crate::config::AdminControl, peer: std::net::SocketAddr) -> bool {
    // An IPv4 peer on a dual-stack socket shows as ::ffff:127.0.0.1.
    control == crate::config::AdminControl::Any || peer.ip().to_canonical().is_loopback()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

async fn handle(
    state: Arc<State>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let may_control = may_control(state.control, peer);
    let res = match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            let agents = || state.agents.as_ref().map_or(0, |n| n());
            if !state.drain.is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if let Some(reachable) = &state.upstream_reachable
                && !reachable().await
            {
                text(StatusCode::SERVICE_UNAVAILABLE, "upstream unreachable\n")
            } else if state.ready_requires_agents && agents() == 0 {
                text(StatusCode::SERVICE_UNAVAILABLE, "no agent connected\n")
            } else if state.xds_ready.as_ref().is_some_and(|answered| !answered()) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the xDS control plane's first answer\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            // What the scraper asks for: OpenMetrics, or else the
            // Prometheus text format (whose parser types OpenMetrics
            // counters `unknown`).
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let mut res = Response::new(Full::new(Bytes::from(state.metrics.encode(
                &state.counters,
                &state.drain,
                openmetrics,
            ))));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(if openmetrics {
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                } else {
                    "text/plain; version=0.0.4; charset=utf-8"
                }),
            );
            res
        }
        (&Method::POST, "/drain") if !may_control => text(
            StatusCode::FORBIDDEN,
            "POST /drain is for loopback peers (admin.control = \"any\" lets anyone)\n",
        ),
        (&Method::POST, "/drain") => {
            state.drain_requested.notify_one();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (&Method::POST, "/reload") if !may_control => text(
            StatusCode::FORBIDDEN,
            "POST /reload is for loopback peers (admin.control = \"any\" lets anyone)\n",
        ),
        (&Method::POST, "/reload") => match &state.reload {
            Some(reload) => {
                let (status, body) = reload().await;
                text(status, body)
            }
            None => text(StatusCode::CONFLICT, "nothing to reload\n"),
        },
        (&Method::GET, "/config") => match &state.config {
            Some(config) => text(StatusCode::OK, config()),
            None => text(StatusCode::NOT_FOUND, "no config view\n"),
        },
        (_, "/live" | "/ready" | "/metrics" | "/drain" | "/reload" | "/config") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready, /metrics, /config, POST /drain, POST /reload\n",
        ),
    };
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminControl;

    #[test]
    fn only_loopback_peers_may_drain_unless_configured_otherwise() {
        let at = |a: &str| a.parse::<std::net::SocketAddr>().expect("address");
        for local in [
            "127.0.0.1:5000",
            "127.0.0.2:1",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(may_control(AdminControl::Loopback, at(local)), "{local}");
        }
        for remote in [
            "10.0.0.7:5000",
            "192.168.1.2:1",
            "[2001:db8::1]:5000",
            "[::ffff:10.0.0.7]:1",
        ] {
            assert!(!may_control(AdminControl::Loopback, at(remote)), "{remote}");
            assert!(may_control(AdminControl::Any, at(remote)), "{remote}");
        }
    }
}
