//! sluice's configuration: one TOML file, read into plain data.
//!
//! [`Config::from_toml_str`] is pure, so tests pass strings. Every value is
//! checked while it is read, so an error names the key and the line and
//! column where it sits. With no file, sluice runs on the embedded
//! [`DEFAULT_TOML`]: inbound h2c on port 15051, forwarding to the
//! application on `127.0.0.1:50051`.

mod enrich;
mod error;
mod fanout;
mod tls;
mod tunnel;
mod value;

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

pub use self::enrich::EnrichConfig;
pub use self::error::ConfigError;
pub use self::fanout::{
    FailWhen, FanoutConfig, FanoutMode, FanoutRouteConfig, MalformedConfig, MirrorRouteConfig,
    OnErrorConfig, OverflowConfig, SecondaryConfig,
};
pub use self::tls::{
    ClientAuthConfig, ClientAuthMode, DEFAULT_CLIENT_ID_KEY, DEFAULT_RELOAD_INTERVAL,
    IdentityConfig, RoleSource, ServerTlsConfig, TlsConfig, UpstreamTlsConfig,
};
pub use self::tunnel::{
    AgentConfig, DEFAULT_AGENT_GROUP, DEFAULT_AGENT_WAIT, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN,
    DEFAULT_DISCOVERY_INTERVAL, DEFAULT_HUB_EXPIRY, DEFAULT_MAX_AGENTS,
    DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT, HubConfig, HubPeerConfig, IdentifiersConfig, TunnelConfig,
};
use self::value::MAX_WINDOW;
pub use self::value::{ByteSize, HostPort, WindowSize};

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The name of the group `[upstream]` defines.
pub const DEFAULT_GROUP: &str = "default";

/// The listen address of the embedded default: every interface, port 15051.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15051";
/// Where the embedded default forwards: the application in the same pod.
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:50051";

