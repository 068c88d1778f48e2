//! Point 1: response headers go back the moment the upstream sends them,
//! not when the first message arrives.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_reach_the_client_before_any_message() {
    let mut p = proxied().await;
    // The upstream sends headers and then waits forever.
    let req = hanging();
    let res = within("response headers", p.client.server_stream(req))
        .await
        .expect("headers arrive as a response");
    assert_eq!(
        res.metadata().get("x-upstream").expect("upstream header"),
        "echo"
    );
    assert_eq!(
        res.metadata()
            .get_bin("x-upstream-bin")
            .expect("binary upstream header")
            .to_bytes()
            .expect("valid base64"),
        &b"\x00\x01\xff"[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_sees_response_headers_without_end_of_stream() {
    let p = proxied().await;
    let mut h2 = raw_client(p.sluice.listen_addr()).await;
    let (response, _body) = send_call(&mut h2, grpc_head("ServerStream"), &hanging());
    let res = within("response headers", response).await.expect("headers");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert!(res.headers().get("grpc-status").is_none());
    assert!(
        !res.body().is_end_stream(),
        "a streaming response stays open"
    );
}
