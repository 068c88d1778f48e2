use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use tokio::sync::mpsc;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{Layer, ServiceExt, service_fn};
use tower_test::mock;

use super::{DrainLayer, channel};
use crate::grpc::status::{self, Code};
use crate::test_util::ChannelBody;

#[tokio::test]
async fn passes_calls_through_before_drain() {
    let (_signal, watch) = channel();
    let (mut svc, mut handle) = mock::spawn_layer::<Request<&'static str>, Response<Empty<Bytes>>, _>(
        DrainLayer::new(watch),
    );
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(Request::new("hello"));
    let (req, send) = handle.next_request().await.expect("the call reaches inner");
    assert_eq!(*req.body(), "hello");
    send.send_response(Response::new(Empty::new()));
    let res = fut.await.expect("response");
    assert_eq!(status::code_of(res.headers()), None);
}

#[tokio::test]
async fn refuses_new_calls_with_unavailable_once_draining() {
    let (signal, watch) = channel();
    let (mut svc, mut handle) = mock::spawn_layer::<Request<&'static str>, Response<Empty<Bytes>>, _>(
        DrainLayer::new(watch.clone()),
    );
    signal.drain().await;
    assert!(watch.is_draining());
    assert_ready_ok!(svc.poll_ready());
    let res = svc
        .call(Request::new("late"))
        .await
        .expect("a refusal is a response");
    assert_eq!(status::code_of(res.headers()), Some(Code::Unavailable));
    assert!(res.body().is_end_stream(), "trailers-only");
    // The inner service never saw the call.
    handle.allow(1);
    assert_pending!(task::spawn(handle.next_request()).poll());
}

#[tokio::test]
async fn is_ready_while_draining_even_if_inner_is_not() {
    let (signal, watch) = channel();
    let (mut svc, mut handle) = mock::spawn_layer::<Request<&'static str>, Response<Empty<Bytes>>, _>(
        DrainLayer::new(watch),
    );
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    signal.drain().await;
    assert_ready_ok!(svc.poll_ready());
}

