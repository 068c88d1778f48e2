//! Issue #5: `/metrics` parses as Prometheus text and counts known traffic
//! exactly, by service, method and status.

use sluice_testkit::Req;

use crate::support::*;

/// A scrape, parsed by a Prometheus text parser.
async fn scrape(admin_addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = admin(admin_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
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
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let sluice = sluice::run(&config(closed)).await.expect("sluice");
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
