use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use tokio::sync::mpsc;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::{Layer, ServiceExt, service_fn};
use tower_test::mock;

use super::DeadlineLayer;
use crate::grpc::status::{self, Code};
use crate::test_util::ChannelBody;

fn request(timeout: Option<&'static str>) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    if let Some(t) = timeout {
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(t));
    }
    req
}

/// A call through [`DeadlineLayer`] with `grpc-timeout: timeout` whose
/// response body the returned sender feeds.
async fn streaming_call(
    timeout: &'static str,
) -> (
    mpsc::Sender<Frame<Bytes>>,
    Response<super::body::ResponseBody<ChannelBody>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let mut body = Some(ChannelBody(rx));
    let svc = DeadlineLayer::new().layer(service_fn(move |_req: Request<Empty<Bytes>>| {
        let body = body.take().expect("called once");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let res = svc.oneshot(request(Some(timeout))).await.expect("response");
    (tx, res)
}

#[tokio::test(start_paused = true)]
async fn passes_calls_without_a_timeout_through_untouched() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Request<Empty<Bytes>>, Response<Empty<Bytes>>, _>(DeadlineLayer::new());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(request(None));
    let (req, send) = handle.next_request().await.expect("request reaches inner");
    assert!(req.headers().get("grpc-timeout").is_none());
    tokio::time::advance(Duration::from_secs(3600)).await;
    send.send_response(Response::new(Empty::new()));
    let res = fut.await.expect("inner response");
    assert_eq!(status::code_of(res.headers()), None);
    assert!(res.into_body().is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn answers_deadline_exceeded_when_headers_are_late_and_drops_the_inner_call() {
    let (alive_tx, alive_rx) = tokio::sync::oneshot::channel::<()>();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let mut guards = Some((alive_tx, seen_tx));
    let svc = DeadlineLayer::new().layer(service_fn(move |req: Request<Empty<Bytes>>| {
        let (alive, seen) = guards.take().expect("called once");
        let _ = seen.send(req.headers().clone());
        async move {
            let _alive = alive;
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>().await
        }
    }));
    let mut fut = tokio_test::task::spawn(svc.oneshot(request(Some("100m"))));
    assert_pending!(fut.poll());
    // The header stays, so that the next hop enforces the same deadline.
    assert_eq!(seen_rx.await.expect("inner called")["grpc-timeout"], "100m");
    tokio::time::advance(Duration::from_millis(99)).await;
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_millis(1)).await;
    let res = assert_ready!(fut.poll()).expect("a refusal is a response");
    assert_eq!(status::code_of(res.headers()), Some(Code::DeadlineExceeded));
    assert!(res.into_body().is_end_stream());
    drop(fut);
    // Dropping the future dropped the inner call.
    assert!(alive_rx.await.is_err());
}

#[tokio::test(start_paused = true)]
async fn ends_a_streaming_body_with_deadline_exceeded_trailers_and_drops_it() {
    let (tx, res) = streaming_call("1S").await;
    let mut body = tokio_test::task::spawn(res.into_body());

    tx.send(Frame::data(Bytes::from_static(b"first")))
        .await
        .expect("body alive");
    let frame = assert_ready!(body.enter(|cx, b| b.poll_frame(cx)))
        .expect("a frame")
        .expect("no error");
    assert_eq!(frame.into_data().expect("data"), "first");
    assert_pending!(body.enter(|cx, b| b.poll_frame(cx)));

    tokio::time::advance(Duration::from_secs(1)).await;
    let frame = assert_ready!(body.enter(|cx, b| b.poll_frame(cx)))
        .expect("a frame")
        .expect("no error");
    let trailers = frame.into_trailers().expect("trailers");
    assert_eq!(status::code_of(&trailers), Some(Code::DeadlineExceeded));
    assert!(body.is_end_stream());
    // The inner body is gone: the upstream's side of the call is cancelled.
    assert!(tx.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_body_that_ends_in_time_keeps_its_own_trailers() {
    let (tx, res) = streaming_call("1S").await;
    tx.send(Frame::data(Bytes::from_static(b"x")))
        .await
        .expect("alive");
    tx.send(Frame::trailers(status::trailers(Code::NotFound, "gone")))
        .await
        .expect("alive");
    drop(tx);
    let collected = res.into_body().collect().await.expect("infallible");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(status::code_of(&trailers), Some(Code::NotFound));
    assert_eq!(collected.to_bytes(), "x");
}

#[tokio::test(start_paused = true)]
async fn forwards_the_budget_less_the_offset_and_caps_it_by_the_route() {
    use crate::direct::{Destination, Route};
    let (seen_tx, mut seen) = mpsc::channel(4);
    let svc = DeadlineLayer::new()
        .offset(Duration::from_millis(50))
        .layer(service_fn(move |req: Request<Empty<Bytes>>| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx
                    .send(req.headers().get("grpc-timeout").cloned())
                    .await;
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        }));
    // The client's 1 s, less the 50 ms offset.
    svc.clone().oneshot(request(Some("1S"))).await.expect("ok");
    let forwarded = seen.recv().await.flatten().expect("forwarded");
    assert_eq!(
        crate::grpc::timeout::parse(&forwarded),
        Some(Duration::from_millis(950))
    );
    // A route caps it at 200 ms (and the timer enforces the cap).
    let mut req = request(Some("1S"));
    req.extensions_mut().insert(Route::One(
        Destination::new("x").with_timeout(Duration::from_millis(200)),
    ));
    svc.clone().oneshot(req).await.expect("ok");
    let forwarded = seen.recv().await.flatten().expect("forwarded");
    assert_eq!(
        crate::grpc::timeout::parse(&forwarded),
        Some(Duration::from_millis(150))
    );
    // A route cap applies to a call that had no deadline at all.
    let mut req = request(None);
    req.extensions_mut().insert(Route::One(
        Destination::new("x").with_timeout(Duration::from_secs(2)),
    ));
    svc.oneshot(req).await.expect("ok");
    let forwarded = seen.recv().await.flatten().expect("forwarded");
    assert_eq!(
        crate::grpc::timeout::parse(&forwarded),
        Some(Duration::from_millis(1950))
    );
}

#[tokio::test(start_paused = true)]
async fn the_expiry_message_names_no_one_by_default_and_is_settable() {
    let late = |layer: DeadlineLayer| {
        let svc = layer.layer(service_fn(|_: Request<Empty<Bytes>>| async {
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>().await
        }));
        svc.oneshot(request(Some("10m")))
    };
    // Trailers-only, headers late: the library's text names no product.
    let res = late(DeadlineLayer::new()).await.expect("a response");
    assert_eq!(
        res.headers()["grpc-message"],
        status::encode_message(super::DEFAULT_MESSAGE)
    );
    assert!(!super::DEFAULT_MESSAGE.contains("sluice"));
    // A proxy's own text, trailers-only...
    let text = "deadline exceeded (grpc-timeout) at test-proxy";
    let res = late(DeadlineLayer::new().message(text))
        .await
        .expect("a response");
    assert_eq!(status::code_of(res.headers()), Some(Code::DeadlineExceeded));
    assert_eq!(res.headers()["grpc-message"], status::encode_message(text));
    // ...and in the trailers of a body the deadline cut off.
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(1);
    let mut inner_body = Some(ChannelBody(rx));
    let svc =
        DeadlineLayer::new()
            .message(text)
            .layer(service_fn(move |_: Request<Empty<Bytes>>| {
                let body = inner_body.take().expect("called once");
                async move { Ok::<_, Infallible>(Response::new(body)) }
            }));
    let mut body = svc
        .oneshot(request(Some("10m")))
        .await
        .expect("response")
        .into_body();
    let frame = body.frame().await.expect("a frame").expect("no error");
    let trailers = frame.into_trailers().expect("trailers");
    assert_eq!(status::code_of(&trailers), Some(Code::DeadlineExceeded));
    assert_eq!(trailers["grpc-message"], status::encode_message(text));
    drop(tx);
}
