//! Unit tests of the fan-out layer: merge, interleave, mirror, the tee and
//! the report, each over a real inner service whose every destination
//! behaves as the test says. Time is paused: a call that hangs runs into
//! the test's timeout at once, and the test tells it from an outcome.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{ServiceBuilder, ServiceExt};

use super::{FanoutLayer, Outcome, Report, RequestBody};
use crate::{
    BoxError,
    direct::{Destination, FanOut, Mirror, Mode, OnError, Route, Secondary},
    grpc::{
        framing,
        status::{self, Code},
        wire,
    },
};

/// What one destination does with its call.
#[derive(Clone, Debug)]
enum Does {
    /// Headers, these framed messages, then trailers with this code.
    Reply(Vec<Vec<u8>>, Code),
    /// A trailers-only answer with this code.
    TrailersOnly(Code),
    /// The inner service fails: the destination cannot be reached.
    Unreachable,
    /// Headers, then nothing, ever.
    HeadersThenHang,
}

/// Every destination's behaviour, and the request bytes each one got.
#[derive(Clone, Default)]
struct Upstreams {
    does: Arc<HashMap<String, Does>>,
    got: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

type Reply = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

impl Upstreams {
    fn new(does: &[(&str, Does)]) -> Self {
        Self {
            does: Arc::new(
                does.iter()
                    .map(|(n, d)| ((*n).to_owned(), d.clone()))
                    .collect(),
            ),
            got: Arc::default(),
        }
    }

