//! Issue #6: config routes pick each call's upstream group from its
//! method, metadata, authority and first message; groups balance with P2C;
//! a loop between two sluice instances ends with ABORTED.

use std::time::Duration;

use std::net::SocketAddr;

use sluice::Running;
use sluice_testkit::{EchoClient, EchoServer, Req};
use tonic::{metadata::MetadataValue, transport::Channel};

use crate::support::*;

fn with_routes(default: std::net::SocketAddr, extra: &str) -> sluice::Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
         [upstream]\naddress = \"{default}\"\n{extra}"
    );
    sluice::Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A sluice whose default upstream is `default`, with `extra` (groups and
/// routes) in its config, and a client of it.
async fn routed(default: SocketAddr, extra: &str) -> (Running, EchoClient<Channel>) {
    trace_init();
    let sluice = sluice::run(&with_routes(default, extra))
        .await
        .expect("sluice");
    let client = sluice_testkit::client(sluice.listen_addr());
    (sluice, client)
}

/// `N` echo servers.
async fn echoes<const N: usize>() -> [EchoServer; N] {
    let mut started = Vec::with_capacity(N);
    for _ in 0..N {
        started.push(EchoServer::start().await);
    }
    let Ok(echoes) = started.try_into() else {
        unreachable!("N servers")
    };
    echoes
}

/// Echo servers `a` (the default upstream) and `b` (group `b`), and a
/// routed sluice whose one route sends what `route` (its TOML keys)
/// matches to `b`; `settings` (TOML tables) come first.
async fn a_and_b(settings: &str, route: &str) -> ([EchoServer; 2], Running, EchoClient<Channel>) {
    let [a, b] = echoes().await;
    let (sluice, client) = routed(
        a.addr,
        &format!(
            "{settings}[upstreams.b]\nendpoints = [\"{}\"]\n[[routes]]\n{route}\nupstream = \"b\"\n",
            b.addr
        ),
    )
    .await;
    ([a, b], sluice, client)
}

/// A unary call (an empty request) that asks for endpoint `host` by
/// `x-dest-host`.
fn to_host(host: &'static str) -> tonic::Request<Req> {
    let mut req = tonic::Request::new(Req::default());
    req.metadata_mut()
        .insert("x-dest-host", MetadataValue::from_static(host));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_matcher_kind_routes_to_its_group() {
    let [a, b, c] = echoes().await;
    let (sluice, mut client) = routed(
        a.addr,
        &format!(
            r#"
[upstreams.b]
endpoints = ["{b}"]
[upstreams.c]
endpoints = ["{c}"]

[[routes]]
name = "no uploads"
method = "/sluice.test.Echo/ClientStream"
refuse = {{ code = "PERMISSION_DENIED", message = "uploads are closed" }}

[[routes]]
method = "/sluice.test.Echo/Server*"
upstream = "b"

[[routes]]
metadata = {{ "x-tenant" = {{ equals = "acme" }} }}
upstream = "c"

[[routes]]
field = {{ path = "8", int = 42 }}
upstream = "b"

[[routes]]
field = {{ path = "1", prefix = "vip" }}
upstream = "c"

[[routes]]
authority = "special.test"
upstream = "c"
"#,
            b = b.addr,
            c = c.addr
        ),
    )
    .await;

    client.unary(Req::default()).await.expect("plain unary");
    assert_eq!(
        a.probe.counts().completed,
        1,
        "no route matched: default group"
    );

    let mut s = client
        .server_stream(Req {
            replies: 1,
            ..Req::default()
        })
        .await
        .expect("ok")
        .into_inner();
    while s.message().await.expect("ok").is_some() {}
    let mut req = tonic::Request::new(Req::default());
    req.metadata_mut()
        .insert("x-tenant", MetadataValue::from_static("acme"));
    client.unary(req).await.expect("tenant");
    client
        .unary(Req {
            seq: 42,
            ..Req::default()
        })
        .await
        .expect("seq 42");
    client
        .unary(Req {
            payload: "vip-123".into(),
            ..Req::default()
        })
        .await
        .expect("vip");
    // The same method with other contents still goes to the default group.
    client
        .unary(Req {
            seq: 41,
            payload: "pleb".into(),
            ..Req::default()
        })
        .await
        .expect("other");

    let mut h2 = raw_client(sluice.listen_addr()).await;
    let mut head = grpc_head("Unary");
    *head.uri_mut() = "http://special.test/sluice.test.Echo/Unary"
        .parse()
        .expect("uri");
    let (response, _body) = send_call(&mut h2, head, &Req::default());
    within("authority route", response).await.expect("answer");

    let status = client
        .client_stream(tokio_stream::iter(vec![Req::default()]))
        .await
        .expect_err("refused by route");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "uploads are closed");

    b.probe.wait_for(LIMIT, |c| c.completed == 2).await; // server stream + seq 42
    c.probe.wait_for(LIMIT, |c| c.completed == 3).await; // tenant + vip + authority
    a.probe.wait_for(LIMIT, |c| c.completed == 2).await; // plain + other
    let total = a.probe.counts().started + b.probe.counts().started + c.probe.counts().started;
    assert_eq!(total, 7, "the refused call reached no upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_calls_can_be_refused_with_unimplemented() {
    let a = EchoServer::start().await;
    let (_sluice, mut client) = routed(
        a.addr,
        "[routing]\nfallback = \"unimplemented\"\n[[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"default\"\n",
    )
    .await;
    client.unary(Req::default()).await.expect("routed");
    let status = client
        .server_stream(Req::default())
        .await
        .expect_err("no route");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(a.probe.counts().started, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_message_streams_proceed_and_the_peek_budget_is_enforced() {
    let ([a, b], _sluice, mut client) = a_and_b(
        "[routing]\npeek_max_bytes = 512\n",
        "field = { path = \"8\", present = true }",
    )
    .await;
    // No message at all: nothing to match, the call still goes through.
    let reply = client
        .client_stream(tokio_stream::iter(Vec::<Req>::new()))
        .await
        .expect("an empty stream is forwarded")
        .into_inner();
    assert_eq!(reply.seq, 0);
    assert_eq!(a.probe.counts().completed, 1);
    // A first message over the budget is refused, not buffered.
    let status = client
        .unary(Req {
            payload: vec![b'x'; 4096].into(),
            ..Req::default()
        })
        .await
        .expect_err("over the peek budget");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    // And the field route works within it.
    client
        .unary(Req {
            seq: 7,
            ..Req::default()
        })
        .await
        .expect("routed on field 8");
    assert_eq!(b.probe.counts().completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_moves_load_away_from_a_ten_times_slower_endpoint() {
    let fast = EchoServer::start_slow(Duration::from_millis(2)).await;
    let slow = EchoServer::start_slow(Duration::from_millis(20)).await;
    let placeholder = EchoServer::start().await;
    let (_sluice, client) = routed(
        placeholder.addr,
        &format!(
            "[upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\n[[routes]]\nupstream = \"pool\"\n",
            fast.addr, slow.addr
        ),
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = client.clone();
        tasks.spawn(async move {
            for _ in 0..40 {
                client.unary(Req::default()).await.expect("ok");
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.expect("task");
    }
    let (f, s) = (fast.probe.counts().completed, slow.probe.counts().completed);
    assert_eq!(f + s, 320);
    assert!(
        f >= 3 * s,
        "fast endpoint got {f} calls, the 10x slower one {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_loop_between_two_sluices_ends_with_aborted() {
    trace_init();
    let (addr_a, addr_b) = (closed_addr(), closed_addr());
    let mut config_a = config(addr_b);
    config_a.server.listen = addr_a;
    let mut config_b = config(addr_a);
    config_b.server.listen = addr_b;
    let _a = sluice::run(&config_a).await.expect("sluice a");
    let _b = sluice::run(&config_b).await.expect("sluice b");
    let mut client = sluice_testkit::client(addr_a);
    let status = within("a looping call", client.unary(Req::default()))
        .await
        .expect_err("a loop cannot succeed");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("routing loop"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_forward_the_budget_less_the_offset_and_routes_can_cap_them() {
    let ([a, b], _sluice, mut client) = a_and_b(
        "[routing]\ndeadline_offset = \"100ms\"\n",
        "metadata = { \"x-client\" = { regex = \"^batch-[0-9]+$\" } }\ntimeout = \"300ms\"",
    )
    .await;

    // The client's 10 s reaches the upstream as 9.9 s.
    let mut req = tonic::Request::new(Req::default());
    req.metadata_mut()
        .insert("grpc-timeout", MetadataValue::from_static("10S"));
    client.unary(req).await.expect("ok");
    let seen = a.probe.last_metadata().expect("metadata");
    let forwarded = sluice_layers::grpc::timeout::parse(
        &http::HeaderValue::from_bytes(seen.get("grpc-timeout").expect("forwarded").as_bytes())
            .expect("value"),
    );
    assert_eq!(forwarded, Some(Duration::from_millis(9900)));

    // A call matched by the capped route, with no deadline of its own, is
    // ended by sluice at the route's 300 ms.
    let mut req = tonic::Request::new(hanging());
    req.metadata_mut()
        .insert("x-client", MetadataValue::from_static("batch-7"));
    let mut stream = within("headers", client.server_stream(req))
        .await
        .expect("headers")
        .into_inner();
    let status = within("the route's deadline", stream.message())
        .await
        .expect_err("capped by the route");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    b.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_evicted_and_reopened_on_demand() {
    trace_init();
    let upstream = EchoServer::start().await;
    let mut config = config(upstream.addr);
    config.upstream.idle_timeout = Duration::from_millis(100);
    let sluice = sluice::run(&config).await.expect("sluice");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    client.unary(Req::default()).await.expect("ok");
    assert_eq!(sluice.stats().upstream_connections, 1);
    eventually("the idle connection is closed", || {
        sluice.stats().upstream_connections == 0
    })
    .await;
    client
        .unary(Req::default())
        .await
        .expect("a new connection on demand");
    assert_eq!(sluice.stats().upstream_connections, 1);
    assert_eq!(upstream.probe.counts().completed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_fall_through_from_dest_host_to_default_route() {
    let [a, b, c] = echoes().await;
    let (_sluice, mut client) = routed(
        c.addr,
        &format!(
            r#"
[upstreams.agents]
endpoints = [
  {{ address = "{a}", ids = ["node-a"] }},
  {{ address = "{b}", ids = ["node-b"], default_route = true }},
  "{c}",
]
strategy = ["dest-host", "default-route", "least-loaded"]

[upstreams.strict]
endpoints = [{{ address = "{a}", ids = ["node-a"] }}]
strategy = ["dest-host"]

[[routes]]
metadata = {{ "x-strict" = {{ present = true }} }}
upstream = "strict"

[[routes]]
upstream = "agents"
"#,
            a = a.addr,
            b = b.addr,
            c = c.addr
        ),
    )
    .await;
    let call = |host: &'static str, strict: bool| {
        let mut req = to_host(host);
        if strict {
            req.metadata_mut()
                .insert("x-strict", MetadataValue::from_static("1"));
        }
        req
    };
    client
        .unary(call("node-a", false))
        .await
        .expect("dest-host a");
    client
        .unary(call("NODE-B", false))
        .await
        .expect("dest-host b, any case");
    assert_eq!(
        (a.probe.counts().completed, b.probe.counts().completed),
        (1, 1)
    );
    // No endpoint is "node-z": dest-host finds nothing, default-route picks b.
    for _ in 0..5 {
        client
            .unary(call("node-z", false))
            .await
            .expect("fall-through");
    }
    assert_eq!(b.probe.counts().completed, 6);
    assert_eq!(c.probe.counts().completed, 0);
    // A chain that finds nothing is UNAVAILABLE, not a hang or a guess.
    let status = client
        .unary(call("node-z", true))
        .await
        .expect_err("nothing matches");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no endpoint"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_tried_once_then_avoided() {
    let live = EchoServer::start().await;
    let dead = closed_addr();
    let (_sluice, mut client) = routed(
        live.addr,
        &format!(
            "[upstreams.pair]\nendpoints = [\"{dead}\", \"{}\"]\n[[routes]]\nupstream = \"pair\"\n",
            live.addr
        ),
    )
    .await;
    for seq in 0..20 {
        let reply = client
            .unary(Req {
                seq,
                ..Req::default()
            })
            .await
            .expect("no call fails");
        assert_eq!(reply.into_inner().seq, seq);
    }
    assert_eq!(live.probe.counts().completed, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_health_check_is_avoided_until_it_recovers() {
    let [sick, well] = echoes().await;
    let (_sluice, mut client) = routed(
        well.addr,
        &format!(
            "[upstreams.pair]\nendpoints = [\"{}\", \"{}\"]\n\
             health_check = {{ interval = \"50ms\", timeout = \"500ms\" }}\n\
             [[routes]]\nupstream = \"pair\"\n",
            sick.addr, well.addr
        ),
    )
    .await;
    sick.health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    // The verdict lands on the next checks; no event says when, so give
    // it a few 50 ms intervals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sick.probe.counts().completed;
    for _ in 0..30 {
        client.unary(Req::default()).await.expect("ok");
    }
    assert_eq!(
        sick.probe.counts().completed,
        before,
        "a NOT_SERVING endpoint got calls"
    );

    // It recovers, and the other one falls ill: calls move back.
    sick.health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    well.health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_well = well.probe.counts().completed;
    for _ in 0..30 {
        client.unary(Req::default()).await.expect("ok");
    }
    assert_eq!(well.probe.counts().completed, before_well);
    assert_eq!(
        sick.probe.counts().completed,
        before + 30,
        "the recovered endpoint takes the calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_sent_goaway_are_avoided_while_others_serve() {
    let mut leaving = RawUpstream::start(Behaviour::AnswerThenGoAway).await;
    // 50 ms slower: on load and latency alone, P2C would choose `leaving`.
    let staying = EchoServer::start_slow(Duration::from_millis(50)).await;
    let (_sluice, mut client) = routed(
        staying.addr,
        &format!(
            "[upstreams.pair]\nendpoints = [{{ address = \"{}\", ids = [\"leaving\"] }}, \
             {{ address = \"{}\", ids = [\"staying\"] }}]\n\
             strategy = [\"dest-host\", \"least-loaded\"]\n[[routes]]\nupstream = \"pair\"\n",
            leaving.addr, staying.addr
        ),
    )
    .await;
    // The slow endpoint's latency is measured...
    client
        .unary(to_host("staying"))
        .await
        .expect("slow but fine");
    // ...and the leaving one answers twice, sending GOAWAY each time.
    client
        .unary(to_host("leaving"))
        .await
        .expect("answered before GOAWAY");
    client
        .unary(to_host("leaving"))
        .await
        .expect("a new connection");
    let mut seen = 0;
    while leaving.heads.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 2);
    // Unpinned calls now prefer the endpoint that stays, slow as it is.
    for _ in 0..10 {
        client.unary(Req::default()).await.expect("ok");
    }
    assert!(
        leaving.heads.try_recv().is_err(),
        "a draining endpoint got an unpinned call"
    );
    assert_eq!(staying.probe.counts().completed, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_names_are_resolved_to_one_endpoint_per_address() {
    let upstream = EchoServer::start().await;
    let port = upstream.addr.port();
    let (sluice, mut client) = routed(
        upstream.addr,
        &format!(
            "[upstreams.named]\nendpoints = [\"localhost:{port}\"]\nresolve_interval = \"50ms\"\n\
             [[routes]]\nupstream = \"named\"\n"
        ),
    )
    .await;
    let resolved = format!("127.0.0.1:{port}");
    eventually("localhost resolves to its addresses", || {
        sluice
            .group_endpoints("named")
            .is_some_and(|e| e.contains(&resolved) && !e.iter().any(|a| a.starts_with("localhost")))
    })
    .await;
    // Whatever else localhost resolves to (::1, which nothing serves here),
    // calls reach the server.
    for _ in 0..10 {
        client.unary(Req::default()).await.expect("ok");
    }
    assert_eq!(upstream.probe.counts().completed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_random_strategy_spreads_calls_regardless_of_latency() {
    // P2C would send almost everything to the fast one; random does not.
    let fast = EchoServer::start().await;
    let slow = EchoServer::start_slow(Duration::from_millis(10)).await;
    let (_sluice, mut client) = routed(
        fast.addr,
        &format!(
            "[upstreams.pair]\nendpoints = [\"{}\", \"{}\"]\nstrategy = [\"random\"]\n[[routes]]\nupstream = \"pair\"\n",
            fast.addr, slow.addr
        ),
    )
    .await;
    for _ in 0..100 {
        client.unary(Req::default()).await.expect("ok");
    }
    let (f, s) = (fast.probe.counts().completed, slow.probe.counts().completed);
    assert_eq!(f + s, 100);
    assert!(f >= 25 && s >= 25, "random split {f}/{s}");
}

/// Issue #10 §5: a duplicated routing field routes as the upstream's
/// parser reads it (the last value), not as the first occurrence says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_routing_field_routes_on_the_value_the_upstream_reads() {
    let ([a, b], sluice, _) = a_and_b("", "field = { path = \"8\", int = 42 }").await;
    let mut send = raw_client(sluice.listen_addr()).await;
    // seq = 42, then seq = 1: one message, which the upstream reads as 1.
    for (first, last, to_b) in [(42, 1, false), (1, 42, true)] {
        let mut msg = Vec::new();
        prost::Message::encode(
            &Req {
                seq: first,
                ..Req::default()
            },
            &mut msg,
        )
        .expect("encode");
        prost::Message::encode(
            &Req {
                seq: last,
                ..Req::default()
            },
            &mut msg,
        )
        .expect("encode");
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(msg.len()).expect("small").to_be_bytes());
        framed.extend_from_slice(&msg);
        let (res, mut body) = send.send_request(grpc_head("Unary"), false).expect("send");
        body.send_data(framed.into(), true).expect("data");
        let res = within("the answer", res).await.expect("response");
        let mut recv = res.into_body();
        while let Some(chunk) = within("the body", recv.data()).await {
            chunk.expect("data");
        }
        // The answer is over, so the upstream that served it counted it.
        let (got_a, got_b) = (a.probe.counts().completed, b.probe.counts().completed);
        let served_by_b = if to_b {
            got_b == 1
        } else {
            got_a == 1 && got_b == 0
        };
        assert!(served_by_b, "seq {first} then {last}: a {got_a}, b {got_b}");
    }
    assert_eq!(
        b.probe.counts().completed,
        1,
        "only the call the parser reads as 42"
    );
    assert_eq!(a.probe.counts().completed, 1);
}

/// Issue #10 §5: a route on message contents makes only the calls it could
/// still match wait for their first message, and that wait is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_calls_a_field_route_could_match_are_peeked_and_the_wait_is_bounded() {
    let ([a, b], sluice, mut client) = a_and_b(
        "",
        "method = \"/sluice.test.Echo/Unary\"\nfield = { path = \"8\", int = 42 }",
    )
    .await;
    // A bidi call whose client waits for the server before sending: no
    // field route can match its method, so it is not read ahead and its
    // response headers come.
    let (tx, rx) = tokio::sync::mpsc::channel::<Req>(1);
    let mut replies = within(
        "bidi response headers",
        client.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("headers without a first message")
    .into_inner();
    tx.send(Req {
        seq: 3,
        ..Req::default()
    })
    .await
    .expect("send");
    let reply = within("a reply", replies.message())
        .await
        .expect("ok")
        .expect("one");
    assert_eq!(reply.seq, 3);
    drop(tx);

    // A unary call the field route could match, sending nothing within its
    // deadline: DEADLINE_EXCEEDED from the peek, not a hang.
    let mut send = raw_client(sluice.listen_addr()).await;
    let mut head = grpc_head("Unary");
    head.headers_mut()
        .insert("grpc-timeout", "200m".parse().expect("value"));
    let (res, _body) = send.send_request(head, false).expect("send");
    let res = within("the peek's answer", res).await.expect("response");
    assert_eq!(
        res.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "{res:?}"
    );
    assert_eq!(
        a.probe.counts().started + b.probe.counts().started,
        1,
        "only the bidi call went on"
    );
}

/// Issue #10 §5: a refuse route on a field can say that a compressed first
/// message matches, so compressing cannot bypass it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_refusal_can_refuse_compressed_messages_too() {
    let a = EchoServer::start().await;
    let (sluice, client) = routed(
        a.addr,
        "[[routes]]\nfield = { path = \"8\", int = 13, compressed = \"match\" }\n\
         refuse = { code = \"PERMISSION_DENIED\", message = \"13 is unlucky\" }\n",
    )
    .await;
    let mut client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let err = within(
        "a compressed call",
        client.unary(Req {
            seq: 13,
            ..Req::default()
        }),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut plain = sluice_testkit::client(sluice.listen_addr());
    plain
        .unary(Req {
            seq: 12,
            ..Req::default()
        })
        .await
        .expect("not 13");
}

/// A group's `max_requests` (gRFC A32): with one call in flight to the
/// group, the next fails UNAVAILABLE at once and never reaches an
/// endpoint; calls to other groups are not counted; once the call ends,
/// calls pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_max_requests_refuses_the_call_over_it_at_once() {
    let [a, b] = echoes().await;
    let (_sluice, mut client) = routed(
        a.addr,
        &format!(
            "[upstreams.b]\nendpoints = [\"{}\"]\nmax_requests = 1\n\
             [[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"b\"\n",
            b.addr
        ),
    )
    .await;
    let slow = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .unary(Req {
                    delay_ms: 1000,
                    ..Req::default()
                })
                .await
        }
    });
    b.probe
        .wait_for(LIMIT, |n| n.started > 0 && n.started > n.completed)
        .await;
    let started = std::time::Instant::now();
    let refused = within("the call over max_requests", client.unary(Req::default()))
        .await
        .expect_err("over max_requests");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("circuit breaker") && refused.message().contains("max_requests"),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once, not queued: {:?}",
        started.elapsed()
    );
    assert_eq!(
        b.probe.counts().started,
        1,
        "the refused call never reached b"
    );
    // Another group's calls are not counted against b's limit.
    let replies = within(
        "a call to the default group",
        client.server_stream(Req {
            replies: 1,
            ..Req::default()
        }),
    )
    .await
    .expect("not limited");
    drop(replies);
    within("the slow call", slow)
        .await
        .expect("joined")
        .expect("the call in flight is fine");
    within("a call once the slot is free", client.unary(Req::default()))
        .await
        .expect("room again");
    assert_eq!(b.probe.counts().started, 2);
}
