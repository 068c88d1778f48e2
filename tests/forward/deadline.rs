//! Point 6: `grpc-timeout` is forwarded and enforced by sluice: at the
//! deadline the client gets DEADLINE_EXCEEDED and the upstream call is
//! cancelled, before response headers and after them.

use sluice_testkit::Req;

use crate::support::*;

fn with_timeout(method: &str, timeout: &'static str) -> http::Request<()> {
    let mut head = grpc_head(method);
    head.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_before_headers_gives_a_trailers_only_deadline_exceeded() {
    trace_init();
    // An upstream that never answers and does not enforce deadlines itself.
    let mut upstream = RawUpstream::start(Behaviour::Hang).await;
    let sluice = sluice::run(&config(upstream.addr)).await.expect("sluice");
    let mut h2 = raw_client(sluice.listen_addr()).await;
    let (response, _body) = send_call(&mut h2, with_timeout("Unary", "200m"), &Req::default());
    let head = within("upstream call", upstream.heads.recv())
        .await
        .expect("a call");
    assert_eq!(
        head["grpc-timeout"], "200m",
        "grpc-timeout is forwarded as sent"
    );
    let res = within("response", response).await.expect("a response");
    assert!(res.body().is_end_stream(), "trailers-only");
    assert_eq!(res.headers()["grpc-status"], "4");
    let reason = within("upstream reset", upstream.resets.recv())
        .await
        .expect("reset");
    assert_eq!(reason, h2::Reason::CANCEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_during_a_stream_ends_it_with_deadline_exceeded_trailers() {
    let p = proxied().await;
    let mut h2 = raw_client(p.sluice.listen_addr()).await;
    let (response, _body) = send_call(&mut h2, with_timeout("ServerStream", "300m"), &hanging());
    // tonic's server stops enforcing grpc-timeout once it has sent
    // headers: from here on only sluice's deadline can end this call.
    let res = within("headers", response).await.expect("headers");
    let mut recv = res.into_body();
    assert!(
        within("data", recv.data()).await.is_none(),
        "no message before the deadline"
    );
    let trailers = within("trailers", recv.trailers())
        .await
        .expect("trailers")
        .expect("some");
    assert_eq!(trailers["grpc-status"], "4");
    let counts = p.upstream.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
    assert_eq!(counts.completed, 0);
    let seen = p.upstream.probe.last_metadata().expect("metadata");
    assert_eq!(seen.get("grpc-timeout").expect("forwarded"), "300m");
}