    fn got(&self, name: &str) -> Vec<u8> {
        self.got
            .lock()
            .expect("lock")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    async fn call(
        self,
        req: Request<RequestBody<Full<Bytes>>>,
    ) -> Result<Response<Reply>, BoxError> {
        let route = req.extensions().get::<Route>().cloned().expect("a route");
        let Route::One(d) = route else {
            panic!("each destination is called alone: {route:?}")
        };
        let name = d.name().to_owned();
        let does = self.does.get(&name).cloned().expect("a known destination");
        if let Does::Unreachable = does {
            return Err(format!("{name} is down").into());
        }
        // The request is read whole before the answer (as a unary handler).
        let body = req.into_body().collect().await?.to_bytes();
        self.got.lock().expect("lock").insert(name, body.to_vec());
        Ok(match does {
            Does::Reply(messages, code) => {
                let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = messages
                    .iter()
                    .map(|m| Ok(Frame::data(framing::encode(m))))
                    .collect();
                frames.push(Ok(Frame::trailers(status::trailers(code, "as asked"))));
                let mut res =
                    Response::new(StreamBody::new(tokio_stream_iter(frames)).boxed_unsync());
                res.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("application/grpc"),
                );
                res
            }
            Does::TrailersOnly(code) => {
                let res = status::trailers_only::<Full<Bytes>>(code, "as asked");
                res.map(|b| b.map_err(|never| match never {}).boxed_unsync())
            }
            Does::HeadersThenHang => Response::new(
                StreamBody::new(futures_util::stream::pending::<
                    Result<Frame<Bytes>, BoxError>,
                >())
                .boxed_unsync(),
            ),
            Does::Unreachable => unreachable!("answered above"),
        })
    }
}

fn tokio_stream_iter<T>(items: Vec<T>) -> futures_util::stream::Iter<std::vec::IntoIter<T>> {
    futures_util::stream::iter(items)
}

/// A layer that records every report.
fn layer(reports: &Arc<Mutex<Vec<Report>>>) -> FanoutLayer {
    let seen = reports.clone();
    FanoutLayer::new().on_report(move |r| seen.lock().expect("lock").push(r.clone()))
}

/// Calls `route` with the request body `body` through a fan-out layer over
/// `upstreams`; returns the head, every data byte, the trailers and the
/// reports, or panics if the answer does not end within a minute of
/// (paused) time.
async fn run(
    upstreams: &Upstreams,
    route: Route,
    body: Bytes,
) -> (HeaderMap, Vec<u8>, Option<HeaderMap>, bool, Vec<Report>) {
    run_with(|l| l, upstreams, route, body).await
}

/// [`run`], with the layer changed by `configure` first.
async fn run_with(
    configure: impl FnOnce(FanoutLayer) -> FanoutLayer,
    upstreams: &Upstreams,
    route: Route,
    body: Bytes,
) -> (HeaderMap, Vec<u8>, Option<HeaderMap>, bool, Vec<Report>) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let up = upstreams.clone();
    let svc = ServiceBuilder::new()
        .layer(configure(layer(&reports)))
        .service(tower::service_fn(move |req| up.clone().call(req)));
    let mut req = Request::new(Full::new(body));
    req.extensions_mut().insert(route);
    let answer = async {
        let res = svc.oneshot(req).await.expect("an answer");
        let (parts, body) = res.into_parts();
        let ended_at_head = body.is_end_stream();
        let collected = body.collect().await.expect("a body");
        let trailers = collected.trailers().cloned();
        (
            parts.headers,
            collected.to_bytes().to_vec(),
            trailers,
            ended_at_head,
        )
    };
    let (head, data, trailers, ended) = tokio::time::timeout(Duration::from_secs(60), answer)
        .await
        .expect("the call ended: it did not hang to the timeout");
    // The report may come from a task once the last destination ended.
    for _ in 0..100 {
        if !reports.lock().expect("lock").is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let reports = reports.lock().expect("lock").clone();
    (head, data, trailers, ended, reports)
}

/// The messages of a body, unframed.
fn messages(data: &[u8]) -> Vec<Vec<u8>> {
    let mut decoder = framing::MessageDecoder::new(usize::MAX);
    decoder.push(Bytes::copy_from_slice(data));
    let mut out = Vec::new();
    while let Ok(Some(m)) = decoder.next_message() {
        out.push(m.payload.to_vec());
    }
    out
}

/// The hostname field-1 metadata of an enriched message says.
fn host(message: &[u8]) -> Option<String> {
    wire::find(message, &"1.1".parse().expect("path")).and_then(|v| v.as_str().map(str::to_owned))
}

fn entry(node: &str) -> Vec<u8> {
    // R { messages: [X { 2: node }] }
    let mut x = Vec::new();
    wire::put_len_field(&mut x, 2, node.as_bytes());
    let mut r = Vec::new();
    wire::put_len_field(&mut r, 1, &x);
    r
}

fn fan(names: &[&str], mode: Mode) -> Route {
    Route::FanOut(FanOut::new(
        names
            .iter()
            .map(|n| Destination::new("nodes").with_endpoint(*n))
            .collect(),
        mode,
    ))
}

fn outcomes(report: &Report) -> Vec<(&str, &Outcome)> {
    report.destinations.iter().map(|(n, o)| (&**n, o)).collect()
}

// === merge ===

#[tokio::test(start_paused = true)]
async fn merge_concatenates_entries_in_route_order_and_a_failure_is_an_entry() {
    let up = Upstreams::new(&[
        ("b", Does::Reply(vec![entry("b")], Code::Ok)),
        ("a", Does::Reply(vec![entry("a")], Code::Ok)),
        ("c", Does::Unreachable),
    ]);
    let (_, data, trailers, _, reports) = run(
        &up,
        fan(&["a", "b", "c"], Mode::Merge),
        framing::encode(b""),
    )
    .await;
    let trailers = trailers.expect("trailers");
    assert_eq!(status::code_of(&trailers), Some(Code::Ok));
    assert_eq!(trailers["fanout-status"], "a=OK, b=OK, c=UNAVAILABLE");
    let merged = messages(&data);
    assert_eq!(merged.len(), 1, "one merged reply");
    let entries = wire::repeated_entries(&merged[0], 1).expect("a list");
    let hosts: Vec<Option<String>> = entries.iter().map(|e| host(e)).collect();
    assert_eq!(
        hosts,
        [Some("a".into()), Some("b".into()), Some("c".into())]
    );
    let r = &reports[0];
    assert!(!r.mirror);
    assert!(matches!(
        outcomes(r)[2],
        (
            "c",
            Outcome::Failed {
                code: Code::Unavailable,
                ..
            }
        )
    ));
}

#[tokio::test(start_paused = true)]
async fn merge_fails_with_the_first_failure_when_every_destination_failed() {
    let up = Upstreams::new(&[
        ("a", Does::TrailersOnly(Code::NotFound)),
        ("b", Does::Unreachable),
    ]);
    let (head, data, _, ended, _) =
        run(&up, fan(&["a", "b"], Mode::Merge), framing::encode(b"")).await;
    assert!(ended && data.is_empty(), "trailers-only");
    assert_eq!(status::code_of(&head), Some(Code::NotFound));
    assert_eq!(head["fanout-status"], "a=NOT_FOUND, b=UNAVAILABLE");
}

#[tokio::test(start_paused = true)]
async fn the_status_trailer_takes_the_name_it_is_given() {
    let named = |l: FanoutLayer| l.status_trailer(http::HeaderName::from_static("x-hop-status"));
    // A trailers-only answer carries it as a header...
    let up = Upstreams::new(&[
        ("a", Does::TrailersOnly(Code::NotFound)),
        ("b", Does::Unreachable),
    ]);
    let (head, _, _, _, _) = run_with(
        named,
        &up,
        fan(&["a", "b"], Mode::Merge),
        framing::encode(b""),
    )
    .await;
    assert_eq!(head["x-hop-status"], "a=NOT_FOUND, b=UNAVAILABLE");
    assert!(!head.contains_key(crate::fanout::DEFAULT_STATUS_TRAILER));
    // ...and a streamed one in its trailers.
    let up = Upstreams::new(&[
        ("a", Does::TrailersOnly(Code::Ok)),
        ("b", Does::Unreachable),
    ]);
    let (_, _, trailers, _, _) = run_with(
        named,
        &up,
        fan(&["a", "b"], Mode::Interleave),
        framing::encode(b""),
    )
    .await;
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["x-hop-status"], "a=OK, b=UNAVAILABLE");
    assert!(!trailers.contains_key(crate::fanout::DEFAULT_STATUS_TRAILER));
}

