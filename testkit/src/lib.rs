//! Test and bench support for sluice: a tonic echo service whose behaviour
//! each request steers (replies, sizes, failures, delays, hangs), with a
//! [`Probe`] that tells a test what the server saw: calls started, finished
//! or cancelled, replies sent, and the metadata of the last call.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_stream::{
    Stream, StreamExt,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
    transport::{Channel, Endpoint, Server},
};

/// The generated messages, client and server of `proto/echo.proto`.
pub mod pb {
    #![allow(
        missing_docs,
        unreachable_pub,
        clippy::use_self,
        missing_debug_implementations
    )]
    tonic::include_proto!("sluice.test");
}

pub use pb::{Reply, Req, echo_client::EchoClient};

/// The generated messages, client and server of `proto/nodes.proto`: a
/// Talos-style service for fan-out tests.
pub mod npb {
    #![allow(
        missing_docs,
        unreachable_pub,
        clippy::use_self,
        missing_debug_implementations
    )]
    tonic::include_proto!("sluice.test.nodes");
}

mod nodes;
pub use nodes::{NodeCounts, NodeProbe, NodeServer};

pub mod pki;
pub mod xds;

/// The `grpc-status-details-bin` bytes every steered failure carries, with
/// bytes that are not valid UTF-8 on purpose.
pub const FAILURE_DETAILS: &[u8] = b"\x00\x01\xfe\xffdetails";

/// What the echo server has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls whose handler started.
    pub started: u64,
    /// Calls that ran to their end (OK or a steered failure).
    pub completed: u64,
    /// Calls whose handler or response stream was dropped before the end:
    /// the server saw a cancellation.
    pub cancelled: u64,
    /// Streamed replies handed to the transport.
    pub replies_sent: u64,
    /// Request messages received.
    pub requests_received: u64,
}

/// A handle on what an echo server saw; cheap to clone.
#[derive(Clone, Debug)]
pub struct Probe {
    counts: Arc<watch::Sender<Counts>>,
    last_metadata: Arc<Mutex<Option<MetadataMap>>>,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            counts: Arc::new(watch::channel(Counts::default()).0),
            last_metadata: Arc::default(),
        }
    }
}

impl Probe {
    /// The counts now.
    pub fn counts(&self) -> Counts {
        *self.counts.borrow()
    }

    /// Waits until `pred` holds for the counts, or `limit` passes.
    ///
    /// # Panics
    ///
    /// Panics when `limit` passes first, naming the counts seen.
    pub async fn wait_for(&self, limit: Duration, pred: impl FnMut(&Counts) -> bool) -> Counts {
        let mut rx = self.counts.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(pred)).await {
            Ok(Ok(counts)) => *counts,
            _ => panic!(
                "echo server never reached the expected state; saw {:?}",
                self.counts()
            ),
        }
    }

    /// The request metadata of the most recent call.
    pub fn last_metadata(&self) -> Option<MetadataMap> {
        self.last_metadata.lock().expect("probe lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut Counts)) {
        self.counts.send_modify(f);
    }

    fn start<T>(&self, req: &Request<T>) -> CallGuard {
        *self.last_metadata.lock().expect("probe lock") = Some(req.metadata().clone());
        self.update(|c| c.started += 1);
        CallGuard {
            probe: self.clone(),
            done: false,
        }
    }
}

/// Counts a call as cancelled unless it is marked done before it drops.
#[derive(Debug)]
struct CallGuard {
    probe: Probe,
    done: bool,
}

impl CallGuard {
    fn done(mut self) {
        self.done = true;
        self.probe.update(|c| c.completed += 1);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            self.probe.update(|c| c.cancelled += 1);
        }
    }
}

/// The echo service.
#[derive(Clone, Debug, Default)]
pub struct Echo {
    probe: Probe,
    faults: Arc<Faults>,
    /// Added to every unary answer: a slow server.
    base_delay: Duration,
    /// Sent as `x-served-by` on every answer (an [`EchoServer`]'s
    /// address), so a test can tell which server a call reached.
    served_by: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Echo {
    /// An echo service reporting to `probe`.
    pub fn new(probe: Probe) -> Self {
        Self {
            probe,
            faults: Arc::default(),
            base_delay: Duration::ZERO,
            served_by: None,
        }
    }
}

/// Failures an echo server makes of its own accord, whatever the request
/// says (a faulty backend: the same request sent again meets them again).
/// They apply to unary calls; a test changes them while the server runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Unary calls answered so far.
    pub calls: std::sync::atomic::AtomicU64,
    /// Non-zero: every n-th unary call (the 1st, the n+1-th…) fails
    /// UNAVAILABLE.
    pub fail_every: std::sync::atomic::AtomicU64,
    /// Every unary call fails UNAVAILABLE.
    pub fail_all: std::sync::atomic::AtomicBool,
    /// Sent as `grpc-retry-pushback-ms` with each of those failures.
    pub pushback: Mutex<Option<String>>,
    /// Non-zero: every n-th unary call waits `stall_ms` first.
    pub stall_every: std::sync::atomic::AtomicU64,
    /// How long a stalled call waits, in ms.
    pub stall_ms: std::sync::atomic::AtomicU64,
}

