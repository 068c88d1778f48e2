//! Point 3: trailers pass verbatim; trailers-only answers stay
//! trailers-only; a status survives the RST_STREAM(NO_ERROR) a server sends
//! when it answers before the client has finished sending.

use sluice_testkit::{FAILURE_DETAILS, Req};
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

const MESSAGE: &str = "nöt fóund: 100% ✓ \r\n\t end";

fn failing(code: tonic::Code) -> Req {
    Req {
        fail_code: code as i32,
        fail_message: MESSAGE.to_owned(),
        ..Req::default()
    }
}

fn assert_failure(status: &tonic::Status, code: tonic::Code) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), MESSAGE);
    assert_eq!(status.details(), FAILURE_DETAILS);
    assert_eq!(
        status.metadata().get("x-trailer").expect("text trailer"),
        "trailer-text"
    );
    assert_eq!(
        status
            .metadata()
            .get_bin("x-trailer-bin")
            .expect("binary trailer")
            .to_bytes()
            .expect("base64"),
        &b"\x00\xff\x80trailer"[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_message_details_and_trailing_metadata_pass_verbatim() {
    let mut p = proxied().await;
    let status = within("unary", p.client.unary(failing(tonic::Code::NotFound)))
        .await
        .expect_err("the upstream fails the call");
    assert_failure(&status, tonic::Code::NotFound);

    // The same after streamed messages, as real trailers.
    let mut req = failing(tonic::Code::ResourceExhausted);
    req.replies = 3;
    let mut stream = within("server stream", p.client.server_stream(req))
        .await
        .expect("headers")
        .into_inner();
    for seq in 0..3 {
        let reply = within("reply", stream.message())
            .await
            .expect("ok")
            .expect("a reply");
        assert_eq!(reply.seq, seq);
    }
    let status = within("trailers", stream.message())
        .await
        .expect_err("failure trailers");
    assert_failure(&status, tonic::Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_only_answers_stay_trailers_only() {
    let p = proxied().await;
    let mut h2 = raw_client(p.sluice.listen_addr()).await;
    let (response, mut body) = h2.send_request(grpc_head("Unary"), false).expect("open");
    body.send_data(grpc_frame(&failing(tonic::Code::PermissionDenied)), true)
        .expect("send");
    let res = within("response", response).await.expect("headers");
    // One HEADERS frame with END_STREAM, carrying the status.
    assert!(
        res.body().is_end_stream(),
        "trailers-only must end with its headers"
    );
    assert_eq!(res.headers()["grpc-status"], "7");
    let message = res.headers()["grpc-message"]
        .to_str()
        .expect("percent-encoded ASCII");
    assert_eq!(
        percent_encoding::percent_decode_str(message)
            .decode_utf8()
            .expect("utf-8"),
        MESSAGE
    );
    assert_eq!(res.headers()["x-trailer"], "trailer-text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_status_survives_the_servers_no_error_reset() {
    let mut p = proxied().await;
    // The client keeps its request stream open; the upstream answers on the
    // first message and resets the rest of the request with NO_ERROR.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(failing(tonic::Code::AlreadyExists))
        .await
        .expect("queue");
    let status = within(
        "client stream",
        p.client.client_stream(ReceiverStream::new(rx)),
    )
    .await
    .expect_err("the upstream answers early with a failure");
    assert_failure(&status, tonic::Code::AlreadyExists);
    drop(tx);
}
