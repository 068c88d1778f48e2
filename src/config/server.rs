//! `[server]`: the downstream listeners and their HTTP/2 settings.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{ByteSize, FrameSize, ServerTlsConfig, WindowSize, defaults::*, value};

/// `[server]`: the downstream listener and its HTTP/2 settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
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
    /// How long a client connection lives (with up to 10 % more, at
    /// random): then it gets GOAWAY, so that clients spread again over
    /// sidecars and hubs. Never unless given.
    #[serde(deserialize_with = "value::optional_duration")]
    pub max_connection_age: Option<Duration>,
    /// How long the calls of a connection past its age may take to
    /// finish before it closes.
    #[serde(with = "value::duration")]
    pub max_connection_age_grace: Duration,
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
            max_connection_age: None,
            max_connection_age_grace: DEFAULT_MAX_CONNECTION_AGE_GRACE,
        }
    }
}