/// Streams one downstream connection may have open. Far above what one
/// application opens on one connection in practice (grpc-go defaults to
/// unlimited, tonic to 200 per connection), so the sidecar is never the
/// limit, while still bounding per-connection state.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Per-stream receive window: 1 MiB, so a 64 KiB-message stream never waits
/// a round trip for WINDOW_UPDATE (hyper's and linkerd's server default).
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;
/// Per-connection receive window: 4 MiB, four streams at full speed. This is
/// what bounds the memory one connection can make sluice hold.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 4 << 20;
/// The smallest frame size HTTP/2 allows (RFC 9113 §6.5.2), and what every
/// peer accepts; larger frames save little for gRPC's small messages.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// Decoded header list size accepted from a peer: 16 KiB, as grpc-go's and
/// nginx's defaults; gRPC metadata is small, and a limit bounds HPACK work.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16_384;
/// How long dialling the upstream may take before the call fails with
/// UNAVAILABLE: on loopback a connect takes microseconds, so one second only
/// matters for an upstream that silently drops SYNs.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections to one upstream endpoint at most. Another opens only when
/// every open one is at [`DEFAULT_MAX_STREAMS_PER_CONNECTION`] (or the
/// upstream's MAX_CONCURRENT_STREAMS), or when calls on each of them wait
/// for the upstream to read their uploads. 64 connections carry 6 400
/// calls at once, more than a sidecar's application serves; past that a
/// call waits up to `connect_timeout` for a free stream.
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 64;
/// Streams sluice opens on one upstream connection at most: 100, what h2
/// clients (hyper, grpc-go) assume of a server before its SETTINGS. With the
/// connection window at this many stream windows (the default of
/// `upstream.initial_connection_window`), streams whose clients stop
/// reading can never hold the whole connection window: each holds at most
/// its own stream window, and the others keep theirs.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Per-stream receive window for responses: 256 KiB. It is what one call
/// whose client stops reading can make sluice hold, so the memory stalled
/// readers cost is `calls × 256 KiB` (see `upstream.initial_stream_window`);
/// on loopback it still carries 64 KiB messages at full speed.
pub const DEFAULT_UPSTREAM_STREAM_WINDOW: u32 = 256 << 10;
/// Framing overhead h2 lets the upstream's buffered small DATA frames cost
/// before it closes the connection with ENHANCE_YOUR_CALM (h2 charges
/// 256 − len per frame under 256 bytes). h2's default, half the connection
/// window (2 MiB here, ~8 400 tiny frames), is a defence against hostile
/// peers; the upstream is the application, and a server streaming tiny
/// messages faster than a client drains them hits it, taking every call on
/// the connection down. 16 MiB allows ~67 000 buffered tiny frames.
pub const DEFAULT_UPSTREAM_DATA_FRAME_BUDGET: u32 = 16 << 20;
/// Time a new connection gets to send the HTTP/2 preface and its first
/// request: 10 s, as linkerd's protocol-detection timeout. A client that
/// trickles the preface a byte at a time (slowloris) is closed after it.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no call in flight for this long gets GOAWAY(NO_ERROR)
/// and is closed: 5 min, long enough that clients between bursts keep their
/// connection, short enough that abandoned ones do not pile up.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/2 PING interval on idle-looking connections, both sides: 20 s, what
/// gRPC's keepalive guidance uses, well under common NAT/LB idle cutoffs.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// HTTP/2 PING interval to the upstream, sent only while calls are in
/// flight: 5 min, the minimum grpc-go and gRPC C-core servers allow by
/// default; pinging more often earns GOAWAY(too_many_pings) from them.
pub const DEFAULT_UPSTREAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);
/// An upstream connection unused for this long is closed: 5 min, well
/// under the idle cutoffs of load balancers between sluice and a remote
/// group, and rare enough that reconnecting costs nothing.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A PING unanswered for this long marks the peer dead and closes the
/// connection (gRPC's default keepalive timeout).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Downstream connections served at once; beyond it a new connection gets
/// GOAWAY and is closed. 10 000 connections cost ~150 MiB at 15 KiB each,
/// far beyond a sidecar's clients but still bounded.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Calls in flight at once across all connections; beyond it a call is
/// answered RESOURCE_EXHAUSTED. 100 000, linkerd's in-flight default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 100_000;
/// Streams a client may open and reset before sluice accepts them, per
/// connection, before the connection gets GOAWAY(ENHANCE_YOUR_CALM): h2's
/// own CVE-2023-44487 defence, at its default of 20.
pub const DEFAULT_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Client-cancelled calls allowed per connection per second before the
/// connection is told to go: catches rapid reset on streams that were
/// already accepted, which h2's pending-accept count cannot see. A busy
/// client that hedges or abandons calls can cancel hundreds a second (the
/// leak test cancels ~500/s on one connection); rapid-reset attacks run at
/// tens of thousands. 1 000 sits between.
pub const DEFAULT_MAX_RESETS_PER_SECOND: u32 = 1000;

/// Drain deadline: 30 s, Kubernetes' default terminationGracePeriodSeconds.
/// Long-lived streams (Talos drains for 30 minutes) set it higher.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Where the admin server listens: loopback only, since `POST /drain` stops
/// the proxy.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15090";
/// Runtime worker threads: one, a current-thread runtime. Measured with
/// `benches/e2e.rs` on the 2-core machine, sluice sharing the cores with
/// its client and application: 11.7 µs of CPU per unary call and 3.2 µs per
/// bidi round trip on one thread, against 18.8 µs and 8.4 µs on two
/// work-stealing workers (cross-thread wake-ups and task migration). A
/// sidecar should take as little of its application's cores as it can;
/// raise this for a proxy with cores of its own.
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The downstream side: where sluice listens, and its HTTP/2 settings.
    pub server: ServerConfig,
    /// Where calls go.
    pub upstream: UpstreamConfig,
    /// The tokio runtime.
    pub runtime: RuntimeConfig,
    /// Logging.
    pub log: LogConfig,
    /// Shutdown: readiness, GOAWAY, grace period.
    pub drain: DrainConfig,
    /// The admin HTTP server: `/live`, `/ready`, `/metrics`, `POST /drain`.
    pub admin: AdminConfig,
    /// OpenTelemetry span export.
    pub trace: TraceConfig,
    /// More upstream groups, by name, besides `[upstream]` (group `default`).
    pub upstreams: std::collections::BTreeMap<String, GroupConfig>,
    /// Routes, tried in order; the first that matches decides.
    pub routes: Vec<RouteConfig>,
    /// What happens when no route matches, and how routing reads calls.
    pub routing: RoutingConfig,
    /// What fan-out and mirror routes share.
    pub fanout: FanoutConfig,
    /// Request metadata added and stripped on every call.
    pub enrich: EnrichConfig,
    /// `[tls]`: reloading of every certificate, key and CA file.
    pub tls: TlsConfig,
    /// `[tunnel]`: reverse tunnels (hub, agent).
    pub tunnel: TunnelConfig,
}

