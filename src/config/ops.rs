//! What an operator runs sluice with: `[log]`, `[trace]`, `[drain]`,
//! `[admin]`, `[reload]` and `[runtime]`.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{defaults::*, value};

/// `[trace]`: OpenTelemetry export of each call's span. Off unless an
/// endpoint is given; off costs nothing per call.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces`.
    pub otlp_endpoint: Option<OtlpEndpoint>,
    /// The `service.name` resource of exported spans.
    pub service_name: String,
}

/// An `http://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpEndpoint(pub String);

/// `[reload]`: reading the config file again while calls run. SIGHUP and
/// `POST /reload` always do; `watch` also polls the file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Poll the file every `interval` and reload when it changed (its
    /// size, modification time or inode: a Kubernetes ConfigMap's symlink
    /// swap counts).
    pub watch: bool,
    /// How often `watch` looks.
    #[serde(with = "value::duration")]
    pub interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: false,
            interval: DEFAULT_CONFIG_WATCH_INTERVAL,
        }
    }
}

/// `[drain]`: what happens on SIGTERM or `POST /drain`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// After `/ready` turns false, keep serving normally this long before
    /// telling connections to go (lets Kubernetes remove the endpoint).
    #[serde(with = "value::duration_or_zero")]
    pub pre_delay: Duration,
    /// How long calls in flight may run once connections were told to go;
    /// at the deadline every call still open ends with UNAVAILABLE.
    #[serde(with = "value::duration")]
    pub deadline: Duration,
}

/// `[admin]`: the admin HTTP/1.1 server.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin server, or `"off"`.
    pub listen: AdminListen,
    /// Whether `/ready` also requires a reachable upstream (a connection
    /// open, or a dial that succeeds within `upstream.connect_timeout`).
    pub ready_requires_upstream: bool,
    /// Whether `/ready` also requires at least one connected tunnel agent
    /// (a hub only).
    pub ready_requires_agents: bool,
    /// Who may use the admin endpoints that change state (`POST /drain`):
    /// `loopback` (the default: the pod's own containers; probes and
    /// scrapes from elsewhere still read `/ready`, `/live`, `/metrics`) or
    /// `any` (no check: put the port behind a network policy).
    pub control: AdminControl,
}

/// Who may use the admin endpoints that change state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminControl {
    /// Peers on a loopback address only; others get 403.
    #[default]
    Loopback,
    /// Any peer that reaches the port.
    Any,
}

/// Where the admin server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminListen {
    /// No admin server.
    Off,
    /// This address (port 0 picks a free port).
    On(SocketAddr),
}

/// `[runtime]`: the tokio runtime.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; 1 runs sluice on a current-thread runtime.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub worker_threads: usize,
}

/// `[log]`: logging.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `sluice=debug,h2=info`, ...); `RUST_LOG`
    /// overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
    /// One line per call on stdout (in `format`): time, peer, method,
    /// authority, status and message, duration, bytes each way, upstream
    /// endpoint, group and route, request id and trace id. Off by default.
    pub access: bool,
}

/// The log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            pre_delay: Duration::ZERO,
            deadline: DEFAULT_DRAIN_DEADLINE,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: AdminListen::On(DEFAULT_ADMIN_LISTEN.parse().expect("literal address")),
            ready_requires_upstream: false,
            ready_requires_agents: false,
            control: AdminControl::Loopback,
        }
    }
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::On)
            .map_err(|_| format!("expected an address like 127.0.0.1:15090, or \"off\"; got {s:?}"))
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "sluice".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for OtlpEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let uri: http::Uri = s
            .parse()
            .map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(_)) => Ok(Self(s)),
            // The exporter is built without TLS (no second TLS stack in
            // the binary): an https endpoint would fail at every export.
            (Some("https"), _) => Err(serde::de::Error::custom(
                "https:// is not supported: the OTLP exporter speaks plain HTTP; \
                 export to an http:// collector (a local OpenTelemetry Collector \
                 forwards over TLS)",
            )),
            _ => Err(serde::de::Error::custom(
                "expected an http:// URL with a host",
            )),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
            access: false,
        }
    }
}