// === interleave ===

#[tokio::test(start_paused = true)]
async fn interleave_ends_at_once_when_no_destination_answers_and_names_each() {
    let up = Upstreams::new(&[
        ("a", Does::Unreachable),
        ("b", Does::TrailersOnly(Code::Aborted)),
    ]);
    let (head, data, trailers, _, _) = run(
        &up,
        fan(&["a", "b"], Mode::Interleave),
        framing::encode(b""),
    )
    .await;
    // Every destination failed: the call fails with the first failure,
    // after an error message for each (whatever the cause).
    let status_of = trailers.as_ref().unwrap_or(&head);
    assert_eq!(
        status::code_of(status_of),
        Some(Code::Unavailable),
        "{head:?} {trailers:?}"
    );
    let hosts: Vec<Option<String>> = messages(&data).iter().map(|m| host(m)).collect();
    assert_eq!(
        hosts.len(),
        2,
        "one error message per destination: {hosts:?}"
    );
    assert!(hosts.contains(&Some("a".into())) && hosts.contains(&Some("b".into())));
}

#[tokio::test(start_paused = true)]
async fn interleave_with_one_empty_stream_and_one_unreachable_ends_ok_with_its_error() {
    let up = Upstreams::new(&[
        ("a", Does::TrailersOnly(Code::Ok)),
        ("b", Does::Unreachable),
    ]);
    let (_, data, trailers, _, reports) = run(
        &up,
        fan(&["a", "b"], Mode::Interleave),
        framing::encode(b""),
    )
    .await;
    let trailers = trailers.expect("trailers after the error message");
    assert_eq!(
        status::code_of(&trailers),
        Some(Code::Ok),
        "not every destination failed"
    );
    assert_eq!(trailers["fanout-status"], "a=OK, b=UNAVAILABLE");
    let msgs = messages(&data);
    assert_eq!(msgs.len(), 1);
    assert_eq!(host(&msgs[0]).as_deref(), Some("b"));
    assert_eq!(reports.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn interleave_forwards_every_message_enriched_and_an_early_error_too() {
    let up = Upstreams::new(&[
        ("a", Does::Unreachable),
        (
            "b",
            Does::Reply(
                vec![b"\x12\x02b1".to_vec(), b"\x12\x02b2".to_vec()],
                Code::Ok,
            ),
        ),
    ]);
    let (_, data, trailers, _, _) = run(
        &up,
        fan(&["a", "b"], Mode::Interleave),
        framing::encode(b""),
    )
    .await;
    assert_eq!(
        status::code_of(&trailers.expect("trailers")),
        Some(Code::Ok)
    );
    let hosts: Vec<Option<String>> = messages(&data).iter().map(|m| host(m)).collect();
    assert_eq!(
        hosts.iter().filter(|h| h.as_deref() == Some("b")).count(),
        2
    );
    assert_eq!(
        hosts.iter().filter(|h| h.as_deref() == Some("a")).count(),
        1,
        "{hosts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn interleave_waits_for_a_destination_that_is_still_streaming() {
    let up = Upstreams::new(&[("a", Does::Unreachable), ("b", Does::HeadersThenHang)]);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let up2 = up.clone();
    let svc = ServiceBuilder::new()
        .layer(layer(&reports))
        .service(tower::service_fn(move |req| up2.clone().call(req)));
    let mut req = Request::new(Full::new(framing::encode(b"")));
    req.extensions_mut()
        .insert(fan(&["a", "b"], Mode::Interleave));
    let res = svc.oneshot(req).await.expect("headers: b sent some");
    let mut body = res.into_body();
    // a's error message comes; then the call is open as long as b is.
    let first = tokio::time::timeout(Duration::from_secs(60), body.frame())
        .await
        .expect("a's error message, without waiting for b")
        .expect("a frame")
        .expect("data");
    assert_eq!(
        host(&messages(first.data_ref().expect("data"))[0]).as_deref(),
        Some("a")
    );
    let more = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
    assert!(more.is_err(), "b is still open: the call must not end");
}

// === mirror ===

fn mirror(primary: &str, secondaries: &[(&str, OnError)]) -> Route {
    Route::Mirror(Mirror::new(
        Destination::new(primary),
        secondaries
            .iter()
            .map(|(n, e)| Secondary::new(Destination::new(*n)).on_error(*e))
            .collect(),
    ))
}

#[tokio::test(start_paused = true)]
async fn a_mirror_passes_the_primarys_trailers_only_answer_as_it_came() {
    for code in [Code::NotFound, Code::Ok] {
        let up = Upstreams::new(&[
            ("primary", Does::TrailersOnly(code)),
            ("copy", Does::Unreachable),
        ]);
        let (head, data, trailers, ended, reports) = run(
            &up,
            mirror("primary", &[("copy", OnError::Swallow)]),
            framing::encode(b"w"),
        )
        .await;
        assert!(
            ended,
            "{code:?}: the answer ends with its head (END_STREAM on HEADERS)"
        );
        assert!(data.is_empty() && trailers.is_none());
        assert_eq!(status::code_of(&head), Some(code));
        let r = &reports[0];
        assert!(r.mirror);
        assert!(matches!(outcomes(r)[1], ("copy", Outcome::Failed { .. })));
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_secondary_turns_a_trailers_only_ok_into_internal_when_it_must() {
    let up = Upstreams::new(&[
        ("primary", Does::TrailersOnly(Code::Ok)),
        ("copy", Does::TrailersOnly(Code::Unavailable)),
    ]);
    let (head, _, trailers, ended, _) = run(
        &up,
        mirror("primary", &[("copy", OnError::Fail)]),
        framing::encode(b"w"),
    )
    .await;
    assert!(
        !ended && status::code_of(&head).is_none(),
        "the status moved to trailers"
    );
    let trailers = trailers.expect("trailers");
    assert_eq!(
        status::code_of(&trailers),
        Some(Code::Internal),
        "{trailers:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_mirror_answers_the_primary_and_the_tee_gives_every_copy_the_same_bytes() {
    let up = Upstreams::new(&[
        ("primary", Does::Reply(vec![b"answer".to_vec()], Code::Ok)),
        ("copy", Does::Reply(vec![b"ignored".to_vec()], Code::Ok)),
    ]);
    let mut body = framing::encode(b"first").to_vec();
    body.extend_from_slice(&framing::encode(b"second"));
    let (_, data, trailers, _, reports) = run(
        &up,
        mirror("primary", &[("copy", OnError::Swallow)]),
        Bytes::from(body.clone()),
    )
    .await;
    assert_eq!(messages(&data), [b"answer".to_vec()]);
    assert_eq!(
        status::code_of(&trailers.expect("trailers")),
        Some(Code::Ok)
    );
    assert_eq!(up.got("primary"), body);
    assert_eq!(up.got("copy"), body);
    assert_eq!(
        outcomes(&reports[0]),
        [("primary", &Outcome::Ok), ("copy", &Outcome::Ok)]
    );
}

// === a destination's own first message ===

#[tokio::test(start_paused = true)]
async fn each_destination_gets_its_own_first_message_on_every_kind_of_route() {
    let mut body = framing::encode(b"client's first").to_vec();
    body.extend_from_slice(&framing::encode(b"second"));
    let body = Bytes::from(body);
    let with = |m: &'static [u8]| {
        let mut want = framing::encode(m).to_vec();
        want.extend_from_slice(&framing::encode(b"second"));
        want
    };
    let ok = || Does::Reply(vec![], Code::Ok);
    let up = Upstreams::new(&[("one", ok())]);
    let route = Route::One(Destination::new("one").with_first_message(Bytes::from_static(b"mine")));
    run(&up, route, body.clone()).await;
    assert_eq!(up.got("one"), with(b"mine"), "one destination");

    let up = Upstreams::new(&[("a", ok()), ("b", ok())]);
    let route = Route::FanOut(FanOut::new(
        vec![
            Destination::new("nodes")
                .with_endpoint("a")
                .with_first_message(Bytes::from_static(b"for a")),
            Destination::new("nodes").with_endpoint("b"),
        ],
        Mode::Merge,
    ));
    run(&up, route, body.clone()).await;
    assert_eq!(up.got("a"), with(b"for a"), "fan-out: rewritten");
    assert_eq!(up.got("b"), body.to_vec(), "fan-out: the client's own");

    let up = Upstreams::new(&[("p", ok()), ("s", ok())]);
    let route = Route::Mirror(Mirror::new(
        Destination::new("p"),
        vec![Secondary::new(
            Destination::new("s").with_first_message(Bytes::from_static(b"for s")),
        )],
    ));
    run(&up, route, body.clone()).await;
    assert_eq!(
        up.got("p"),
        body.to_vec(),
        "mirror primary: the client's own"
    );
    assert_eq!(up.got("s"), with(b"for s"), "mirror secondary: rewritten");
}