#[tokio::test]
async fn drain_waits_for_in_flight_response_body() {
    let (signal, watch) = channel();
    let (tx, rx) = mpsc::channel(1);
    let mut body = Some(ChannelBody(rx));
    let svc = DrainLayer::new(watch.clone()).layer(service_fn(move |_: Request<()>| {
        let body = body.take().expect("called once");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let res = svc.oneshot(Request::new(())).await.expect("response");
    assert_eq!(watch.in_flight(), 1);

    let mut drain = task::spawn(signal.drain());
    assert_pending!(drain.poll());
    // Response headers came back long ago; the stream is still open.
    let mut body = task::spawn(res.into_body());
    tx.send(Frame::data(Bytes::from_static(b"m")))
        .await
        .expect("open");
    assert_ready!(body.enter(|cx, b| b.poll_frame(cx)));
    assert_pending!(drain.poll());
    // The end of the stream releases the drain.
    tx.send(Frame::trailers(status::trailers(Code::Ok, "")))
        .await
        .expect("open");
    drop(tx);
    assert_ready!(body.enter(|cx, b| b.poll_frame(cx))); // trailers
    assert!(assert_ready!(body.enter(|cx, b| b.poll_frame(cx))).is_none());
    assert!(drain.is_woken());
    assert_ready!(drain.poll());
}

#[tokio::test]
async fn dropping_the_body_releases_the_drain() {
    let (signal, watch) = channel();
    let (_tx, rx) = mpsc::channel(1);
    let mut body = Some(ChannelBody(rx));
    let svc = DrainLayer::new(watch.clone()).layer(service_fn(move |_: Request<()>| {
        let body = body.take().expect("called once");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let res = svc.oneshot(Request::new(())).await.expect("response");
    let mut drain = task::spawn(signal.drain());
    assert_pending!(drain.poll());
    drop(res); // a client reset: the body is dropped mid-stream
    assert!(drain.is_woken());
    assert_ready!(drain.poll());
    assert_eq!(watch.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn drain_within_reports_calls_still_in_flight_and_ends_them_with_unavailable() {
    let (signal, watch) = channel();
    let (tx, rx) = mpsc::channel(1);
    let mut body = Some(ChannelBody(rx));
    let svc = DrainLayer::new(watch.clone()).layer(service_fn(move |_: Request<()>| {
        let body = body.take().expect("called once");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let res = svc.oneshot(Request::new(())).await.expect("response");
    let mut body = task::spawn(res.into_body());
    assert_pending!(body.enter(|cx, b| b.poll_frame(cx)));

    let err = signal
        .drain_within(Duration::from_secs(30))
        .await
        .expect_err("a stream is still open");
    assert_eq!(err.in_flight(), 1);
    // The open stream is cut off with UNAVAILABLE trailers, not a reset.
    assert!(body.is_woken());
    let frame = assert_ready!(body.enter(|cx, b| b.poll_frame(cx)))
        .expect("a frame")
        .expect("no error");
    let trailers = frame.into_trailers().expect("trailers");
    assert_eq!(status::code_of(&trailers), Some(Code::Unavailable));
    assert!(body.enter(|_, b| b.is_end_stream()));
    assert_eq!(watch.in_flight(), 0);
    // And the upstream side of the call was dropped.
    assert!(tx.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_headers_at_the_deadline_gets_unavailable() {
    let (signal, watch) = channel();
    let svc = DrainLayer::new(watch).layer(service_fn(|_: Request<()>| async {
        std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>().await
    }));
    let mut call = task::spawn(svc.oneshot(Request::new(())));
    assert_pending!(call.poll());
    let timed_out = signal.drain_within(Duration::from_secs(5)).await;
    assert_eq!(timed_out.expect_err("call open").in_flight(), 1);
    let res = assert_ready!(call.poll()).expect("a response");
    assert_eq!(status::code_of(res.headers()), Some(Code::Unavailable));
}

#[tokio::test]
async fn admit_while_draining_lets_calls_in_and_guards_them() {
    let (signal, watch) = channel();
    let (tx, rx) = mpsc::channel(1);
    let mut body = Some(ChannelBody(rx));
    let svc = DrainLayer::new(watch.clone())
        .admit_while_draining(true)
        .layer(service_fn(move |_: Request<()>| {
            let body = body.take().expect("called once");
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));
    let mut drain = task::spawn(signal.drain());
    assert_ready!(drain.poll()); // nothing in flight yet
    assert!(watch.is_draining());
    let res = svc.oneshot(Request::new(())).await.expect("admitted");
    assert_eq!(status::code_of(res.headers()), None);
    assert_eq!(watch.in_flight(), 1);
    drop(tx);
    drop(res);
    assert_eq!(watch.in_flight(), 0);
}

#[tokio::test]
async fn an_announced_drain_withdraws_readiness_but_still_serves() {
    let (signal, watch) = channel();
    let (mut svc, mut handle) = mock::spawn_layer::<Request<&'static str>, Response<Empty<Bytes>>, _>(
        DrainLayer::new(watch.clone()),
    );
    assert!(watch.is_ready());
    signal.announce();
    assert!(!watch.is_ready(), "readiness is withdrawn");
    assert!(!watch.is_draining(), "but the drain has not begun");
    let mut signaled = task::spawn(watch.clone().signaled());
    assert_pending!(signaled.poll(), "connections are not told to go yet");
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(Request::new("still served"));
    let (_, send) = handle.next_request().await.expect("the call reaches inner");
    send.send_response(Response::new(Empty::new()));
    let res = fut.await.expect("response");
    assert_eq!(status::code_of(res.headers()), None);
    drop((signaled, res));
    signal.drain().await;
    assert!(watch.is_draining() && !watch.is_ready());
}

#[tokio::test(start_paused = true)]
async fn refusal_and_expiry_messages_name_no_one_by_default_and_are_settable() {
    use super::{DEFAULT_EXPIRY_MESSAGE, DEFAULT_MESSAGE};
    assert!(!DEFAULT_MESSAGE.contains("sluice") && !DEFAULT_EXPIRY_MESSAGE.contains("sluice"));
    let message = |headers: &http::HeaderMap| headers["grpc-message"].clone();
    for (layer_of, refused, expired) in [
        (
            (|w| DrainLayer::new(w)) as fn(super::Watch) -> DrainLayer,
            DEFAULT_MESSAGE,
            DEFAULT_EXPIRY_MESSAGE,
        ),
        (
            |w| {
                DrainLayer::new(w)
                    .message("test-proxy is draining")
                    .expiry_message("test-proxy is shutting down")
            },
            "test-proxy is draining",
            "test-proxy is shutting down",
        ),
    ] {
        // Cut off while waiting for headers: trailers-only.
        let (signal, watch) = channel();
        let waiting = layer_of(watch.clone()).layer(service_fn(|_: Request<()>| async {
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>().await
        }));
        let mut waiting = task::spawn(waiting.oneshot(Request::new(())));
        assert_pending!(waiting.poll());
        // Cut off while streaming: in the body's trailers.
        let (tx, rx) = mpsc::channel(1);
        let mut inner_body = Some(ChannelBody(rx));
        let streaming = layer_of(watch.clone()).layer(service_fn(move |_: Request<()>| {
            let body = inner_body.take().expect("called once");
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));
        let res = streaming.oneshot(Request::new(())).await.expect("response");
        let mut body = task::spawn(res.into_body());
        assert_pending!(body.enter(|cx, b| b.poll_frame(cx)));

        let refusing = layer_of(watch.clone()).layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }));
        let draining = tokio::spawn(signal.drain_within(Duration::from_secs(1)));
        tokio::task::yield_now().await;
        let res = refusing.oneshot(Request::new(())).await.expect("a refusal");
        assert_eq!(status::code_of(res.headers()), Some(Code::Unavailable));
        assert_eq!(message(res.headers()), status::encode_message(refused));

        assert!(draining.await.expect("joined").is_err(), "two calls open");
        let res = assert_ready!(waiting.poll()).expect("a response");
        assert_eq!(message(res.headers()), status::encode_message(expired));
        let frame = assert_ready!(body.enter(|cx, b| b.poll_frame(cx)))
            .expect("a frame")
            .expect("no error");
        let trailers = frame.into_trailers().expect("trailers");
        assert_eq!(status::code_of(&trailers), Some(Code::Unavailable));
        assert_eq!(message(&trailers), status::encode_message(expired));
        drop(tx);
    }
}
