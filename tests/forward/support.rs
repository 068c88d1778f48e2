//! Shared builders: a real echo server, a real sluice (through `sluice::run`,
//! as `main` uses it), a real tonic client, and a raw h2 client for
//! frame-level facts.

use std::{net::SocketAddr, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use prost::Message;
use sluice::{Config, Running};
use sluice_testkit::{EchoClient, EchoServer, Req};
use tonic::transport::Channel;

/// How long any single wait in a test may take before it fails: generous,
/// so a loaded CI machine does not flake, yet a hang fails the test.
pub(crate) const LIMIT: Duration = Duration::from_secs(10);

pub(crate) fn trace_init() {
    let _ = tracing_subscriber_init();
}

fn tracing_subscriber_init() -> Result<(), ()> {
    let _ = sluice::telemetry::init(
        &sluice::config::LogConfig {
            level: std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            format: sluice::config::LogFormat::Text,
            access: false,
        },
        &sluice::config::TraceConfig::default(),
    );
    Ok(())
}

/// A loopback address that nothing listens on (yet): an upstream that is
/// down, or a port a test starts something on later.
pub(crate) fn closed_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// A config forwarding to `upstream`, listening on a free loopback port.
pub(crate) fn config(upstream: SocketAddr) -> Config {
    let mut config = Config::embedded();
    config.server.listen = "127.0.0.1:0".parse().expect("literal address");
    config.upstream.address = upstream.to_string().parse().expect("socket address");
    config.admin.listen = sluice::config::AdminListen::On("127.0.0.1:0".parse().expect("address"));
    config
}

/// An echo server, a sluice in front of it, and a tonic client of sluice.
pub(crate) struct Proxied {
    pub(crate) upstream: EchoServer,
    pub(crate) sluice: Running,
    pub(crate) client: EchoClient<Channel>,
}

pub(crate) async fn proxied() -> Proxied {
    trace_init();
    let upstream = EchoServer::start().await;
    let sluice = sluice::run(&config(upstream.addr))
        .await
        .expect("sluice starts");
    let client = sluice_testkit::client(sluice.listen_addr());
    Proxied {
        upstream,
        sluice,
        client,
    }
}

pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

/// A raw h2 connection to `addr`, for frame-level assertions.
pub(crate) async fn raw_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    raw_client_with(addr, h2::client::Builder::new()).await
}

pub(crate) async fn raw_client_with(
    addr: SocketAddr,
    builder: h2::client::Builder,
) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = builder.handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// The head of a gRPC call to `/sluice.test.Echo/{method}`.
pub(crate) fn grpc_head(method: &str) -> Request<()> {
    Request::post(format!("http://sluice.test/sluice.test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("valid request")
}

/// Opens a call on a raw h2 connection: `head`, then `req` as its only
/// message, which ends the request.
pub(crate) fn send_call(
    conn: &mut h2::client::SendRequest<Bytes>,
    head: Request<()>,
    req: &Req,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let (response, mut body) = conn.send_request(head, false).expect("open a stream");
    body.send_data(grpc_frame(req), true)
        .expect("send the request");
    (response, body)
}

/// Opens a server stream of 512 replies of 64 KiB (32 MiB) with `head`
/// and waits for its response headers; the caller holds it and reads
/// nothing, so the replies back up behind it.
pub(crate) async fn stalled_stream(
    conn: &mut h2::client::SendRequest<Bytes>,
    head: Request<()>,
) -> (http::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
    let req = Req {
        replies: 512,
        reply_size: 64 << 10,
        ..Req::default()
    };
    let (response, body) = send_call(conn, head, &req);
    let response = within("the stalled stream's headers", response)
        .await
        .expect("headers");
    (response, body)
}

/// A request whose upstream sends response headers and then nothing.
pub(crate) fn hanging() -> Req {
    Req {
        headers_then_hang: true,
        ..Req::default()
    }
}

/// One length-prefixed, uncompressed gRPC message.
pub(crate) fn grpc_frame(req: &Req) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + req.encoded_len());
    buf.put_u8(0);
    buf.put_u32(u32::try_from(req.encoded_len()).expect("small message"));
    req.encode(&mut buf).expect("encode into a buffer");
    buf.freeze()
}

/// Payload bytes that differ at every position, so a reordered or shifted
/// byte is caught.
pub(crate) fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// What a [`RawUpstream`] does with each stream it accepts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Behaviour {
    /// Never answers.
    Hang,
    /// Sends response headers, then nothing.
    HeadersThenHang,
    /// Resets the stream with this reason before any response.
    ResetBeforeHeaders(h2::Reason),
    /// Sends response headers, then resets with this reason.
    ResetAfterHeaders(h2::Reason),
    /// Answers one call properly (an empty reply, status 0), then sends
    /// GOAWAY on that connection; new connections are still accepted.
    AnswerThenGoAway,
    /// Answers every request at once as a plain HTTP server would: 200,
    /// `text/plain`, a 64-byte body, and keeps the request stream open.
    Respond,
}

