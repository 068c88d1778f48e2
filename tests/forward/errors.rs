//! Point 8: every error sluice itself produces is a proper gRPC status.

use sluice_testkit::{EchoServer, Req};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_unavailable_at_once() {
    trace_init();
    let upstream = closed_addr();
    let sluice = sluice::run(&config(upstream)).await.expect("sluice");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    for _ in 0..5 {
        let status = within("unary", client.unary(Req::default()))
            .await
            .expect_err("no upstream");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains(&upstream.to_string()),
            "{status:?}"
        );
    }
    // Raw: the refusal is trailers-only with a content-type.
    let mut h2 = raw_client(sluice.listen_addr()).await;
    let (response, _body) = send_call(&mut h2, grpc_head("Unary"), &Req::default());
    let res = within("response", response).await.expect("response");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], "14");
    assert!(res.body().is_end_stream());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_stream_ends_the_call_with_unavailable() {
    let mut p = proxied().await;
    let req = Req {
        replies: 2,
        delay_ms: 0,
        ..Req::default()
    };
    // First a healthy stream, so the connection is up.
    let mut ok = within("stream", p.client.server_stream(req))
        .await
        .expect("ok")
        .into_inner();
    while within("reply", ok.message()).await.expect("ok").is_some() {}

    let hang = hanging();
    let mut stream = within("headers", p.client.server_stream(hang))
        .await
        .expect("headers")
        .into_inner();
    let addr = p.upstream.addr;
    p.upstream.stop().await;
    let status = within("end of stream", stream.message())
        .await
        .expect_err("the stream cannot end OK");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("upstream"), "{status:?}");

    // The upstream comes back on the same port: sluice reconnects.
    let back = EchoServer::start_on(addr).await;
    let mut attempts = 0;
    let reply = loop {
        attempts += 1;
        match within(
            "unary",
            p.client.unary(Req {
                seq: 9,
                ..Req::default()
            }),
        )
        .await
        {
            Ok(reply) => break reply.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && attempts < 100 => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("no recovery: {status:?}"),
        }
    };
    assert_eq!(reply.seq, 9);
    assert_eq!(back.probe.counts().completed, 1);
}
