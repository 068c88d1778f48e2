//! Issue #5: draining. In-flight calls finish, readiness goes false before
//! GOAWAY, new connections are refused, calls still open at the deadline
//! end with UNAVAILABLE trailers, and nothing a peer does holds sluice up.

use std::time::Duration;

use sluice_testkit::{EchoServer, Req};

use crate::support::*;

async fn sluice_with(
    upstream: std::net::SocketAddr,
    pre_delay: Duration,
    deadline: Duration,
) -> sluice::Running {
    let mut config = config(upstream);
    config.drain.pre_delay = pre_delay;
    config.drain.deadline = deadline;
    sluice::run(&config).await.expect("sluice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_calls_finish_and_readiness_goes_false_before_goaway() {
    trace_init();
    let upstream = EchoServer::start().await;
    let sluice = sluice_with(
        upstream.addr,
        Duration::from_millis(400),
        Duration::from_secs(10),
    )
    .await;
    let admin_addr = sluice.admin_addr().expect("admin on");
    let listen = sluice.listen_addr();
    let client = sluice_testkit::client(listen);
    assert_eq!(admin(admin_addr, "GET", "/ready").await.0, 200);

    // Long server streams (50 replies, 20 ms apart) and slow unary calls.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let mut client = client.clone();
        calls.spawn(async move {
            if i % 2 == 0 {
                let mut s = client
                    .server_stream(Req {
                        replies: 50,
                        delay_ms: 20,
                        ..Req::default()
                    })
                    .await?
                    .into_inner();
                let mut n = 0;
                while s.message().await?.is_some() {
                    n += 1;
                }
                Ok::<_, tonic::Status>(n)
            } else {
                client
                    .unary(Req {
                        delay_ms: 600,
                        ..Req::default()
                    })
                    .await?;
                Ok(1)
            }
        });
    }
    upstream.probe.wait_for(LIMIT, |c| c.started == 8).await;
    // A raw connection that watches for GOAWAY.
    let mut watcher = raw_client(sluice.listen_addr()).await;

    let drain = tokio::spawn(sluice.drain());
    // Readiness falls at once...
    let mut ready = 200;
    for _ in 0..200 {
        ready = admin(admin_addr, "GET", "/ready").await.0;
        if ready == 503 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(ready, 503);
    // ...while the connection is still open for new streams: no GOAWAY yet.
    std::future::poll_fn(|cx| watcher.poll_ready(cx))
        .await
        .expect("no GOAWAY during the pre-drain delay");
    let (response, _body) = send_call(&mut watcher, grpc_head("Unary"), &Req::default());
    let res = within("call during pre-delay", response)
        .await
        .expect("served");
    assert!(
        res.headers().get("grpc-status").is_none(),
        "served, not refused"
    );

    // Then GOAWAY reaches the connection.
    within("GOAWAY", async {
        loop {
            if std::future::poll_fn(|cx| watcher.poll_ready(cx))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Every call that started before the drain completes OK.
    let mut replies = 0;
    while let Some(done) = calls.join_next().await {
        replies += done.expect("task").expect("call completes OK");
    }
    assert_eq!(replies, 4 * 50 + 4);

    let report = within("drain", drain).await.expect("drain task");
    assert_eq!(report.cut_off, 0);
    assert!(report.elapsed < Duration::from_secs(10));
    // The listener is closed: a new connection is refused.
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_at_the_deadline_ends_with_unavailable_trailers() {
    trace_init();
    let upstream = EchoServer::start().await;
    let sluice = sluice_with(upstream.addr, Duration::ZERO, Duration::from_millis(300)).await;
    let listen = sluice.listen_addr();
    let mut client = sluice_testkit::client(listen);
    let mut stream = within("headers", client.server_stream(hanging()))
        .await
        .expect("headers")
        .into_inner();
    upstream.probe.wait_for(LIMIT, |c| c.started == 1).await;

    let started = std::time::Instant::now();
    let report = within("drain", sluice.drain()).await;
    assert!(
        started.elapsed() < Duration::from_millis(300) + Duration::from_secs(1),
        "{report:?}"
    );
    // One call was open (on one connection): the report counts calls,
    // not the drain's guards of connections.
    assert_eq!(report.cut_off, 1, "{report:?}");

    let status = within("end of stream", stream.message())
        .await
        .expect_err("cut off");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    // The upstream call was cancelled, not left running.
    upstream.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
    // And the listener is gone.
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_cannot_hold_sluice_past_the_deadline() {
    trace_init();
    let upstream = EchoServer::start().await;
    let sluice = sluice_with(upstream.addr, Duration::ZERO, Duration::from_millis(200)).await;
    // A client that never reads (its 64 KiB window stays full), on a
    // stream that would send 64 MiB: it cannot even take the trailers.
    let mut h2 = raw_client(sluice.listen_addr()).await;
    let (response, _body) = send_call(
        &mut h2,
        grpc_head("ServerStream"),
        &Req {
            replies: 1024,
            reply_size: 64 << 10,
            ..Req::default()
        },
    );
    let _res = within("headers", response).await.expect("headers");
    upstream
        .probe
        .wait_for(LIMIT, |c| c.replies_sent >= 2)
        .await;
    let started = std::time::Instant::now();
    let report = within("drain", sluice.drain()).await;
    assert!(
        started.elapsed() < Duration::from_millis(200) + Duration::from_secs(1),
        "drain took {:?}",
        started.elapsed()
    );
    assert!(report.cut_off >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_on_the_admin_port_asks_for_a_drain() {
    trace_init();
    let upstream = EchoServer::start().await;
    let sluice = sluice_with(upstream.addr, Duration::ZERO, Duration::from_secs(1)).await;
    let admin_addr = sluice.admin_addr().expect("admin");
    assert_eq!(
        admin(admin_addr, "GET", "/live").await,
        (200, "live\n".to_owned())
    );
    assert_eq!(admin(admin_addr, "GET", "/drain").await.0, 405);
    assert_eq!(admin(admin_addr, "GET", "/nope").await.0, 404);
    {
        let requested = sluice.drain_requested();
        tokio::pin!(requested);
        assert!(futures_poll_once(requested.as_mut()).await.is_none());
        assert_eq!(admin(admin_addr, "POST", "/drain").await.0, 202);
        within("drain requested", requested).await;
    }
    within("drain", sluice.drain()).await;
}

async fn futures_poll_once<F: Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_can_require_a_reachable_upstream() {
    trace_init();
    let closed = closed_addr();
    let mut cfg = config(closed);
    cfg.admin.ready_requires_upstream = true;
    let down = sluice::run(&cfg).await.expect("sluice");
    let (status, body) = admin(down.admin_addr().expect("admin"), "GET", "/ready").await;
    assert_eq!((status, body.as_str()), (503, "upstream unreachable\n"));

    let upstream = EchoServer::start().await;
    let mut cfg = config(upstream.addr);
    cfg.admin.ready_requires_upstream = true;
    let up = sluice::run(&cfg).await.expect("sluice");
    assert_eq!(
        admin(up.admin_addr().expect("admin"), "GET", "/ready")
            .await
            .0,
        200
    );
    // Without the switch, an unreachable upstream does not make sluice unready.
    let plain = sluice::run(&config(closed)).await.expect("sluice");
    assert_eq!(
        admin(plain.admin_addr().expect("admin"), "GET", "/ready")
            .await
            .0,
        200
    );
}
