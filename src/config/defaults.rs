//! The defaults of `[server]`, `[upstream]`, `[drain]`, `[admin]` and
//! `[runtime]`: named constants, each with the reason for its number.

use std::time::Duration;

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
/// It is what an upload whose upstream stopped reading makes sluice hold.
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;
/// Per-connection receive window: 32 MiB, 32 stream windows. Uploads whose
/// upstream stopped reading each hold their stream window on the client's
/// connection, and the calls beside them on that connection (grpcio's
/// channels to one target share one) need the rest: at 4 MiB, 4 stalled
/// uploads starved every other call. It also bounds what one connection
/// can make sluice hold.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 32 << 20;
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

/// How often `reload.watch` looks at the config file: 2 s. A stat per
/// look; a Kubernetes ConfigMap update takes up to a minute to reach a
/// pod, so the look is not what makes a change slow.
pub const DEFAULT_CONFIG_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How long the calls of a connection past `server.max_connection_age` may
/// take to finish: 30 s, a long unary call's worth; streams longer than
/// that are what `max_stream_age` is for.
pub const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
