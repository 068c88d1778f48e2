//! Issue #5: `/metrics` parses as Prometheus text and counts known traffic
//! exactly, by service, method and status.

use sluice_testkit::Req;

use crate::support::*;

/// A scrape, parsed by a Prometheus text parser.
pub(crate) async fn scrape(admin_addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = admin(admin_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition")
}

pub(crate) fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain sample"),
        })
        .sum()
}

const SVC: (&str, &str) = ("service", "sluice.test.Echo");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_known_traffic_by_method_and_status() {
    let mut p = proxied().await;
    let admin_addr = p.sluice.admin_addr().expect("admin");
    for _ in 0..3 {
        p.client.unary(Req::default()).await.expect("ok");
    }
    for _ in 0..2 {
        p.client
            .unary(Req {
                fail_code: 5,
                ..Req::default()
            })
            .await
            .expect_err("not found");
    }
    let mut stream = p
        .client
        .server_stream(Req {
            replies: 5,
            ..Req::default()
        })
        .await
        .expect("ok")
        .into_inner();
    while stream.message().await.expect("ok").is_some() {}
    let reqs: Vec<Req> = (0..4).map(|_| Req::default()).collect();
    p.client
        .client_stream(tokio_stream::iter(reqs))
        .await
        .expect("ok");

    let unary = ("method", "Unary");
    let mut s = scrape(admin_addr).await;
    // Calls are recorded when their response body is done with; give the
    // last one a moment to be dropped by the server.
    for _ in 0..100 {
        if value(&s, "sluice_calls_total", &[SVC, ("method", "ClientStream")]) == 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        s = scrape(admin_addr).await;
    }
    assert_eq!(
        value(&s, "sluice_calls_total", &[SVC, unary, ("grpc_code", "OK")]),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "sluice_calls_total",
            &[SVC, unary, ("grpc_code", "NOT_FOUND")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &s,
            "sluice_calls_total",
            &[SVC, ("method", "ServerStream"), ("grpc_code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "sluice_calls_total",
            &[SVC, ("method", "ClientStream"), ("grpc_code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "sluice_request_messages_total", &[SVC, unary]),
        5.0
    );
    assert_eq!(
        value(&s, "sluice_response_messages_total", &[SVC, unary]),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "sluice_response_messages_total",
            &[SVC, ("method", "ServerStream")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &s,
            "sluice_request_messages_total",
            &[SVC, ("method", "ClientStream")]
        ),
        4.0
    );
    assert!(value(&s, "sluice_request_bytes_total", &[SVC, unary]) >= 5.0 * 5.0);
    assert_eq!(
        value(&s, "sluice_call_duration_seconds_count", &[SVC, unary]),
        5.0
    );
    assert_eq!(value(&s, "sluice_calls_in_flight", &[]), 0.0);
    assert_eq!(value(&s, "sluice_downstream_connections", &[]), 1.0);
    assert_eq!(value(&s, "sluice_upstream_connections", &[]), 1.0);
    assert_eq!(value(&s, "sluice_drain_state", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_by_reason() {
    trace_init();
    let sluice = sluice::run(&config(closed_addr())).await.expect("sluice");
    let admin_addr = sluice.admin_addr().expect("admin");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    for _ in 0..3 {
        client.unary(Req::default()).await.expect_err("no upstream");
    }
    let s = scrape(admin_addr).await;
    assert_eq!(
        value(
            &s,
            "sluice_refusals_total",
            &[("reason", "upstream_unavailable")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "sluice_calls_total",
            &[SVC, ("method", "Unary"), ("grpc_code", "UNAVAILABLE")]
        ),
        3.0
    );
}

/// Every answer sluice gives itself is counted under its own reason: the
/// server's (415), a route's refusal, the peek budget, deadlines before and
/// during the response, a routing loop, a group with no matching endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_counted_under_its_own_reason() {
    trace_init();
    let upstream = sluice_testkit::EchoServer::start().await;
    // An upstream that never answers nor enforces deadlines (tonic's server
    // answers CANCELLED at the deadline, which would race sluice's).
    let hang = RawUpstream::start(Behaviour::Hang).await;
    let free = closed_addr();
    let text = format!(
        "[server]\nlisten = \"{free}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{up}\"\n[routing]\npeek_max_bytes = 256\n\
         [upstreams.strict]\nendpoints = [{{ address = \"{up}\", ids = [\"node-a\"] }}]\n\
         strategy = [\"dest-host\"]\n\
         [upstreams.myself]\nendpoints = [\"{free}\"]\n\
         [upstreams.hang]\nendpoints = [\"{hang}\"]\n\
         [[routes]]\nmetadata = {{ \"x-hang\" = {{ present = true }} }}\nupstream = \"hang\"\n\
         [[routes]]\nmethod = \"/sluice.test.Echo/ClientStream\"\n\
         refuse = {{ code = \"PERMISSION_DENIED\", message = \"no uploads\" }}\n\
         [[routes]]\nmetadata = {{ \"x-strict\" = {{ present = true }} }}\nupstream = \"strict\"\n\
         [[routes]]\nmetadata = {{ \"x-loop\" = {{ present = true }} }}\nupstream = \"myself\"\n\
         [[routes]]\nfield = {{ path = \"8\", present = true }}\nupstream = \"default\"\n",
        up = upstream.addr,
        hang = hang.addr,
    );
    let config = sluice::Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let sluice = sluice::run(&config).await.expect("sluice");
    let admin_addr = sluice.admin_addr().expect("admin");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).expect_err("refused").code();
    let with = |key: &'static str, req: Req| {
        let mut req = tonic::Request::new(req);
        req.metadata_mut()
            .insert(key, tonic::metadata::MetadataValue::from_static("x"));
        req
    };

    let denied = client
        .client_stream(tokio_stream::iter(vec![Req::default()]))
        .await;
    assert_eq!(code(denied), tonic::Code::PermissionDenied);
    let big = Req {
        payload: vec![b'x'; 4096].into(),
        ..Req::default()
    };
    assert_eq!(
        code(client.unary(big).await),
        tonic::Code::ResourceExhausted
    );
    // The deadlines go in a raw request: tonic's client enforces the
    // deadline too and would race sluice's.
    let mut h2 = raw_client(sluice.listen_addr()).await;
    let timed = |method: &str, hang: bool| {
        let mut head = grpc_head(method);
        head.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("50m"));
        if hang {
            head.headers_mut()
                .insert("x-hang", http::HeaderValue::from_static("1"));
        }
        head
    };
    let (res, _body) = send_call(&mut h2, timed("Unary", true), &Req::default());
    let res = within("deadline before headers", res)
        .await
        .expect("answer");
    assert_eq!(res.headers()["grpc-status"], "4");
    let (res, mut body) = h2
        .send_request(timed("ServerStream", false), false)
        .expect("send");
    let hang = hanging();
    body.send_data(grpc_frame(&hang), true).expect("send");
    let mut recv = within("headers", res).await.expect("headers").into_body();
    while within("data", recv.data()).await.is_some() {}
    let trailers = within("trailers", recv.trailers())
        .await
        .expect("trailers")
        .expect("some");
    assert_eq!(trailers["grpc-status"], "4");
    let mut nowhere = with("x-strict", Req::default());
    nowhere.metadata_mut().insert(
        "x-dest-host",
        tonic::metadata::MetadataValue::from_static("node-z"),
    );
    assert_eq!(code(client.unary(nowhere).await), tonic::Code::Unavailable);
    let looping = with("x-loop", Req::default());
    assert_eq!(code(client.unary(looping).await), tonic::Code::Aborted);
    // Not gRPC at all: the server's own 415.
    let plain = http::Request::post(format!("http://{}/", sluice.listen_addr()))
        .header("content-type", "text/plain")
        .body(())
        .expect("request");
    let (res, _) = h2.send_request(plain, true).expect("send");
    assert_eq!(within("415", res).await.expect("answer").status(), 415);

    let s = scrape(admin_addr).await;
    for (reason, n) in [
        ("route", 1.0),
        ("peek_budget", 1.0),
        ("deadline", 2.0),
        ("no_endpoint", 1.0),
        ("routing_loop", 1.0),
        ("not_grpc", 1.0),
        ("upstream_unavailable", 0.0),
        ("internal", 0.0),
    ] {
        assert_eq!(
            value(&s, "sluice_refusals_total", &[("reason", reason)]),
            n,
            "refusals_total{{reason={reason:?}}}"
        );
    }
    assert_eq!(
        upstream.probe.counts().started,
        1,
        "only the streaming deadline call went upstream"
    );
}
