//! Issue #20.2: routes and endpoints from an xDS control plane (the
//! in-repo management server, built from the same published Envoy
//! types), with real tonic peers through a real sluice.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use sluice::Running;
use sluice_testkit::{
    EchoClient, EchoServer, Req,
    xds::{self, ControlPlane, Health, Seen, Snapshot},
};
use tonic::transport::Channel;

use crate::{
    metrics::{scrape, value},
    support::*,
};

/// A bootstrap file naming `plane`, in the target's temporary directory.
struct Bootstrap(PathBuf);

impl Bootstrap {
    fn new(plane: SocketAddr) -> Self {
        let path = temp_path("xds-bootstrap", "json");
        std::fs::write(
            &path,
            format!(
                r#"{{"xds_servers": [{{"server_uri": "{plane}", "channel_creds": [{{"type": "insecure"}}],
                   "server_features": ["xds_v3"]}}],
                   "node": {{"id": "sluice-test", "cluster": "test", "locality": {{"zone": "z"}}}}}}"#
            ),
        )
        .expect("write the bootstrap");
        Self(path)
    }
}

impl Drop for Bootstrap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A sluice steered by `plane`; `xds` is more of its `[xds]` section.
async fn steered(plane: &ControlPlane, xds: &str, extra: &str) -> (Running, Bootstrap) {
    trace_init();
    let bootstrap = Bootstrap::new(plane.addr);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{}\"\n{extra}\n[xds]\nbootstrap = {:?}\n{xds}",
        closed_addr(),
        bootstrap.0
    );
    let config = sluice::Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let sluice = sluice::run(&config).await.expect("sluice");
    (sluice, bootstrap)
}

/// A client of `sluice` whose calls carry `:authority` `authority`.
fn client_as(sluice: &Running, authority: &str) -> EchoClient<Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", sluice.listen_addr()))
            .expect("uri")
            .origin(format!("http://{authority}").parse().expect("origin"))
            .connect_lazy();
    EchoClient::new(channel)
}

/// Which echo server answered a unary call, or the status.
async fn served_by(client: &mut EchoClient<Channel>) -> Result<String, tonic::Status> {
    let res = within("a unary call", client.unary(Req::default())).await?;
    Ok(res
        .metadata()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .expect("an echo server's answer")
        .to_owned())
}

/// Whether the control plane saw an ACK of version `version` of
/// `type_url`.
fn acked(seen: &[Seen], type_url: &str, version: u64) -> bool {
    seen.iter()
        .any(|s| s.type_url == type_url && s.version == version.to_string() && s.error.is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_routes_to_its_clusters_endpoints_and_follows_each_update() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let plane = ControlPlane::start(Snapshot::single("svc", "c1", &[a.addr])).await;
    let (sluice, _bootstrap) = steered(&plane, "listener = \"svc\"", "").await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        a.addr.to_string()
    );

    // Every type was ACKed at version 1, and the node was announced.
    let seen = plane.wait_for(LIMIT, |s| xds_all_acked(s, 1)).await;
    assert_eq!(seen[0].node.as_deref(), Some("sluice-test"));
    assert_eq!(seen[0].type_url, xds::LISTENER);

    // New endpoints: once the ACK is in, the next call goes there.
    let v = plane.set(Snapshot::single("svc", "c1", &[b.addr]));
    plane.wait_for(LIMIT, |s| acked(s, xds::ENDPOINT, v)).await;
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        b.addr.to_string()
    );

    // A new route table: a second cluster by weight only.
    let v = plane.set(
        Snapshot::new()
            .listener(xds::api_listener("svc", "svc-routes"))
            .route(xds::route_config("svc-routes", "*", &[("c2", 1)]))
            .cluster(xds::eds_cluster("c2"))
            .endpoints(xds::assignment("c2", &[(a.addr, 1, 0, Health::Healthy)])),
    );
    plane.wait_for(LIMIT, |s| acked(s, xds::ENDPOINT, v)).await;
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        a.addr.to_string()
    );

    let scrape = scrape(sluice.admin_addr().expect("admin")).await;
    assert_eq!(value(&scrape, "sluice_xds_connected", &[]), 1.0);
    assert!(value(&scrape, "sluice_xds_updates_total", &[("type", "endpoint")]) >= 3.0);
    assert_eq!(
        value(
            &scrape,
            "sluice_xds_resource_version",
            &[("type", "endpoint"), ("version", &v.to_string())]
        ),
        1.0
    );
    let (status, config) = admin(sluice.admin_addr().expect("admin"), "GET", "/config").await;
    assert_eq!(status, 200);
    assert!(config.contains("cluster c2"), "{config}");
    assert!(config.contains("connected"), "{config}");
}

