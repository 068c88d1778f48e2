use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, ServiceExt, service_fn};

use super::{PeekLayer, Peeked, PeekedMessage, ReplayBody};
use crate::grpc::status::{self, Code};

/// A request body fed from a channel, one chunk per frame.
#[derive(Debug)]
struct Chunks(mpsc::Receiver<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

fn message(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![flag];
    m.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// An inner service that reports what it saw: the peeked messages and the
/// whole body it received.
fn recorder<B>(
    seen: oneshot::Sender<(Vec<PeekedMessage>, Bytes)>,
) -> impl tower::Service<
    Request<ReplayBody<B>>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Some(seen)));
    service_fn(move |req: Request<ReplayBody<B>>| {
        let seen = seen.clone();
        async move {
            let peeked = req
                .extensions()
                .get::<Peeked>()
                .expect("peeked")
                .messages()
                .to_vec();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            if let Some(tx) = seen.lock().expect("lock").take() {
                let _ = tx.send((peeked, body));
            }
            Ok(Response::new(Empty::new()))
        }
    })
}

#[tokio::test]
async fn peeks_a_message_split_across_chunks_and_replays_every_byte() {
    let mut wire = message(0, b"first message");
    wire.extend(message(0, b"second"));
    let (tx, rx) = mpsc::channel(16);
    for chunk in wire.chunks(3) {
        tx.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("queued");
    }
    drop(tx);
    let (seen_tx, seen) = oneshot::channel();
    let svc = PeekLayer::new().layer(recorder::<Chunks>(seen_tx));
    svc.oneshot(Request::new(Chunks(rx))).await.expect("ok");
    let (peeked, body) = seen.await.expect("inner called");
    assert_eq!(
        peeked,
        [PeekedMessage::new(Bytes::from_static(b"first message"))]
    );
    assert_eq!(&body[..], &wire[..], "every byte replayed, in order");
}

#[tokio::test]
async fn the_rest_of_the_stream_is_not_read_before_the_call() {
    let (tx, rx) = mpsc::channel(16);
    tx.send(Bytes::from(message(0, b"one")))
        .await
        .expect("queued");
    let (called_tx, called) = oneshot::channel();
    let called_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(called_tx)));
    let svc = PeekLayer::new().layer(service_fn(move |req: Request<ReplayBody<Chunks>>| {
        if let Some(tx) = called_tx.lock().expect("lock").take() {
            let _ = tx.send(());
        }
        async move {
            let body = req.into_body().collect().await.expect("body").to_bytes();
            Ok::<_, Infallible>(Response::new(Full::new(body)))
        }
    }));
    let call = tokio::spawn(svc.oneshot(Request::new(Chunks(rx))));
    // The inner service is called while the client is still sending.
    called.await.expect("called after the first message only");
    tx.send(Bytes::from(message(0, b"two")))
        .await
        .expect("stream still open");
    drop(tx);
    let res = call.await.expect("task").expect("ok");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], [message(0, b"one"), message(0, b"two")].concat());
}

#[tokio::test]
async fn a_stream_with_no_message_still_proceeds() {
    let (seen_tx, seen) = oneshot::channel();
    let svc = PeekLayer::new().layer(recorder::<Empty<Bytes>>(seen_tx));
    svc.oneshot(Request::new(Empty::new())).await.expect("ok");
    let (peeked, body) = seen.await.expect("inner called");
    assert!(peeked.is_empty());
    assert!(body.is_empty());
}

#[tokio::test]
async fn compressed_messages_are_marked() {
    let (seen_tx, seen) = oneshot::channel();
    let svc = PeekLayer::new().layer(recorder::<Full<Bytes>>(seen_tx));
    let wire = Bytes::from(message(1, b"gzipped"));
    svc.oneshot(Request::new(Full::new(wire)))
        .await
        .expect("ok");
    let (peeked, _) = seen.await.expect("inner called");
    assert!(peeked[0].compressed());
}

#[tokio::test]
async fn over_the_budget_is_refused_with_resource_exhausted() {
    let (seen_tx, seen) = oneshot::channel();
    let svc = PeekLayer::new()
        .max_bytes(100)
        .layer(recorder::<Full<Bytes>>(seen_tx));
    let wire = Bytes::from(message(0, &[7; 200]));
    let res = svc
        .oneshot(Request::new(Full::new(wire)))
        .await
        .expect("a refusal is a response");
    assert_eq!(
        status::code_of(res.headers()),
        Some(Code::ResourceExhausted)
    );
    assert!(seen.await.is_err(), "the inner service was never called");
}

#[tokio::test]
async fn the_first_message_can_be_replaced() {
    let mut wire = message(0, b"original");
    wire.extend(message(0, b"kept"));
    let svc = PeekLayer::new().layer(service_fn(
        |req: Request<ReplayBody<Full<Bytes>>>| async move {
            let mut body = req.into_body();
            body.replace_first_message(&Bytes::from_static(b"rewritten!"));
            let bytes = body.collect().await.expect("body").to_bytes();
            Ok::<_, Infallible>(Response::new(Full::new(bytes)))
        },
    ));
    let res = svc
        .oneshot(Request::new(Full::new(Bytes::from(wire))))
        .await
        .expect("ok");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        &body[..],
        [message(0, b"rewritten!"), message(0, b"kept")].concat()
    );
}