/// `[upstreams.NAME]`: a named group of endpoints.
#[derive(Clone, Debug, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
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

/// `[[routes]]`: a match and what to do with the calls it matches. Every
/// condition given must hold; a route with none matches every call.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and `sluice check`.
    #[serde(default)]
    pub name: Option<String>,
    /// `/package.Service/Method`, with `*` matching any run of characters
    /// (`/pkg.Svc/*`, `/pkg.*`).
    #[serde(default)]
    pub method: Option<String>,
    /// `:authority`, exactly.
    #[serde(default)]
    pub authority: Option<String>,
    /// Metadata conditions by key.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, TextMatch>,
    /// A condition on a field of the first request message.
    #[serde(default)]
    pub field: Option<FieldMatch>,
    /// The group to forward to (`default` is `[upstream]`).
    #[serde(default)]
    pub upstream: Option<toml::Spanned<String>>,
    /// Refuse instead of forwarding.
    #[serde(default)]
    pub refuse: Option<RefuseConfig>,
    /// Send the call to several endpoints of a group and merge the answers.
    #[serde(default)]
    pub fanout: Option<FanoutRouteConfig>,
    /// Send the call to a primary group, with copies to secondaries.
    #[serde(default)]
    pub mirror: Option<MirrorRouteConfig>,
    /// Metadata this route changes on the calls it forwards: `remove`,
    /// `set` and `append` (the rest of `[enrich]` is global only).
    #[serde(default)]
    pub enrich: Option<EnrichConfig>,
    /// Caps the deadline of the calls this route forwards (the client's
    /// `grpc-timeout`, if shorter, still wins). No cap by default: long
    /// streams must not be cut by a surprise default.
    #[serde(default, deserialize_with = "value::optional_duration")]
    pub timeout: Option<Duration>,
    /// Which verified clients may make these calls; anyone when unset.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
}

/// A condition on a text value.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TextMatch {
    /// The value equals this.
    Equals(String),
    /// The value starts with this.
    Prefix(String),
    /// The key is present (any value).
    Present(bool),
    /// The value matches this regular expression (anchor it with `^…$` for
    /// a whole-value match).
    Regex(#[serde(deserialize_with = "value::regex")] regex::Regex),
}

/// A condition on a field of the first request message, by protobuf field
/// path (`1.2` = field 2 of the message in field 1), without a descriptor.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMatch {
    /// The field path.
    #[serde(deserialize_with = "value::field_path")]
    pub path: sluice_layers::grpc::wire::FieldPath,
    /// String value equals.
    #[serde(default)]
    pub equals: Option<String>,
    /// String value starts with.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Integer value equals.
    #[serde(default)]
    pub int: Option<u64>,
    /// The field is present.
    #[serde(default)]
    pub present: Option<bool>,
    /// What a compressed first message gets, its bytes being unreadable:
    /// `no-match` (the default) or `match` (for a refuse route, so that
    /// compressing the message cannot bypass it).
    #[serde(default)]
    pub compressed: CompressedMatch,
}

