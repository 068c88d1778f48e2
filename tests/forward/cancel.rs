//! Point 5: cancellation crosses sluice both ways within milliseconds, and
//! the upstream sees a cancellation (RST_STREAM(CANCEL)), not a normal end.

use sluice_testkit::Req;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropping_a_stream_cancels_the_upstream_call() {
    let mut p = proxied().await;
    let req = hanging();
    let stream = within("headers", p.client.server_stream(req))
        .await
        .expect("headers");
    p.upstream.probe.wait_for(LIMIT, |c| c.started == 1).await;
    drop(stream);
    let counts = p.upstream.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
    assert_eq!(counts.completed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_abandoning_a_unary_call_cancels_it_before_headers() {
    let p = proxied().await;
    let mut client = p.client.clone();
    let call = tokio::spawn(async move {
        client
            .unary(Req {
                delay_ms: 60_000,
                ..Req::default()
            })
            .await
    });
    p.upstream.probe.wait_for(LIMIT, |c| c.started == 1).await;
    call.abort();
    p.upstream.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_receives_cancel_as_the_reset_reason() {
    trace_init();
    for behaviour in [Behaviour::Hang, Behaviour::HeadersThenHang] {
        let mut upstream = RawUpstream::start(behaviour).await;
        let sluice = sluice::run(&config(upstream.addr)).await.expect("sluice");
        let mut h2 = raw_client(sluice.listen_addr()).await;
        let (response, mut body) = h2.send_request(grpc_head("Bidi"), false).expect("open");
        body.send_data(grpc_frame(&Req::default()), false)
            .expect("send");
        within("upstream sees the call", upstream.heads.recv())
            .await
            .expect("a call");
        if matches!(behaviour, Behaviour::HeadersThenHang) {
            within("headers", response).await.expect("headers");
        } else {
            drop(response);
        }
        body.send_reset(h2::Reason::CANCEL);
        let reason = within("upstream reset", upstream.resets.recv())
            .await
            .expect("a reset");
        assert_eq!(reason, h2::Reason::CANCEL, "{behaviour:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_connection_cancels_its_upstream_calls() {
    let mut p = proxied().await;
    let tcp = tokio::net::TcpStream::connect(p.sluice.listen_addr())
        .await
        .expect("connect");
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (response, _body) = send_call(&mut h2, grpc_head("ServerStream"), &hanging());
        calls.push(response);
    }
    for response in calls {
        within("headers", response).await.expect("headers");
    }
    p.upstream.probe.wait_for(LIMIT, |c| c.started == 3).await;
    // The whole connection goes away: no RST_STREAM, just a closed socket.
    conn.abort();
    drop(h2);
    p.upstream.probe.wait_for(LIMIT, |c| c.cancelled == 3).await;
    // And the client's other connections are untouched.
    let reply = within("unary", p.client.unary(Req::default()))
        .await
        .expect("ok");
    assert_eq!(reply.into_inner().seq, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_reaches_the_client_with_its_reason() {
    trace_init();
    for behaviour in [
        Behaviour::ResetBeforeHeaders(h2::Reason::REFUSED_STREAM),
        Behaviour::ResetBeforeHeaders(h2::Reason::CANCEL),
        Behaviour::ResetAfterHeaders(h2::Reason::CANCEL),
        Behaviour::ResetAfterHeaders(h2::Reason::ENHANCE_YOUR_CALM),
    ] {
        let upstream = RawUpstream::start(behaviour).await;
        let sluice = sluice::run(&config(upstream.addr)).await.expect("sluice");
        let mut h2 = raw_client(sluice.listen_addr()).await;
        let (response, mut body) = h2.send_request(grpc_head("Unary"), false).expect("open");
        // The upstream's reset may come back through sluice before this
        // send, which then finds the stream closed: that is the point.
        let _ = body.send_data(grpc_frame(&Req::default()), true);
        let err = match within("response", response).await {
            Err(e) => e,
            Ok(res) => {
                let mut recv = res.into_body();
                match within("body", recv.data()).await {
                    Some(Err(e)) => e,
                    other => panic!("{behaviour:?}: expected a reset, got {other:?}"),
                }
            }
        };
        let (Behaviour::ResetBeforeHeaders(expected) | Behaviour::ResetAfterHeaders(expected)) =
            behaviour
        else {
            unreachable!("only reset behaviours are listed")
        };
        assert_eq!(err.reason(), Some(expected), "{behaviour:?}: {err}");
    }
}
