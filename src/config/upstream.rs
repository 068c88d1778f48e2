//! `[upstream]` and `[upstreams.NAME]`: the endpoints calls go to and
//! how they are dialled.

use std::time::Duration;

use serde::Deserialize;

use super::{
    ByteSize, HostPort, OutlierConfig, ThrottleConfig, UpstreamTlsConfig, WindowSize, defaults::*,
    value,
};

/// `[upstreams.NAME]`: a named group of endpoints.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The endpoints: `"host:port"`, or a table with identifiers and the
    /// default-route mark. Empty only for the group tunnel agents join.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// How an endpoint is chosen: strategies tried in order, falling
    /// through to the next only when one finds no endpoint.
    #[serde(default = "default_strategies")]
    pub strategy: Vec<Strategy>,
    /// The metadata key `dest-host` reads; without it in a call,
    /// `dest-host` uses the `:authority` host.
    #[serde(default = "default_dest_host_key")]
    pub dest_host_key: String,
    /// Active health checking with `grpc.health.v1`; off unless given.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// How often endpoints given by name are resolved again; each address
    /// a name resolves to is an endpoint of its own.
    #[serde(default = "default_resolve_interval", with = "value::duration")]
    pub resolve_interval: Duration,
    /// TLS to this group's endpoints; plaintext h2c unless given.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// `upstream.connect_timeout` for this group.
    #[serde(default, deserialize_with = "value::optional_duration")]
    pub connect_timeout: Option<Duration>,
    /// `upstream.max_connections` for this group.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// `upstream.idle_timeout` for this group.
    #[serde(default, deserialize_with = "value::optional_duration")]
    pub idle_timeout: Option<Duration>,
    /// Calls in flight to the group as a whole, at most (gRFC A32's
    /// circuit breaker); a call over it fails UNAVAILABLE at once, with no
    /// queue. No limit unless given.
    #[serde(default, deserialize_with = "value::positive::optional")]
    pub max_requests: Option<usize>,
    /// Ejection of endpoints that fail more than their peers (gRFC A50);
    /// off unless given.
    #[serde(default)]
    pub outlier_detection: Option<OutlierConfig>,
    /// The token bucket that stops retries and hedges to a failing group
    /// (gRFC A6); unthrottled unless given.
    #[serde(default)]
    pub retry_throttling: Option<ThrottleConfig>,
}

/// How often endpoint names are resolved again: 30 s, a common DNS TTL for
/// service records (Kubernetes headless services included).
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

fn default_resolve_interval() -> Duration {
    DEFAULT_RESOLVE_INTERVAL
}

/// `health_check = { … }` of a group: each endpoint is asked
/// `grpc.health.v1.Health/Check` every `interval`; one that does not answer
/// SERVING within `timeout` is avoided until it does.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between checks.
    #[serde(with = "value::duration")]
    pub interval: Duration,
    /// Time an answer may take.
    #[serde(with = "value::duration")]
    pub timeout: Duration,
    /// The service asked about; empty for the server as a whole.
    #[serde(default)]
    pub service: String,
}

/// One endpoint of a group.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EndpointConfig {
    /// Just an address.
    Address(HostPort),
    /// An address with more.
    Detailed {
        /// `host:port`.
        address: HostPort,
        /// Names `dest-host` matches besides the host part of the address.
        #[serde(default)]
        ids: Vec<String>,
        /// Whether `default-route` may choose it.
        #[serde(default)]
        default_route: bool,
    },
}

/// A way of choosing an endpoint (konnectivity's strategies, plus sluice's
/// load-aware default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The endpoint whose identifiers match the call's destination host.
    DestHost,
    /// Among endpoints marked `default_route`.
    DefaultRoute,
    /// Uniformly at random.
    Random,
    /// Power-of-two-choices over peak-EWMA latency and load.
    LeastLoaded,
}

fn default_strategies() -> Vec<Strategy> {
    vec![Strategy::LeastLoaded]
}

/// The metadata key `dest-host` reads by default.
pub const DEFAULT_DEST_HOST_KEY: &str = "x-dest-host";

fn default_dest_host_key() -> String {
    DEFAULT_DEST_HOST_KEY.to_owned()
}