/// What a field condition makes of a compressed first message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressedMatch {
    /// The condition does not hold.
    #[default]
    NoMatch,
    /// The condition holds.
    Match,
}

/// A refusal: the status the client gets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefuseConfig {
    /// A gRPC status code name, e.g. `PERMISSION_DENIED`.
    #[serde(deserialize_with = "value::grpc_code")]
    pub code: sluice_layers::grpc::status::Code,
    /// The status message.
    #[serde(default)]
    pub message: String,
}

/// `[routing]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// When no route matches: `upstream` (the default group) or
    /// `unimplemented` (refuse with UNIMPLEMENTED).
    pub fallback: Fallback,
    /// Bytes of request messages routing may hold to match on a field,
    /// per call.
    pub peek_max_bytes: ByteSize,
    /// The same, for all the calls of one downstream connection at once:
    /// peeked memory is at most `server.max_connections` × this.
    pub peek_max_bytes_per_connection: ByteSize,
    /// How long a call routing must peek may take to send its first
    /// message (its `grpc-timeout`, if shorter, wins); then it gets
    /// DEADLINE_EXCEEDED.
    #[serde(with = "value::duration")]
    pub peek_timeout: Duration,
    /// Taken off the `grpc-timeout` forwarded upstream, so the upstream
    /// gives up (and answers) before sluice's own timer fires.
    #[serde(with = "value::duration_or_zero")]
    pub deadline_offset: Duration,
}

/// What happens to calls no route matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Forward to the default group.
    #[default]
    Upstream,
    /// Refuse with UNIMPLEMENTED.
    Unimplemented,
}

/// `[trace]`: OpenTelemetry export of each call's span. Off unless an
/// endpoint is given; off costs nothing per call.
#[derive(Clone, Debug, Deserialize)]
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

/// `[drain]`: what happens on SIGTERM or `POST /drain`.
#[derive(Clone, Debug, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
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

/// `[server]`: the downstream listener and its HTTP/2 settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on for plaintext HTTP/2 (h2c, prior knowledge).
    pub listen: SocketAddr,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to each client.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub max_concurrent_streams: u32,
    /// Initial per-stream receive window.
    pub initial_stream_window: WindowSize,
    /// Initial connection receive window.
    pub initial_connection_window: WindowSize,
    /// SETTINGS_MAX_FRAME_SIZE advertised to each client.
    pub max_frame_size: FrameSize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE advertised to each client.
    pub max_header_list_size: ByteSize,
    /// Bind the listener with SO_REUSEPORT (default on), so that a new
    /// sluice can bind the same port before the old one drains: the
    /// zero-gap restart. Only sockets that set it share a port, so another
    /// program on the port still makes the bind fail.
    pub reuse_port: bool,
    /// Time allowed for the TLS handshake (on a TLS listener), the preface
    /// and the first request, all together: what a client that stalls
    /// costs at most.
    #[serde(with = "value::duration")]
    pub handshake_timeout: Duration,
    /// A connection with no call in flight this long is closed with GOAWAY.
    #[serde(with = "value::duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval to each client.
    #[serde(with = "value::duration")]
    pub keepalive_interval: Duration,
    /// Unanswered PING timeout before a client is considered dead.
    #[serde(with = "value::duration")]
    pub keepalive_timeout: Duration,
    /// Downstream connections served at once.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub max_connections: usize,
    /// Calls in flight at once, all connections together.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub max_in_flight: usize,
    /// Streams reset before being accepted, per connection, before GOAWAY.
    pub max_pending_accept_resets: usize,
    /// Client-cancelled calls per connection per second before GOAWAY.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub max_resets_per_second: u32,
    /// What to do with HTTP/2 requests that are not gRPC.
    pub non_grpc: NonGrpc,
    /// A Unix domain socket to serve h2c on as well (a path; an old socket
    /// file there is replaced).
    pub listen_unix: Option<std::path::PathBuf>,
    /// TLS: on `server.listen`, or on a listener of its own.
    pub tls: Option<ServerTlsConfig>,
}

