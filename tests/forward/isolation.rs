//! Issue #9 §1: calls whose peer stops reading must never starve other
//! calls sharing an upstream connection, in either direction.
//!
//! - Response direction: clients that open server streams and read nothing
//!   leave each stream holding its full upstream stream window in sluice.
//!   A normal client beside them, on its own connection, must keep its
//!   latency.
//! - Request direction: clients upload into an upstream handler that stops
//!   reading. tonic's server (hyper) gives a connection no more window than
//!   one stream, so one unread upload fills the whole upstream connection;
//!   other clients' calls and uploads must still go through.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use bytes::Bytes;
use sluice_testkit::Req;
use tokio::sync::watch;

use crate::support::*;

/// Each normal call must finish within this; a starved call hits it.
const CALL_LIMIT: Duration = Duration::from_secs(2);
const NORMAL_CALLS: usize = 150;
/// Request size of the normal calls beside unread uploads.
const UPLOAD_CALL: usize = 128 << 10;

/// Latencies of `n` sequential unary calls with a `payload`-byte request on
/// a client connection of their own. Fails on the first call that does not
/// succeed within [`CALL_LIMIT`].
async fn unary_latencies(
    client: &mut sluice_testkit::EchoClient<tonic::transport::Channel>,
    n: usize,
    payload: usize,
) -> Vec<Duration> {
    let payload = Bytes::from(vec![b'n'; payload]);
    let mut lat = Vec::with_capacity(n);
    for seq in 0..n as u64 {
        let started = Instant::now();
        let call = client.unary(Req {
            seq,
            payload: payload.clone(),
            ..Req::default()
        });
        let reply = tokio::time::timeout(CALL_LIMIT, call)
            .await
            .unwrap_or_else(|_| panic!("normal call {seq} starved: no answer in {CALL_LIMIT:?}"))
            .unwrap_or_else(|s| panic!("normal call {seq} failed: {s:?}"));
        assert_eq!(reply.into_inner().seq, seq);
        lat.push(started.elapsed());
    }
    lat
}

fn p99(mut lat: Vec<Duration>) -> Duration {
    lat.sort();
    lat[(lat.len() - 1) * 99 / 100]
}

/// The loaded p99 must stay within a small factor of the unloaded one (the
/// additive term absorbs scheduler noise on a loaded CI machine; a starved
/// call takes [`CALL_LIMIT`] and fails before this).
fn assert_p99_close(unloaded: Duration, loaded: Duration, what: &str) {
    let bound = unloaded * 10 + Duration::from_millis(25);
    assert!(
        loaded <= bound,
        "{what}: p99 {loaded:?} with stalled peers beside, {unloaded:?} without (bound {bound:?})"
    );
}

/// Opens `streams` server streams of 32 MiB each on `connections` raw
/// connections, and never reads a byte of them.
async fn stalled_readers(
    addr: std::net::SocketAddr,
    connections: usize,
    streams: usize,
) -> Vec<(h2::RecvStream, h2::SendStream<Bytes>)> {
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(raw_client(addr).await);
    }
    let mut held = Vec::new();
    for i in 0..streams {
        let conn = &mut conns[i % connections];
        let (res, body) = stalled_stream(conn, grpc_head("ServerStream")).await;
        held.push((res.into_body(), body));
    }
    held
}