fn xds_all_acked(seen: &[Seen], version: u64) -> bool {
    [xds::LISTENER, xds::ROUTE, xds::CLUSTER, xds::ENDPOINT]
        .iter()
        .all(|t| acked(seen, t, version))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_authority_names_its_listener_and_an_unknown_one_fails_unavailable() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let snapshot = Snapshot::single("svc-a", "ca", &[a.addr])
        .listener(xds::api_listener("svc-b:8080", "svc-b-routes"))
        .route(xds::route_config("svc-b-routes", "*", &[("cb", 1)]))
        .cluster(xds::eds_cluster("cb"))
        .endpoints(xds::assignment("cb", &[(b.addr, 1, 0, Health::Healthy)]));
    let plane = ControlPlane::start(snapshot).await;
    let (sluice, _bootstrap) = steered(&plane, "resource_timeout = \"300ms\"", "").await;
    assert_eq!(
        served_by(&mut client_as(&sluice, "svc-a"))
            .await
            .expect("routed"),
        a.addr.to_string()
    );
    assert_eq!(
        served_by(&mut client_as(&sluice, "svc-b:8080"))
            .await
            .expect("routed"),
        b.addr.to_string()
    );
    // A Listener the control plane does not have: past the does-not-exist
    // timer (here 300 ms), UNAVAILABLE naming it.
    let status = served_by(&mut client_as(&sluice, "nope"))
        .await
        .expect_err("not routed");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("nope"), "{status:?}");
    let seen = plane.seen();
    assert!(
        seen.iter()
            .any(|s| s.type_url == xds::LISTENER && s.names.contains(&"nope".to_owned())),
        "subscribed by authority: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resource_is_nacked_and_routing_stays_as_it_was() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let plane = ControlPlane::start(Snapshot::single("svc", "c1", &[a.addr])).await;
    let (sluice, _bootstrap) = steered(&plane, "listener = \"svc\"", "").await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        a.addr.to_string()
    );
    plane.wait_for(LIMIT, |s| xds_all_acked(s, 1)).await;

    // A cluster with a policy sluice cannot carry out, and endpoints that
    // moved to `b`: the cluster is NACKed, the endpoints are taken.
    let mut bad = xds::eds_cluster("c1");
    bad.lb_policy = 2; // RING_HASH
    let v = plane.set(Snapshot::single("svc", "c1", &[b.addr]).cluster(bad));
    let seen = plane
        .wait_for(LIMIT, |s| {
            s.iter()
                .any(|x| x.type_url == xds::CLUSTER && x.error.is_some())
        })
        .await;
    let nack = seen
        .iter()
        .find(|x| x.type_url == xds::CLUSTER && x.error.is_some())
        .expect("a NACK");
    assert!(
        nack.error
            .as_deref()
            .is_some_and(|e| e.contains("c1: lb_policy RING_HASH")),
        "{nack:?}"
    );
    assert_eq!(nack.version, "1", "a NACK names the last version accepted");
    plane.wait_for(LIMIT, |s| acked(s, xds::ENDPOINT, v)).await;
    // The last good cluster is kept, with the new endpoints.
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        b.addr.to_string()
    );
    let scrape = scrape(sluice.admin_addr().expect("admin")).await;
    assert_eq!(
        value(&scrape, "sluice_xds_nacks_total", &[("type", "cluster")]),
        1.0
    );
    let (_, config) = admin(sluice.admin_addr().expect("admin"), "GET", "/config").await;
    assert!(config.contains("last NACK: cluster version 2"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_good_configuration_outlives_the_control_plane_and_the_stream_comes_back() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let mut plane = ControlPlane::start(Snapshot::single("svc", "c1", &[a.addr])).await;
    let (sluice, _bootstrap) = steered(&plane, "listener = \"svc\"", "").await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        a.addr.to_string()
    );
    plane.wait_for(LIMIT, |s| xds_all_acked(s, 1)).await;

    plane.stop().await;
    for _ in 0..5 {
        assert_eq!(
            served_by(&mut client).await.expect("still routed"),
            a.addr.to_string()
        );
    }
    let plane = plane.restart().await;
    let v = plane.set(Snapshot::single("svc", "c1", &[b.addr]));
    // Reconnected (after gRPC's 1 s backoff, ±20 %) and resubscribed.
    plane.wait_for(LIMIT, |s| acked(s, xds::ENDPOINT, v)).await;
    assert_eq!(plane.streams(), 2);
    assert_eq!(
        served_by(&mut client).await.expect("routed"),
        b.addr.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_priorities_health_and_the_circuit_breaker_hold() {
    let (a, b, c) = (
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    );
    let down = closed_addr();
    let snapshot = Snapshot::new()
        .listener(xds::api_listener("svc", "r"))
        .route(xds::route_config("r", "*", &[("c1", 1), ("c2", 3)]))
        .cluster(xds::eds_cluster("c1"))
        .cluster(xds::eds_cluster_limited("c2", 1))
        // c1: `a`, and an unhealthy `c` that is never picked.
        .endpoints(xds::assignment(
            "c1",
            &[
                (a.addr, 1, 0, Health::Healthy),
                (c.addr, 1, 0, Health::Unhealthy),
            ],
        ))
        // c2: priority 0 is down, so priority 1 (`b`) serves.
        .endpoints(xds::assignment(
            "c2",
            &[
                (down, 1, 0, Health::Healthy),
                (b.addr, 1, 1, Health::Healthy),
            ],
        ));
    let plane = ControlPlane::start(snapshot).await;
    let (sluice, _bootstrap) = steered(&plane, "listener = \"svc\"", "").await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let mut to_b = 0;
    for i in 0..400 {
        let by = served_by(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert_ne!(by, c.addr.to_string(), "an unhealthy endpoint was picked");
        to_b += usize::from(by == b.addr.to_string());
    }
    assert!(
        (240..360).contains(&to_b),
        "1:3 by weight: {to_b} of 400 to c2"
    );
    assert_eq!(c.probe.counts().started, 0);

    // c2 allows one call in flight: a second fails at once.
    let v = plane.set(
        Snapshot::new()
            .listener(xds::api_listener("svc", "r"))
            .route(xds::route_config("r", "*", &[("c2", 1)]))
            .cluster(xds::eds_cluster_limited("c2", 1))
            .endpoints(xds::assignment("c2", &[(b.addr, 1, 0, Health::Healthy)])),
    );
    plane.wait_for(LIMIT, |s| acked(s, xds::ROUTE, v)).await;
    let slow = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .unary(Req {
                    delay_ms: 2000,
                    ..Req::default()
                })
                .await
        }
    });
    b.probe
        .wait_for(LIMIT, |n| n.started > 0 && n.started > n.completed)
        .await;
    let refused = served_by(&mut client).await.expect_err("over max_requests");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("circuit breaker"), "{refused:?}");
    within("the slow call", slow)
        .await
        .expect("joined")
        .expect("the call in flight is fine");
    assert_eq!(
        served_by(&mut client).await.expect("room again"),
        b.addr.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_max_stream_duration_caps_the_deadline_and_fallback_upstream_takes_the_unrouted() {
    let (a, up) = (EchoServer::start().await, EchoServer::start().await);
    let mut route = xds::route_config("r", "svc", &[("c1", 1)]);
    if let Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(action)) =
        route.virtual_hosts[0].routes[0].action.as_mut()
    {
        action.max_stream_duration = Some(
            envoy_types::pb::envoy::config::route::v3::route_action::MaxStreamDuration {
                max_stream_duration: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 200_000_000,
                }),
                ..Default::default()
            },
        );
    }
    let snapshot = Snapshot::new()
        .listener(xds::api_listener("svc", "r"))
        .route(route)
        .cluster(xds::eds_cluster("c1"))
        .endpoints(xds::assignment("c1", &[(a.addr, 1, 0, Health::Healthy)]));
    let plane = ControlPlane::start(snapshot).await;
    trace_init();
    let bootstrap = Bootstrap::new(plane.addr);
    let mut config = config(up.addr);
    config.xds.bootstrap = Some(bootstrap.0.clone());
    config.xds.fallback = sluice::config::XdsFallback::Upstream;
    config.xds.resource_timeout = Duration::from_millis(300);
    let sluice = sluice::run(&config).await.expect("sluice");

    let mut client = client_as(&sluice, "svc");
    let slow = within(
        "a slow call",
        client.unary(Req {
            delay_ms: 2000,
            ..Req::default()
        }),
    )
    .await
    .expect_err("capped");
    assert_eq!(slow.code(), tonic::Code::DeadlineExceeded, "{slow:?}");
    assert_eq!(
        served_by(&mut client).await.expect("quick"),
        a.addr.to_string()
    );
    // An authority with no Listener: to [upstream].
    assert_eq!(
        served_by(&mut client_as(&sluice, "other"))
            .await
            .expect("fallback"),
        up.addr.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_control_planes_first_answer() {
    let dead = closed_addr();
    let bootstrap = Bootstrap::new(dead);
    trace_init();
    let mut config = config(closed_addr());
    config.xds.bootstrap = Some(bootstrap.0.clone());
    config.xds.listener = Some("svc".to_owned());
    let sluice = sluice::run(&config).await.expect("sluice");
    let (status, body) = admin(sluice.admin_addr().expect("admin"), "GET", "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("xDS"), "{body}");

    let plane = ControlPlane::start_on(dead, Snapshot::single("svc", "c", &[])).await;
    within("ready once the control plane answered", async {
        loop {
            let (status, _) = admin(sluice.admin_addr().expect("admin"), "GET", "/ready").await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(plane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_updates_under_load_fail_no_call() {
    const UPDATES: u64 = 100;
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let snapshots = |i: u64| -> (Snapshot, Vec<SocketAddr>) {
        match i % 4 {
            0 => (Snapshot::single("svc", "c1", &[a.addr]), vec![a.addr]),
            1 => (Snapshot::single("svc", "c1", &[b.addr]), vec![b.addr]),
            2 => (
                Snapshot::new()
                    .listener(xds::api_listener("svc", "r"))
                    .route(xds::route_config("r", "*", &[("c1", 1), ("c2", 1)]))
                    .cluster(xds::eds_cluster("c1"))
                    .cluster(xds::eds_cluster("c2"))
                    .endpoints(xds::assignment("c1", &[(a.addr, 1, 0, Health::Healthy)]))
                    .endpoints(xds::assignment("c2", &[(b.addr, 1, 0, Health::Healthy)])),
                vec![a.addr, b.addr],
            ),
            _ => (
                Snapshot::single("svc", "c3", &[a.addr, b.addr]),
                vec![a.addr, b.addr],
            ),
        }
    };
    let plane = ControlPlane::start(snapshots(0).0).await;
    let (sluice, _bootstrap) = steered(&plane, "listener = \"svc\"", "").await;
    let mut probe = sluice_testkit::client(sluice.listen_addr());
    assert_eq!(
        served_by(&mut probe).await.expect("routed"),
        a.addr.to_string()
    );

    let load = Load::start(sluice.listen_addr(), 4, |client| {
        Box::pin(async move { client.unary(Req::default()).await.map(drop) })
    });
    let mut lags = Vec::new();
    for i in 1..=UPDATES {
        let (snapshot, expected) = snapshots(i);
        let started = std::time::Instant::now();
        let v = plane.set(snapshot);
        // The update is in force once every type it touched was ACKed.
        plane
            .wait_for(LIMIT, |s| {
                acked(s, xds::ENDPOINT, v) && acked(s, xds::ROUTE, v)
            })
            .await;
        lags.push(started.elapsed());
        let by = served_by(&mut probe).await.expect("routed");
        assert!(
            expected.iter().any(|e| e.to_string() == by),
            "update {i}: served by {by}, expected one of {expected:?}"
        );
    }
    let (calls, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {calls} calls failed across {UPDATES} updates: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    lags.sort();
    println!(
        "{calls} calls across {UPDATES} xDS updates, none failed; update in force after median {:?}, max {:?}",
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
}

/// Issue #21: an RDS route's `retry_policy` (gRFC A44) retries what it
/// names, and a CDS cluster's `outlier_detection` (gRFC A50) ejects the
/// endpoint that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xds_retry_policy_and_outlier_detection_hold() {
    use envoy_types::pb::{
        envoy::config::{
            cluster::v3::OutlierDetection,
            route::v3::{RetryPolicy, retry_policy::RetryBackOff},
        },
        google::protobuf::{Duration as PbDuration, UInt32Value},
    };
    use std::sync::atomic::Ordering::Relaxed;

    let (a, b, bad) = (
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    );
    a.faults.fail_every.store(2, Relaxed);
    let mut routes = xds::route_config("r", "*", &[("c1", 1)]);
    routes.virtual_hosts[0].retry_policy = Some(RetryPolicy {
        retry_on: "unavailable,5xx".to_owned(),
        num_retries: Some(UInt32Value { value: 2 }),
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(PbDuration {
                seconds: 0,
                nanos: 5_000_000,
            }),
            max_interval: None,
        }),
        ..RetryPolicy::default()
    });
    let plane = ControlPlane::start(
        Snapshot::new()
            .listener(xds::api_listener("svc", "r"))
            .route(routes)
            .cluster(xds::eds_cluster("c1"))
            .endpoints(xds::assignment("c1", &[(a.addr, 1, 0, Health::Healthy)])),
    )
    .await;
    let (sluice, _bootstrap) = steered(&plane, "listener = \"svc\"", "").await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    for i in 0..10 {
        served_by(&mut client)
            .await
            .unwrap_or_else(|e| panic!("call {i} was not retried: {e:?}"));
    }
    assert_eq!(a.faults.calls.load(Relaxed), 20, "each call failed once");

    // Outlier detection: `bad` fails every call and is ejected.
    a.faults.fail_every.store(0, Relaxed);
    bad.faults.fail_all.store(true, Relaxed);
    let mut cluster = xds::eds_cluster("c2");
    cluster.outlier_detection = Some(OutlierDetection {
        interval: Some(PbDuration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        enforcing_failure_percentage: Some(UInt32Value { value: 100 }),
        failure_percentage_minimum_hosts: Some(UInt32Value { value: 3 }),
        failure_percentage_request_volume: Some(UInt32Value { value: 3 }),
        max_ejection_percent: Some(UInt32Value { value: 50 }),
        ..OutlierDetection::default()
    });
    let v = plane.set(
        Snapshot::new()
            .listener(xds::api_listener("svc", "r"))
            .route(xds::route_config("r", "*", &[("c2", 1)]))
            .cluster(cluster)
            .endpoints(xds::assignment(
                "c2",
                &[
                    (a.addr, 1, 0, Health::Healthy),
                    (b.addr, 1, 0, Health::Healthy),
                    (bad.addr, 1, 0, Health::Healthy),
                ],
            )),
    );
    plane.wait_for(LIMIT, |s| acked(s, xds::CLUSTER, v)).await;
    plane.wait_for(LIMIT, |s| acked(s, xds::ROUTE, v)).await;
    let started = std::time::Instant::now();
    let mut quiet = 0;
    let mut last = bad.faults.calls.load(Relaxed);
    while quiet < 30 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the failing endpoint was never ejected"
        );
        let _ = served_by(&mut client).await;
        let now = bad.faults.calls.load(Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    assert!(last > 0, "the failing endpoint had calls before");
    for _ in 0..20 {
        let by = served_by(&mut client).await.expect("the others answer");
        assert_ne!(by, bad.addr.to_string());
    }
}