/// What sluice does with an HTTP/2 request whose content-type is not gRPC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonGrpc {
    /// Answer 415 Unsupported Media Type, as the gRPC spec asks.
    #[default]
    Refuse,
    /// Forward it like any call.
    Forward,
}

/// `[upstream]`: the one upstream every call goes to, and how to reach it.
#[derive(Clone, Debug, Deserialize)]
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

/// `[runtime]`: the tokio runtime.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; 1 runs sluice on a current-thread runtime.
    #[serde(deserialize_with = "value::positive::deserialize")]
    pub worker_threads: usize,
}

/// `[log]`: logging.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `sluice=debug,h2=info`, ...); `RUST_LOG`
    /// overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
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

/// SETTINGS_MAX_FRAME_SIZE: between 16 384 and 16 777 215 (RFC 9113 §6.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSize(pub u32);

/// Checks what the environment adds to a config: `RUST_LOG`, which
/// overrides `log.level` when set and not empty, must be a log filter.
///
/// # Errors
///
/// [`ConfigError::Environment`] naming the variable.
pub fn validate_environment(_config: &Config) -> Result<(), ConfigError> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&v)
            .map(drop)
            .map_err(|e| ConfigError::Environment {
                variable: "RUST_LOG",
                message: format!("{v:?} is not a log filter ({e})"),
            }),
        _ => Ok(()),
    }
}

/// Parses a duration as the config writes them: `"250ms"`, `"1s"`,
/// `"5m"`, `"1h"`.
///
/// # Errors
///
/// What is wrong with `s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    value::duration::parse(s)
}

// === impl Config ===