/// Waits until the upstream stops getting further ahead: a stall shows only
/// as the absence of progress, so this samples the count until it holds
/// still for a while (bounded by [`LIMIT`]).
async fn until_quiet(probe: &sluice_testkit::Probe, at_least: u64) -> u64 {
    probe.wait_for(LIMIT, |c| c.replies_sent >= at_least).await;
    within("the upstream to stall", async {
        let mut last = probe.counts().replies_sent;
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let now = probe.counts().replies_sent;
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
}

async fn stalled_readers_leave_other_clients_their_latency(connections: usize, streams: usize) {
    let p = proxied().await;
    let addr = p.sluice.listen_addr();
    let mut normal = sluice_testkit::client(addr);
    unary_latencies(&mut normal, 20, 1024).await; // warm-up
    let unloaded = p99(unary_latencies(&mut normal, NORMAL_CALLS, 1024).await);

    let held = stalled_readers(addr, connections, streams).await;
    let sent = until_quiet(&p.upstream.probe, 4 * streams as u64).await;
    let loaded = p99(unary_latencies(&mut normal, NORMAL_CALLS, 1024).await);
    assert_p99_close(unloaded, loaded, "unary beside stalled readers");

    // The stalled streams were held back by flow control, not buffered: each
    // holds at most its windows (the client's 64 KiB, sluice's upstream
    // stream window, tonic's send buffer), about 24 replies of 64 KiB.
    let limit = streams as u64 * 32;
    assert!(
        sent <= limit,
        "the upstream sent {sent} replies of 64 KiB to {streams} stalled readers (limit {limit})"
    );
    drop(held);
    p.upstream
        .probe
        .wait_for(LIMIT, |c| c.cancelled >= streams as u64)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_on_one_connection_do_not_starve_another_client() {
    trace_init();
    stalled_readers_leave_other_clients_their_latency(1, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_on_many_connections_do_not_starve_another_client() {
    trace_init();
    stalled_readers_leave_other_clients_their_latency(6, 24).await;
}

/// A client-streaming upload whose upstream handler reads the first message
/// and then nothing: sends 64 KiB chunks as fast as sluice's flow control
/// lets it, reporting the bytes sent so far.
fn unread_upload(
    addr: std::net::SocketAddr,
) -> (watch::Receiver<usize>, tokio::task::JoinHandle<()>) {
    unread_upload_on(async move { raw_client(addr).await })
}

/// [`unread_upload`] on the connection `conn` gives.
fn unread_upload_on(
    conn: impl Future<Output = h2::client::SendRequest<Bytes>> + Send + 'static,
) -> (watch::Receiver<usize>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(0usize);
    let task = tokio::spawn(async move {
        let mut conn = conn.await;
        let (response, mut body) = conn
            .send_request(grpc_head("ClientStream"), false)
            .expect("open the upload");
        let first = grpc_frame(&Req {
            stop_reading: true,
            ..Req::default()
        });
        body.send_data(first, false).expect("first message");
        // A gRPC message of 64 KiB, sent over and over.
        let chunk = grpc_frame(&Req {
            payload: Bytes::from(vec![b'u'; (64 << 10) - 16]),
            ..Req::default()
        });
        let mut sent = 0usize;
        loop {
            body.reserve_capacity(chunk.len());
            let granted = std::future::poll_fn(|cx| body.poll_capacity(cx)).await;
            match granted {
                Some(Ok(n)) if n > 0 => {
                    let n = n.min(chunk.len());
                    if body.send_data(chunk.slice(..n), false).is_err() {
                        break;
                    }
                    sent += n;
                    let _ = tx.send(sent);
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        drop(response);
    });
    (rx, task)
}

/// Waits until an upload has sent `at_least` bytes and then stopped moving
/// (see [`until_quiet`] for why this samples).
async fn until_upload_quiet(mut sent: watch::Receiver<usize>, at_least: usize) {
    within("the upload to start", sent.wait_for(|n| *n >= at_least))
        .await
        .expect("the uploader runs");
    within("the upload to stall", async {
        let mut last = *sent.borrow();
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let now = *sent.borrow();
            if now == last {
                return;
            }
            last = now;
        }
    })
    .await;
}

async fn unread_uploads_leave_other_clients_their_calls(uploads: usize) {
    let p = proxied().await;
    let addr = p.sluice.listen_addr();
    let mut normal = sluice_testkit::client(addr);
    // 128 KiB requests: more than the upstream window a stalled upload could
    // leave on a connection it filled.
    unary_latencies(&mut normal, 20, UPLOAD_CALL).await;
    let unloaded = p99(unary_latencies(&mut normal, NORMAL_CALLS, UPLOAD_CALL).await);

    let mut uploaders = Vec::new();
    for _ in 0..uploads {
        let (sent, task) = unread_upload(addr);
        // sluice's downstream stream window (1 MiB) fills whatever happens
        // upstream; then sluice forwards into tonic's stream window (1 MiB,
        // which is also its whole connection window) until it is full, and
        // the upload stops moving.
        until_upload_quiet(sent, (1 << 20) - (64 << 10)).await;
        uploaders.push(task);
    }
    p.upstream
        .probe
        .wait_for(LIMIT, |c| {
            c.started >= 20 + NORMAL_CALLS as u64 + uploads as u64
        })
        .await;

    let loaded = p99(unary_latencies(&mut normal, NORMAL_CALLS, UPLOAD_CALL).await);
    assert_p99_close(unloaded, loaded, "unary beside unread uploads");

    // Another client's uploads go through too.
    for round in 0..5u64 {
        let reqs: Vec<Req> = (0..8)
            .map(|seq| Req {
                seq,
                payload: Bytes::from(vec![b'c'; 128 << 10]),
                ..Req::default()
            })
            .collect();
        let reply =
            tokio::time::timeout(CALL_LIMIT, normal.client_stream(tokio_stream::iter(reqs)))
                .await
                .unwrap_or_else(|_| panic!("upload {round} of a normal client starved"))
                .expect("upload of a normal client");
        assert_eq!(reply.into_inner().seq, 8);
    }
    for task in uploaders {
        task.abort();
    }
}

/// Uploads whose upstream stopped reading hold their stream windows on the
/// client's connection; together they must not hold its whole connection
/// window, or every other call on that connection starves. grpcio's
/// channels to one target share one connection, so an application's
/// stalled uploads and its other calls meet there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_uploads_leave_the_other_calls_of_their_connection_room() {
    trace_init();
    let p = proxied().await;
    let conn = raw_client(p.sluice.listen_addr()).await;
    let mut uploads = Vec::new();
    for _ in 0..8 {
        let shared = conn.clone();
        uploads.push(unread_upload_on(async move { shared }));
    }
    // Every upload moves until its windows are spent, then stops.
    for (sent, _) in &uploads {
        until_upload_quiet(sent.clone(), 0).await;
    }
    let held: usize = uploads.iter().map(|(sent, _)| *sent.borrow()).sum();
    assert!(held > 0, "the uploads sent nothing");
    for seq in 0..10 {
        let mut conn = conn.clone();
        let req = Req {
            seq,
            payload: Bytes::from(vec![b'n'; UPLOAD_CALL]),
            ..Req::default()
        };
        let (response, _body) = send_call(&mut conn, grpc_head("Unary"), &req);
        let answer = async {
            let mut body = response.await.expect("response headers").into_body();
            let mut got = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("reply data");
                got += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let trailers = body.trailers().await.expect("trailers").expect("a status");
            (got, trailers)
        };
        let (got, trailers) = tokio::time::timeout(CALL_LIMIT, answer)
            .await
            .unwrap_or_else(|_| {
                panic!("call {seq} starved on a connection whose {held} upload bytes are stalled")
            });
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert!(got > UPLOAD_CALL, "call {seq} got {got} bytes back");
    }
    for (_, task) in uploads {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_one_upload_does_not_stall_other_clients() {
    trace_init();
    unread_uploads_leave_other_clients_their_calls(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unread_uploads_do_not_stall_other_clients() {
    trace_init();
    unread_uploads_leave_other_clients_their_calls(6).await;
}

/// With every stream slot of every allowed connection taken, a call waits
/// for a slot (its HEADERS never reach an upstream connection that has no
/// room); it proceeds when one frees, and fails UNAVAILABLE when none does
/// within `upstream.connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_every_stream_slot_wait_for_one_then_fail_unavailable() {
    let (upstream, sluice) = setup(|c| {
        c.upstream.max_connections = 1;
        c.upstream.max_streams_per_connection = 2;
        c.upstream.connect_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = sluice.listen_addr();
    let hang = || hanging();
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut client = sluice_testkit::client(addr);
        let stream = within("a held call", client.server_stream(hang()))
            .await
            .expect("headers");
        holders.push((client, stream));
    }
    let started = Instant::now();
    let status = within(
        "a call with no slot",
        sluice_testkit::client(addr).unary(Req::default()),
    )
    .await
    .expect_err("no slot frees");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("busy"), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        upstream.probe.counts().started,
        2,
        "the refused call never reached the upstream"
    );

    // A call that waits gets the slot a finished call gives back.
    let mut waiting = sluice_testkit::client(addr);
    let queued = tokio::spawn(async move {
        waiting
            .unary(Req {
                seq: 7,
                ..Req::default()
            })
            .await
    });
    // Waiting shows only as not finishing: well within connect_timeout, the
    // call must still be out, and the upstream must not have seen it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !queued.is_finished(),
        "the call went ahead with every slot taken"
    );
    assert_eq!(upstream.probe.counts().started, 2);
    drop(holders.pop());
    let reply = within("the queued call", queued)
        .await
        .expect("task")
        .expect("the queued call gets the freed slot");
    assert_eq!(reply.into_inner().seq, 7);
}