/// A bare h2 server standing in for an upstream, to do what a well-behaved
/// gRPC server never does (reset streams) and to report the RST_STREAM
/// reason each stream received from sluice.
pub(crate) struct RawUpstream {
    pub(crate) addr: SocketAddr,
    /// The reset reason each hanging stream saw, in order.
    pub(crate) resets: tokio::sync::mpsc::UnboundedReceiver<h2::Reason>,
    /// Request headers of each stream, in order.
    pub(crate) heads: tokio::sync::mpsc::UnboundedReceiver<http::HeaderMap>,
}

impl RawUpstream {
    pub(crate) async fn start(behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (reset_tx, resets) = tokio::sync::mpsc::unbounded_channel();
        let (head_tx, heads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let reset_tx = reset_tx.clone();
                let head_tx = head_tx.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let _ = head_tx.send(req.headers().clone());
                        if let Behaviour::AnswerThenGoAway = behaviour {
                            let ok = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .expect("response");
                            if let Ok(mut tx) = respond.send_response(ok, false) {
                                let _ = tx.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                                let _ = tx.send_trailers(trailers);
                            }
                            conn.graceful_shutdown();
                            continue;
                        }
                        let reset_tx = reset_tx.clone();
                        tokio::spawn(async move {
                            let _request_body = req.into_body();
                            let ok = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .expect("response");
                            match behaviour {
                                Behaviour::ResetBeforeHeaders(reason) => respond.send_reset(reason),
                                Behaviour::ResetAfterHeaders(reason) => {
                                    let mut tx =
                                        respond.send_response(ok, false).expect("send headers");
                                    tx.send_reset(reason);
                                }
                                Behaviour::Hang => {
                                    let reason =
                                        std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                                    let _ = reset_tx.send(reason.expect("reset reason"));
                                }
                                Behaviour::AnswerThenGoAway => {}
                                Behaviour::Respond => {
                                    let ok = http::Response::builder()
                                        .header("content-type", "text/plain")
                                        .body(())
                                        .expect("response");
                                    let mut tx =
                                        respond.send_response(ok, false).expect("send headers");
                                    tx.reserve_capacity(64);
                                    let _ = tx.send_data(Bytes::from_static(&[b'r'; 64]), true);
                                    // Hold the stream until the proxy lets go.
                                    let _ = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
                                }
                                Behaviour::HeadersThenHang => {
                                    let mut tx =
                                        respond.send_response(ok, false).expect("send headers");
                                    let reason = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
                                    let _ = reset_tx.send(reason.expect("reset reason"));
                                }
                            }
                        });
                    }
                });
            }
        });
        Self {
            addr,
            resets,
            heads,
        }
    }
}

/// Polls `cond` until it holds, for state that has no event to wait on
/// (counters settling after connections close).
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A plain HTTP/1.1 request to the admin server; returns status and body.
pub(crate) async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// An echo server and a sluice in front of it, with the config tuned.
pub(crate) async fn setup(tune: impl FnOnce(&mut Config)) -> (EchoServer, Running) {
    trace_init();
    let upstream = EchoServer::start().await;
    let mut config = config(upstream.addr);
    tune(&mut config);
    let sluice = sluice::run(&config).await.expect("sluice");
    (upstream, sluice)
}

pub(crate) fn grpc_message(req: &Req) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u8(0);
    buf.put_u32(u32::try_from(req.encoded_len()).expect("small"));
    req.encode(&mut buf).expect("encode");
    buf.to_vec()
}

/// A normal client on its own connection: every call must succeed.
pub(crate) async fn normal_calls(addr: std::net::SocketAddr, n: usize) {
    let mut client = sluice_testkit::client(addr);
    for seq in 0..n as u64 {
        let reply = within(
            "normal call",
            client.unary(Req {
                seq,
                ..Req::default()
            }),
        )
        .await
        .expect("a normal client is served");
        assert_eq!(reply.into_inner().seq, seq);
    }
}

/// One call of a [`Load`]: `Ok` when it ended OK.
pub(crate) type LoadCall = for<'a> fn(
    &'a mut EchoClient<Channel>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send + 'a>,
>;

/// Clients, each on its own connection, making `call` over and over (at
/// most 200,000 times each) until [`Load::finish`]: how a test shows that
/// a change made under load fails no call.
pub(crate) struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    pub(crate) fn start(addr: SocketAddr, clients: usize, call: LoadCall) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let mut client = sluice_testkit::client(addr);
                let (stop, calls) = (stop.clone(), calls.clone());
                tokio::spawn(async move {
                    let mut failed = Vec::new();
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = call(&mut client).await {
                            failed.push(e.to_string());
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    failed
                })
            })
            .collect();
        Self { stop, calls, tasks }
    }

    /// Stops the clients; the calls made, and the errors of those that
    /// failed.
    pub(crate) async fn finish(self) -> (u64, Vec<String>) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        let mut failed = Vec::new();
        for task in self.tasks {
            failed.extend(within("the load", task).await.expect("joined"));
        }
        let calls = self.calls.load(Ordering::Relaxed);
        assert!(calls > 0, "the load ran");
        (calls, failed)
    }
}

/// A path of its own in the target's temporary directory:
/// `{stem}-{pid}-{n}.{extension}`, `n` counting up within the process.
pub(crate) fn temp_path(stem: &str, extension: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{stem}-{}-{}.{extension}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}