impl Config {
    /// Reads a configuration from TOML text.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key, line and column of the first value
    /// that is malformed, unknown or out of range.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| ConfigError::from_toml(text, None, &e))?;
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::from_toml(text, Some(path), e.inner())
        })?;
        config.validate(text)?;
        Ok(config)
    }

    /// Checks what one value alone cannot: every route names a group that
    /// exists, and does exactly one thing.
    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let group_exists = |group: &toml::Spanned<String>, key: String| {
            let name = group.get_ref();
            if self.group_defined(name) {
                return Ok(());
            }
            Err(ConfigError::at(
                text,
                group.span().start,
                key,
                format!("no upstream group named {name:?} (define [upstreams.{name}])"),
            ))
        };
        let header_name = |name: &str, key: String| {
            http::HeaderName::try_from(name.to_ascii_lowercase())
                .map(drop)
                .map_err(|_| {
                    ConfigError::at_key(
                        text,
                        key,
                        format!(
                            "{name:?} is not a valid metadata key (a lowercase HTTP header name)"
                        ),
                    )
                })
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::at_key(
                text,
                "log.level".to_owned(),
                format!(
                    "{:?} is not a log filter ({e}); use a level (info, debug…) or \
                     directives like \"sluice=debug,h2=info\"",
                    self.log.level
                ),
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let actions = [
                route.upstream.is_some(),
                route.refuse.is_some(),
                route.fanout.is_some(),
                route.mirror.is_some(),
            ];
            if actions.iter().filter(|a| **a).count() != 1 {
                return Err(ConfigError::at_key(
                    text,
                    key,
                    "a route needs exactly one of `upstream`, `refuse`, `fanout` or `mirror`"
                        .to_owned(),
                ));
            }
            if let Some(group) = &route.upstream {
                group_exists(group, format!("{key}.upstream"))?;
            }
            if let Some(f) = &route.fanout {
                group_exists(&f.group, format!("{key}.fanout.group"))?;
                if let Some(k) = &f.key {
                    header_name(k, format!("{key}.fanout.key"))?;
                }
            }
            if let Some(m) = &route.mirror {
                group_exists(&m.primary, format!("{key}.mirror.primary"))?;
                for (j, s) in m.secondaries.iter().enumerate() {
                    let name = s.upstream();
                    if !self.group_defined(name) {
                        return Err(ConfigError::at_key(
                            text,
                            format!("{key}.mirror.secondaries[{j}]"),
                            format!("no upstream group named {name:?} (define [upstreams.{name}])"),
                        ));
                    }
                }
            }
            for name in route.metadata.keys() {
                header_name(name, format!("{key}.metadata.{name}"))?;
            }
            if let Some(e) = &route.enrich {
                if !e.strip.is_empty()
                    || !e.strip_prefixes.is_empty()
                    || e.forwarded
                    || e.x_forwarded_for
                    || e.request_id
                    || e.client_id.is_some()
                {
                    return Err(ConfigError::at_key(
                        text,
                        format!("{key}.enrich"),
                        "a route's enrich takes only remove, set and append (strip, forwarded, x_forwarded_for and request_id and client_id are [enrich] settings)".to_owned(),
                    ));
                }
                self.check_edits(text, e, &format!("{key}.enrich"))?;
            }
        }
        self.check_edits(text, &self.enrich, "enrich")?;
        self.check_tls(text)?;
        self.check_tunnel(text)?;
        if self.fanout.metadata_field == 0 || self.fanout.metadata_field >= 1 << 29 {
            return Err(ConfigError::at_key(
                text,
                "fanout.metadata_field".to_owned(),
                "a protobuf field number is 1 to 536870911".to_owned(),
            ));
        }
        for (name, group) in &self.upstreams {
            header_name(
                &group.dest_host_key,
                format!("upstreams.{name}.dest_host_key"),
            )?;
            let agents_join = self.tunnel.hub.as_ref().is_some_and(|h| h.group == *name);
            if group.endpoints.is_empty() && !agents_join {
                return Err(ConfigError::at_key(
                    text,
                    format!("upstreams.{name}.endpoints"),
                    "a group needs at least one endpoint".to_owned(),
                ));
            }
        }
        self.upstream.validate(text)
    }

    /// Every key and value of an `[enrich]` table (`at` is its key) is a
    /// valid header name and value.
    fn check_edits(&self, text: &str, e: &EnrichConfig, at: &str) -> Result<(), ConfigError> {
        let bad_name = |k: &str, key: String| {
            ConfigError::at_key(
                text,
                key,
                format!("{k:?} is not a valid metadata key (a lowercase HTTP header name)"),
            )
        };
        for (what, keys) in [("strip", &e.strip), ("remove", &e.remove)] {
            for (i, k) in keys.iter().enumerate() {
                if http::HeaderName::try_from(k.to_ascii_lowercase()).is_err() {
                    return Err(bad_name(k, format!("{at}.{what}[{i}]")));
                }
            }
        }
        for (what, map) in [("set", &e.set), ("append", &e.append)] {
            for (k, v) in map {
                if http::HeaderName::try_from(k.to_ascii_lowercase()).is_err() {
                    return Err(bad_name(k, format!("{at}.{what}.{k}")));
                }
                if http::HeaderValue::try_from(v.as_str()).is_err() {
                    return Err(ConfigError::at_key(
                        text,
                        format!("{at}.{what}.{k}"),
                        format!("{v:?} is not a valid metadata value"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads a configuration file.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the file cannot be read or is not valid.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text).map_err(|e| e.in_file(path))?;
        let base = path.parent().unwrap_or_else(|| std::path::Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Makes every relative file path (certificates, keys, CA bundles)
    /// relative to `base`, the config file's directory.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(tls) = &mut self.server.tls {
            tls.resolve_paths(base);
        }
        if let Some(tls) = &mut self.upstream.tls {
            tls.resolve_paths(base);
        }
        for group in self.upstreams.values_mut() {
            if let Some(tls) = &mut group.tls {
                tls.resolve_paths(base);
            }
        }
        if let Some(tls) = self.tunnel.hub.as_mut().and_then(|h| h.tls.as_mut()) {
            tls.resolve_paths(base);
        }
        if let Some(tls) = self.tunnel.agent.as_mut().and_then(|a| a.tls.as_mut()) {
            tls.resolve_paths(base);
        }
    }

    /// Whether upstream group `name` exists: the default, a configured
    /// one, or the one tunnel agents join.
    pub fn group_defined(&self, name: &str) -> bool {
        name == DEFAULT_GROUP
            || self.upstreams.contains_key(name)
            || self.tunnel.hub.as_ref().is_some_and(|h| h.group == name)
    }

    /// The metadata key a verified client identity goes under, if any:
    /// `enrich.client_id` (empty: none), else [`DEFAULT_CLIENT_ID_KEY`]
    /// when client certificates are verified.
    pub fn client_id_key(&self) -> Option<&str> {
        match self.enrich.client_id.as_deref() {
            Some("") => None,
            Some(key) => Some(key),
            None => self
                .server
                .tls
                .as_ref()
                .and_then(|t| t.client_auth.as_ref())
                .map(|_| DEFAULT_CLIENT_ID_KEY),
        }
    }

    /// The settings of the endpoints of group `group`: `[upstream]`'s,
    /// with what the group sets itself.
    pub fn group_upstream(&self, group: &GroupConfig) -> UpstreamConfig {
        let mut u = self.upstream.clone();
        if let Some(t) = group.connect_timeout {
            u.connect_timeout = t;
        }
        if let Some(n) = group.max_connections {
            u.max_connections = n;
        }
        if let Some(t) = group.idle_timeout {
            u.idle_timeout = t;
        }
        u.tls.clone_from(&group.tls);
        u
    }

    /// The embedded default configuration.
    pub fn embedded() -> Self {
        Self::from_toml_str(DEFAULT_TOML).expect("the embedded default config is valid")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("literal address"),
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            initial_stream_window: WindowSize(DEFAULT_STREAM_WINDOW),
            initial_connection_window: WindowSize(DEFAULT_CONNECTION_WINDOW),
            max_frame_size: FrameSize(DEFAULT_MAX_FRAME_SIZE),
            max_header_list_size: ByteSize(DEFAULT_MAX_HEADER_LIST_SIZE),
            reuse_port: true,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_pending_accept_resets: DEFAULT_MAX_PENDING_ACCEPT_RESETS,
            max_resets_per_second: DEFAULT_MAX_RESETS_PER_SECOND,
            non_grpc: NonGrpc::Refuse,
            listen_unix: None,
            tls: None,
        }
    }
}

impl UpstreamConfig {
    /// Checks the windows: a full connection's stream windows must fit its
    /// connection window, or stalled readers could block the connection.
    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let isolating = self.isolating_connection_window();
        match self.initial_connection_window {
            None if isolating > MAX_WINDOW => Err(ConfigError::at_key(
                text,
                "upstream.initial_stream_window".to_owned(),
                format!(
                    "max_streams_per_connection × initial_stream_window is {isolating}, above the \
                     largest HTTP/2 window ({MAX_WINDOW}); lower either"
                ),
            )),
            Some(w) if u64::from(w.0) < isolating => Err(ConfigError::at_key(
                text,
                "upstream.initial_connection_window".to_owned(),
                format!(
                    "{} is below max_streams_per_connection × initial_stream_window ({isolating}): \
                     calls whose clients stop reading could hold the whole connection window",
                    w.0
                ),
            )),
            _ => Ok(()),
        }
    }

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

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            fallback: Fallback::Upstream,
            peek_max_bytes: ByteSize(
                u32::try_from(sluice_layers::peek::DEFAULT_MAX_BYTES).expect("64 KiB fits"),
            ),
            peek_max_bytes_per_connection: ByteSize(
                u32::try_from(sluice_layers::peek::DEFAULT_MAX_BYTES_PER_CONNECTION)
                    .expect("1 MiB fits"),
            ),
            peek_timeout: sluice_layers::peek::DEFAULT_MAX_WAIT,
            deadline_offset: Duration::ZERO,
        }
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
        }
    }
}

#[cfg(test)]
mod tests;