#[tokio::test]
async fn one_byte_frames_are_read_whole_and_replayed() {
    let (tx, rx) = mpsc::channel(1 << 16);
    let m = message(0, &[9u8; 40_000]);
    for b in &m {
        tx.try_send(Bytes::copy_from_slice(&[*b])).expect("room");
    }
    drop(tx);
    let (seen_tx, seen) = oneshot::channel();
    let svc = PeekLayer::new().layer(recorder(seen_tx));
    let res = svc
        .oneshot(Request::new(Chunks(rx)))
        .await
        .expect("answered");
    assert_eq!(status::code_of(res.headers()), None, "not refused");
    let (peeked, body) = seen.await.expect("the inner service ran");
    assert_eq!(peeked.len(), 1);
    assert_eq!(peeked[0].payload().len(), 40_000);
    assert_eq!(&body[..], &m[..]);
}

#[tokio::test]
async fn calls_the_predicate_declines_are_not_read_ahead() {
    // A body that never sends: a peek would wait; a skipped call goes on.
    let (_tx, rx) = mpsc::channel::<Bytes>(1);
    let svc = PeekLayer::new()
        .when(|parts| parts.uri.path().starts_with("/routed."))
        .layer(service_fn(|req: Request<ReplayBody<Chunks>>| async move {
            assert!(req.extensions().get::<Peeked>().is_none(), "peeked");
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }));
    let req = Request::post("/other.Svc/M").body(Chunks(rx)).expect("req");
    let res = tokio::time::timeout(std::time::Duration::from_secs(5), svc.oneshot(req))
        .await
        .expect("not held waiting for a message")
        .expect("answered");
    assert_eq!(status::code_of(res.headers()), None);
}

#[tokio::test(start_paused = true)]
async fn the_wait_for_the_first_message_is_bounded_by_grpc_timeout_and_max_wait() {
    for (header, wait, want) in [
        (Some("200m"), std::time::Duration::from_secs(10), 200),
        (None, std::time::Duration::from_millis(300), 300),
    ] {
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        let (seen_tx, _seen) = oneshot::channel();
        let svc = PeekLayer::new().max_wait(wait).layer(recorder(seen_tx));
        let mut req = Request::new(Chunks(rx));
        if let Some(h) = header {
            req.headers_mut()
                .insert("grpc-timeout", h.parse().expect("value"));
        }
        let started = tokio::time::Instant::now();
        let res = svc.oneshot(req).await.expect("answered");
        assert_eq!(status::code_of(res.headers()), Some(Code::DeadlineExceeded));
        assert_eq!(started.elapsed().as_millis(), want);
    }
}

#[tokio::test]
async fn one_connections_peeks_share_a_budget() {
    use tower::Service;
    // Two calls of one service (one connection), each holding 600 bytes of
    // an unfinished message, against a 1000-byte connection budget.
    let (seen_tx, _seen) = oneshot::channel();
    let mut svc = PeekLayer::new()
        .max_bytes_per_connection(1000)
        .layer(recorder::<Chunks>(seen_tx));
    let part = Bytes::from(message(0, &[1u8; 2000])[..600].to_vec());
    let (tx1, rx1) = mpsc::channel(1);
    tx1.send(part.clone()).await.expect("send");
    let first = svc
        .ready()
        .await
        .expect("ready")
        .call(Request::new(Chunks(rx1)));
    let first = tokio::spawn(first);
    tokio::task::yield_now().await;
    assert!(!first.is_finished(), "the first call is still reading");
    let (tx2, rx2) = mpsc::channel(1);
    tx2.send(part.clone()).await.expect("send");
    let second = svc
        .ready()
        .await
        .expect("ready")
        .call(Request::new(Chunks(rx2)));
    let second = second.await.expect("answered");
    assert_eq!(
        status::code_of(second.headers()),
        Some(Code::ResourceExhausted)
    );
    // A clone (another connection) has a budget of its own.
    let (tx3, rx3) = mpsc::channel(1);
    tx3.send(part).await.expect("send");
    let mut other = svc.clone();
    let third = other
        .ready()
        .await
        .expect("ready")
        .call(Request::new(Chunks(rx3)));
    let third = tokio::spawn(third);
    tokio::task::yield_now().await;
    assert!(
        !third.is_finished(),
        "the other connection's call is still reading"
    );
    first.abort();
    third.abort();
}

/// 600 bytes of an unfinished message, each, against a 1000-byte
/// connection budget: two calls that hold them at once do not fit.
fn unfinished_part() -> Bytes {
    Bytes::from(message(0, &[1u8; 2000])[..600].to_vec())
}

/// The answer to a call that must come at once (not at `max_wait`).
async fn answered<F, R, E>(call: F) -> R
where
    F: std::future::Future<Output = Result<R, E>>,
    E: std::fmt::Debug,
{
    tokio::time::timeout(std::time::Duration::from_secs(5), call)
        .await
        .expect("answered at once, not held to the wait bound")
        .expect("answered")
}