impl Faults {
    /// The failure call `n` (from 0) meets, and how long it stalls.
    fn meet(&self) -> (Option<Status>, Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.calls.fetch_add(1, Relaxed);
        let every = self.fail_every.load(Relaxed);
        let fails = self.fail_all.load(Relaxed) || (every > 0 && n.is_multiple_of(every));
        let stall_every = self.stall_every.load(Relaxed);
        let stall = if stall_every > 0 && n % stall_every == stall_every - 1 {
            Duration::from_millis(self.stall_ms.load(Relaxed))
        } else {
            Duration::ZERO
        };
        let status = fails.then(|| {
            let mut status = Status::unavailable("injected by the echo server");
            if let Some(ms) = self.pushback.lock().expect("faults").clone()
                && let Ok(v) = MetadataValue::try_from(ms.as_str())
            {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            status
        });
        (status, stall)
    }
}

fn reply_for(req: &Req, seq: u64) -> Reply {
    let payload = if req.reply_size == 0 {
        req.payload.clone()
    } else {
        Bytes::from(vec![b'r'; req.reply_size as usize])
    };
    Reply { payload, seq }
}

/// The steered failure of `req`, if it asks for one: its code and message,
/// binary details, and trailing metadata in text and binary form.
fn failure(req: &Req) -> Option<Status> {
    if req.fail_code == 0 {
        return None;
    }
    let mut metadata = MetadataMap::new();
    metadata.insert("x-trailer", MetadataValue::from_static("trailer-text"));
    metadata.insert_bin(
        "x-trailer-bin",
        MetadataValue::from_bytes(b"\x00\xff\x80trailer"),
    );
    Some(Status::with_details_and_metadata(
        tonic::Code::from_i32(req.fail_code),
        req.fail_message.clone(),
        Bytes::from_static(FAILURE_DETAILS),
        metadata,
    ))
}

impl Echo {
    fn with_headers<T>(&self, body: T) -> Response<T> {
        let mut res = with_headers(body);
        if let Some(by) = &self.served_by {
            res.metadata_mut().insert("x-served-by", by.clone());
        }
        res
    }
}

fn with_headers<T>(body: T) -> Response<T> {
    let mut res = Response::new(body);
    res.metadata_mut()
        .insert("x-upstream", MetadataValue::from_static("echo"));
    res.metadata_mut()
        .insert_bin("x-upstream-bin", MetadataValue::from_bytes(b"\x00\x01\xff"));
    res
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn unary(&self, request: Request<Req>) -> Result<Response<Reply>, Status> {
        let guard = self.probe.start(&request);
        let req = request.into_inner();
        self.probe.update(|c| c.requests_received += 1);
        let (fault, stall) = self.faults.meet();
        let delay = Duration::from_millis(req.delay_ms) + self.base_delay + stall;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = fault.or_else(|| failure(&req)) {
            guard.done();
            return Err(status);
        }
        let reply = reply_for(&req, req.seq);
        guard.done();
        Ok(self.with_headers(reply))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<Req>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let guard = self.probe.start(&request);
        let req = request.into_inner();
        self.probe.update(|c| c.requests_received += 1);
        if req.headers_then_hang {
            // Headers go out when this returns; the stream never yields, and
            // counts a cancel when the transport drops it.
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move { tx.closed().await });
            return Ok(self.with_headers(Box::pin(DoneOnEnd::new(rx, guard))));
        }
        // A one-slot channel: the producer runs at most one reply ahead of
        // what the transport took, so `replies_sent` shows backpressure.
        let (tx, rx) = mpsc::channel(1);
        let probe = self.probe.clone();
        tokio::spawn(async move {
            for seq in 0..u64::from(req.replies) {
                if req.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
                }
                if tx.send(Ok(reply_for(&req, seq))).await.is_err() {
                    return; // the stream was dropped: the guard counted it
                }
                probe.update(|c| c.replies_sent += 1);
            }
            if let Some(status) = failure(&req) {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(self.with_headers(Box::pin(DoneOnEnd::new(rx, guard))))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<Req>>,
    ) -> Result<Response<Reply>, Status> {
        let guard = self.probe.start(&request);
        let mut inbound = request.into_inner();
        let mut count = 0u64;
        let mut last = Bytes::new();
        while let Some(req) = inbound.message().await? {
            self.probe.update(|c| c.requests_received += 1);
            count += 1;
            if let Some(status) = failure(&req) {
                // Answer while the client may still be sending.
                guard.done();
                return Err(status);
            }
            if req.stop_reading {
                // Hold the request stream unread until the call is
                // cancelled (this future is dropped).
                let _unread = inbound;
                return std::future::pending().await;
            }
            last = req.payload;
        }
        guard.done();
        Ok(self.with_headers(Reply {
            payload: last,
            seq: count,
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<Req>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let guard = self.probe.start(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let probe = self.probe.clone();
        tokio::spawn(async move {
            loop {
                let req = match inbound.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    // The client went away: keep the stream open, so that
                    // its drop (not its end) is what the probe sees.
                    Err(_) => return tx.closed().await,
                };
                probe.update(|c| c.requests_received += 1);
                if let Some(status) = failure(&req) {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                if req.stop_reading {
                    // Keep the request stream unread while the response
                    // stream lives.
                    let _unread = inbound;
                    return tx.closed().await;
                }
                if tx.send(Ok(reply_for(&req, req.seq))).await.is_err() {
                    return;
                }
                probe.update(|c| c.replies_sent += 1);
            }
        });
        Ok(self.with_headers(Box::pin(DoneOnEnd::new(rx, guard))))
    }
}

/// A reply stream over a channel that holds the call's guard: the call is
/// done when the transport reads the end of the stream, and cancelled when
/// the transport drops the stream before that.
struct DoneOnEnd {
    inner: ReceiverStream<Result<Reply, Status>>,
    guard: Option<CallGuard>,
}

impl DoneOnEnd {
    fn new(rx: mpsc::Receiver<Result<Reply, Status>>, guard: CallGuard) -> Self {
        Self {
            inner: ReceiverStream::new(rx),
            guard: Some(guard),
        }
    }
}

impl Stream for DoneOnEnd {
    type Item = Result<Reply, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        if item.is_none()
            && let Some(guard) = self.guard.take()
        {
            guard.done();
        }
        std::task::Poll::Ready(item)
    }
}

/// A running echo server, on a runtime (and thread) of its own, like an
/// application process beside the proxy: stopping it closes every one of its
/// connections at once, as a crashed process would.
#[derive(Debug)]
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub probe: Probe,
    /// Its `grpc.health.v1` status: SERVING until a test says otherwise.
    pub health: tonic_health::server::HealthReporter,
    /// The failures it makes of its own accord (none until set).
    pub faults: Arc<Faults>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Starts an echo server on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("literal address")).await
    }

    /// Starts an echo server on `addr`.
    ///
    /// # Panics
    ///
    /// Panics if `addr` cannot be bound.
    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::start_with(addr, Duration::ZERO).await
    }

    /// Starts an echo server on `127.0.0.1:0` that answers every unary call
    /// `delay` late: a slow endpoint.
    pub async fn start_slow(delay: Duration) -> Self {
        Self::start_with("127.0.0.1:0".parse().expect("literal address"), delay).await
    }

    async fn start_with(addr: SocketAddr, base_delay: Duration) -> Self {
        let std_listener = std::net::TcpListener::bind(addr).expect("bind echo server");
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("bound address");
        let probe = Probe::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let faults = Arc::<Faults>::default();
        let echo = Echo {
            probe: probe.clone(),
            faults: faults.clone(),
            base_delay,
            served_by: MetadataValue::try_from(addr.to_string()).ok(),
        };
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let svc = pb::echo_server::EchoServer::new(echo)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        let thread = std::thread::Builder::new()
            .name("echo-server".to_owned())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("echo server runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    // tonic's `tcp_nodelay` only reaches sockets it accepts
                    // itself; with Nagle on, small replies wait for delayed
                    // ACKs (40 ms) and every latency figure is wrong.
                    let incoming = TcpListenerStream::new(listener).map(|tcp| {
                        tcp.inspect(|tcp| {
                            let _ = tcp.set_nodelay(true);
                        })
                    });
                    let serve = Server::builder()
                        .add_service(health_svc)
                        .add_service(svc)
                        .serve_with_incoming(incoming);
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task.
                rt.shutdown_background();
            })
            .expect("spawn echo server thread");
        Self {
            addr,
            probe,
            health,
            faults,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops the server at once: its listener and every connection close,
    /// as if the process died.
    pub async fn stop(mut self) {
        self.halt();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A tonic client for the echo service at `addr`, connected lazily.
pub fn client(addr: SocketAddr) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .tcp_nodelay(true)
        .connect_lazy();
    EchoClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}
