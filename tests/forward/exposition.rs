//! Issue #18.3: `/metrics` answers the format the scraper asks for, read
//! by real parsers: OpenMetrics when the Accept header asks for it, the
//! Prometheus text format 0.0.4 otherwise (whose parser typed every
//! OpenMetrics counter `unknown`). Counts since the start are counters;
//! the process and build families are there; upstream families are by
//! group; tunnel families appear only where a tunnel role is configured.

use std::net::SocketAddr;

use sluice_testkit::Req;

use crate::support::*;

/// A scrape with `accept`: its content type and body.
async fn scrape_as(admin_addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin_addr)
        .await
        .expect("connect admin");
    let accept = accept
        .map(|a| format!("accept: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET /metrics HTTP/1.1\r\nhost: admin\r\n{accept}connection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    within("the scrape", tcp.read_to_end(&mut raw))
        .await
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .expect("a content type")
        .to_owned();
    (content_type, body.to_owned())
}

/// The type prometheus-parse gave each sample named `name`.
fn kinds(text: &str, name: &str) -> Vec<&'static str> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("a Prometheus text exposition");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(_) => "counter",
            prometheus_parse::Value::Gauge(_) => "gauge",
            prometheus_parse::Value::Untyped(_) => "untyped",
            _ => "other",
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_text_004_or_openmetrics_as_asked_and_both_parse() {
    let mut p = proxied().await;
    let admin_addr = p.sluice.admin_addr().expect("admin");
    p.client.unary(Req::default()).await.expect("a call");

    let (content_type, text) = scrape_as(admin_addr, None).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(
        !text.contains("# EOF"),
        "no OpenMetrics terminator in text 0.0.4"
    );
    openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("not text 0.0.4: {e:?}\n{text}"));
    // A counter is typed so by a Prometheus parser, not `unknown`.
    assert_eq!(kinds(&text, "sluice_calls_total"), ["counter"], "{text}");
    assert_eq!(
        kinds(&text, "sluice_refusals_total")
            .iter()
            .filter(|k| **k != "counter")
            .count(),
        0
    );
    assert_eq!(kinds(&text, "process_cpu_seconds_total"), ["counter"]);
    for gauge in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "sluice_build_info",
    ] {
        assert_eq!(kinds(&text, gauge), ["gauge"], "{gauge}");
    }
    assert!(
        text.contains(&format!(
            "sluice_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // Upstream families by group.
    assert!(
        text.contains(
            "sluice_upstream_calls_total{route=\"\",group=\"default\",grpc_code=\"OK\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("sluice_upstream_endpoints{group=\"default\",state=\"usable\"} 1"),
        "{text}"
    );
    // No tunnel role, no tunnel family.
    assert!(
        !text.contains("sluice_agent_") && !text.contains("sluice_hub_"),
        "{text}"
    );

    let (content_type, om) = scrape_as(
        admin_addr,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    openmetrics_parser::openmetrics::parse_openmetrics(&om)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{om}"));
    assert!(om.contains("# TYPE sluice_build info"), "{om}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_families_appear_on_a_tunnel_role_and_failed_dials_count_up() {
    // An agent whose hub is a dead port: its dials fail and are counted.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (_upstream, agent) = setup(|c| {
        let text = format!(
            "[tunnel.agent]\nhubs = [\"{dead}\"]\nid = \"a\"\nbackoff_min = \"10ms\"\nbackoff_max = \"20ms\"\n"
        );
        c.tunnel = sluice::Config::from_toml_str(&text).expect("agent").tunnel;
    })
    .await;
    let admin_addr = agent.admin_addr().expect("admin");
    eventually("a few failed dials", || {
        agent.agent_tunnels().is_some_and(|t| t.failed_dials >= 2)
    })
    .await;
    let (_, text) = scrape_as(admin_addr, None).await;
    assert_eq!(
        kinds(&text, "sluice_agent_dials_failed_total"),
        ["counter"],
        "{text}"
    );
    assert_eq!(kinds(&text, "sluice_agent_hubs_claimed"), ["gauge"]);
    assert!(
        !text.contains("sluice_hub_agents"),
        "an agent is no hub: {text}"
    );
    let (_, om) = scrape_as(admin_addr, Some("application/openmetrics-text")).await;
    openmetrics_parser::openmetrics::parse_openmetrics(&om)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{om}"));
}