/// A call whose body holds `part` and then waits; the sender keeps it open.
fn holding_request(part: Bytes) -> (mpsc::Sender<Bytes>, Request<Chunks>) {
    let (tx, rx) = mpsc::channel(1);
    tx.try_send(part).expect("room for one chunk");
    (tx, Request::new(Chunks(rx)))
}

#[tokio::test]
async fn a_budget_in_the_extensions_is_shared_by_per_request_clones() {
    use super::ConnectionBudget;
    use tower::Service;
    // tonic and hyper-util clone the service for every request: each call
    // here goes through a fresh clone, as there.
    let (seen_tx, _seen) = oneshot::channel();
    let svc = PeekLayer::new()
        .max_bytes_per_connection(1000)
        .layer(recorder::<Chunks>(seen_tx));
    let conn = ConnectionBudget::new();

    let (_tx1, mut req1) = holding_request(unfinished_part());
    req1.extensions_mut().insert(conn.clone());
    let first = tokio::spawn(svc.clone().oneshot(req1));
    tokio::task::yield_now().await;
    assert!(!first.is_finished(), "the first call is still reading");
    assert_eq!(conn.held(), 600);

    let (_tx2, mut req2) = holding_request(unfinished_part());
    req2.extensions_mut().insert(conn.clone());
    let second = answered(svc.clone().oneshot(req2)).await;
    assert_eq!(
        status::code_of(second.headers()),
        Some(Code::ResourceExhausted)
    );
    assert_eq!(conn.held(), 600, "a refused call gives its bytes back");

    // Another connection's budget is its own.
    let other = ConnectionBudget::new();
    let (_tx3, mut req3) = holding_request(unfinished_part());
    req3.extensions_mut().insert(other.clone());
    let mut third = svc.clone();
    let third = tokio::spawn(third.ready().await.expect("ready").call(req3));
    tokio::task::yield_now().await;
    assert!(
        !third.is_finished(),
        "the other connection's call is still reading"
    );
    assert_eq!(other.held(), 600);

    first.abort();
    third.abort();
    let _ = (first.await, third.await);
    assert_eq!(
        (conn.held(), other.held()),
        (0, 0),
        "dropped calls give back"
    );
}

#[tokio::test]
async fn budget_from_reads_the_connections_budget_from_another_extension() {
    use super::ConnectionBudget;
    #[derive(Clone)]
    struct ConnInfo(ConnectionBudget);
    let (seen_tx, _seen) = oneshot::channel();
    let svc = PeekLayer::new()
        .max_bytes_per_connection(1000)
        .budget_from(|ext| ext.get::<ConnInfo>().map(|c| c.0.clone()))
        .layer(recorder::<Chunks>(seen_tx));
    let conn = ConnectionBudget::new();
    let (_tx1, mut req1) = holding_request(unfinished_part());
    req1.extensions_mut().insert(ConnInfo(conn.clone()));
    let first = tokio::spawn(svc.clone().oneshot(req1));
    tokio::task::yield_now().await;
    assert_eq!(conn.held(), 600);
    let (_tx2, mut req2) = holding_request(unfinished_part());
    req2.extensions_mut().insert(ConnInfo(conn.clone()));
    let second = answered(svc.clone().oneshot(req2)).await;
    assert_eq!(
        status::code_of(second.headers()),
        Some(Code::ResourceExhausted)
    );
    first.abort();
}

#[tokio::test]
async fn per_connection_services_share_a_budget_across_their_clones() {
    use tower::Service;
    let (seen_tx, _seen) = oneshot::channel();
    let inner = recorder::<Chunks>(seen_tx);
    let mut make = PeekLayer::new()
        .max_bytes_per_connection(1000)
        .per_connection()
        .layer(service_fn(move |_conn: u32| {
            let inner = inner.clone();
            async move { Ok::<_, Infallible>(inner) }
        }));
    let conn = make
        .ready()
        .await
        .expect("ready")
        .call(1)
        .await
        .expect("made");

    let (_tx1, req1) = holding_request(unfinished_part());
    let first = tokio::spawn(conn.clone().oneshot(req1));
    tokio::task::yield_now().await;
    assert!(!first.is_finished(), "the first call is still reading");
    let (_tx2, req2) = holding_request(unfinished_part());
    let second = answered(conn.clone().oneshot(req2)).await;
    assert_eq!(
        status::code_of(second.headers()),
        Some(Code::ResourceExhausted),
        "clones of one connection's service share its budget"
    );

    // The next connection gets a budget of its own.
    let other = make
        .ready()
        .await
        .expect("ready")
        .call(2)
        .await
        .expect("made");
    let (_tx3, req3) = holding_request(unfinished_part());
    let third = tokio::spawn(other.clone().oneshot(req3));
    tokio::task::yield_now().await;
    assert!(
        !third.is_finished(),
        "the other connection's call is still reading"
    );
    first.abort();
    third.abort();
}