impl std::fmt::Display for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(a) => write!(f, "{a}"),
            Self::Detailed {
                address,
                ids,
                default_route,
            } => {
                write!(f, "{address}")?;
                if !ids.is_empty() {
                    write!(f, " (ids {})", ids.join(", "))?;
                }
                if *default_route {
                    f.write_str(" [default-route]")?;
                }
                Ok(())
            }
        }
    }
}

impl EndpointConfig {
    /// The endpoint's address.
    pub fn address(&self) -> &HostPort {
        match self {
            Self::Address(a) | Self::Detailed { address: a, .. } => a,
        }
    }
}

/// `[upstream]`: the one upstream every call goes to, and how to reach it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `host:port` of the upstream's h2c server.
    pub address: HostPort,
    /// Time allowed to open a connection to the upstream, TCP (or Unix)
    /// connect and TLS handshake together.
    #[serde(with = "value::duration")]
    pub connect_timeout: Duration,
    /// Connections opened to one upstream endpoint at most.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub max_connections: usize,
    /// Streams opened on one upstream connection at most (fewer if the
    /// upstream's MAX_CONCURRENT_STREAMS says so).
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub max_streams_per_connection: u32,
    /// Initial per-stream receive window for responses. A call whose client
    /// stops reading holds at most this much in sluice (window goes back to
    /// the upstream only for what the client took), so stalled readers cost
    /// at most `min(server.max_in_flight, endpoints × max_connections ×
    /// max_streams_per_connection) × initial_stream_window` bytes.
    pub initial_stream_window: WindowSize,
    /// Initial connection receive window for responses. Unset, it is
    /// `max_streams_per_connection × initial_stream_window`, so that
    /// stalled streams can never exhaust it; a value set here must be at
    /// least that.
    pub initial_connection_window: Option<WindowSize>,
    /// SETTINGS_MAX_FRAME_SIZE advertised to the upstream.
    pub max_frame_size: FrameSize,
    /// Framing overhead allowed for buffered small DATA frames from the
    /// upstream (see [`DEFAULT_UPSTREAM_DATA_FRAME_BUDGET`]).
    pub data_frame_budget: ByteSize,
    /// HTTP/2 PING interval to the upstream, while calls are in flight.
    #[serde(with = "value::duration")]
    pub keepalive_interval: Duration,
    /// Unanswered PING timeout before the upstream connection is dropped.
    #[serde(with = "value::duration")]
    pub keepalive_timeout: Duration,
    /// An upstream connection with no call this long is closed (and
    /// reopened on demand); the pool never keeps dead weight.
    #[serde(with = "value::duration")]
    pub idle_timeout: Duration,
    /// TLS to the upstream; plaintext h2c unless given.
    pub tls: Option<UpstreamTlsConfig>,
}

/// SETTINGS_MAX_FRAME_SIZE: between 16 384 and 16 777 215 (RFC 9113 §6.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSize(pub u32);

impl UpstreamConfig {
    /// The connection receive window that lets every stream of a full
    /// connection hold its whole stream window:
    /// `max_streams_per_connection × initial_stream_window`.
    pub fn isolating_connection_window(&self) -> u64 {
        u64::from(self.max_streams_per_connection) * u64::from(self.initial_stream_window.0)
    }

    /// The connection receive window advertised to the upstream: the
    /// configured one, or [`Self::isolating_connection_window`].
    pub fn connection_window(&self) -> u32 {
        self.initial_connection_window.map_or_else(
            || u32::try_from(self.isolating_connection_window()).unwrap_or(u32::MAX >> 1),
            |w| w.0,
        )
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            address: DEFAULT_UPSTREAM.parse().expect("literal address"),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: DEFAULT_MAX_UPSTREAM_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            initial_stream_window: WindowSize(DEFAULT_UPSTREAM_STREAM_WINDOW),
            initial_connection_window: None,
            max_frame_size: FrameSize(DEFAULT_MAX_FRAME_SIZE),
            data_frame_budget: ByteSize(DEFAULT_UPSTREAM_DATA_FRAME_BUDGET),
            keepalive_interval: DEFAULT_UPSTREAM_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            tls: None,
        }
    }
}
