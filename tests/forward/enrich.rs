//! Issue #10 §4: `[enrich]` strips spoofable keys before routing and adds
//! this hop's metadata, through a real sluice to a real echo server.

use sluice_testkit::Req;
use tonic::Request;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_keys_are_stripped_before_routing_and_this_hops_are_added() {
    let (upstream, sluice) = setup(|config| {
        let extra = sluice::Config::from_toml_str(
            r#"
[enrich]
strip_prefixes = ["x-sluice-"]
strip = ["x-role"]
set = { "x-env" = "prod" }
append = { "x-hop" = "sidecar" }
forwarded = true
x_forwarded_for = true
request_id = true
[[routes]]
name = "a spoofed identity would be refused"
metadata = { "x-sluice-client-id" = { present = true } }
refuse = { code = "PERMISSION_DENIED", message = "spoofed" }
"#,
        )
        .expect("enrich config");
        config.enrich = extra.enrich;
        config.routes = extra.routes;
    })
    .await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let mut req = Request::new(Req::default());
    let md = req.metadata_mut();
    md.insert(
        "x-sluice-client-id",
        "spiffe://evil".parse().expect("ascii"),
    );
    md.insert("x-role", "admin".parse().expect("ascii"));
    md.insert("x-hop", "client".parse().expect("ascii"));
    md.insert("x-forwarded-for", "10.0.0.1".parse().expect("ascii"));
    within("an enriched call", client.unary(req))
        .await
        .expect("not refused: the spoofed key was stripped before routing");
    let seen = upstream.probe.last_metadata().expect("the upstream saw it");
    let get = |k: &str| seen.get(k).map(|v| v.to_str().expect("ascii").to_owned());
    assert_eq!(get("x-sluice-client-id"), None);
    assert_eq!(get("x-role"), None);
    assert_eq!(get("x-env").as_deref(), Some("prod"));
    let hops: Vec<&str> = seen
        .get_all("x-hop")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    assert_eq!(hops, ["client", "sidecar"]);
    assert_eq!(
        get("x-forwarded-for").as_deref(),
        Some("10.0.0.1, 127.0.0.1")
    );
    let forwarded = get("forwarded").expect("forwarded");
    // RFC 7239: `for=` then a quoted string, as the ':' of the port is not
    // a token character.
    let node = forwarded
        .strip_prefix("for=\"127.0.0.1:")
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a quoted node: {forwarded}"));
    assert!(node.parse::<u16>().is_ok(), "{forwarded}");
    let id = get("x-request-id").expect("a generated request id");
    assert!(id.len() > 16, "{id}");

    // A request id the client sent is kept; each generated one is new.
    let mut req = Request::new(Req::default());
    req.metadata_mut()
        .insert("x-request-id", "mine".parse().expect("ascii"));
    within("a call with an id", client.unary(req))
        .await
        .expect("ok");
    let seen = upstream.probe.last_metadata().expect("seen");
    assert_eq!(
        seen.get("x-request-id").map(|v| v.to_str().ok()),
        Some(Some("mine"))
    );
    within("a call without", client.unary(Req::default()))
        .await
        .expect("ok");
    let again = upstream.probe.last_metadata().expect("seen");
    let again = again
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("id");
    assert_ne!(again, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enrich_the_head_passes_untouched() {
    let (upstream, sluice) = setup(|_| {}).await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let mut req = Request::new(Req::default());
    req.metadata_mut()
        .insert("x-sluice-client-id", "kept".parse().expect("ascii"));
    within("a call", client.unary(req)).await.expect("ok");
    let seen = upstream.probe.last_metadata().expect("seen");
    assert_eq!(
        seen.get("x-sluice-client-id").map(|v| v.to_str().ok()),
        Some(Some("kept"))
    );
    for k in ["forwarded", "x-forwarded-for", "x-request-id"] {
        assert!(seen.get(k).is_none(), "{k} added without [enrich]");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_edits_the_metadata_of_the_calls_it_forwards() {
    let (upstream, sluice) = setup(|config| {
        let extra = sluice::Config::from_toml_str(
            r#"
[[routes]]
method = "/sluice.test.Echo/Unary"
upstream = "default"
enrich = { set = { "x-tier" = "gold" }, remove = ["x-debug"], append = { "x-hop" = "route" } }
"#,
        )
        .expect("route enrich config");
        config.routes = extra.routes;
    })
    .await;
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let mut req = Request::new(Req::default());
    req.metadata_mut()
        .insert("x-debug", "1".parse().expect("ascii"));
    within("a routed call", client.unary(req))
        .await
        .expect("ok");
    let seen = upstream.probe.last_metadata().expect("seen");
    assert_eq!(
        seen.get("x-tier").map(|v| v.to_str().ok()),
        Some(Some("gold"))
    );
    assert!(seen.get("x-debug").is_none());
    assert_eq!(
        seen.get("x-hop").map(|v| v.to_str().ok()),
        Some(Some("route"))
    );
    // A call the route does not match is left alone.
    let mut req = Request::new(Req {
        replies: 1,
        ..Req::default()
    });
    req.metadata_mut()
        .insert("x-debug", "1".parse().expect("ascii"));
    let mut s = within("a stream", client.server_stream(req))
        .await
        .expect("ok")
        .into_inner();
    while within("a reply", s.message()).await.expect("ok").is_some() {}
    let seen = upstream.probe.last_metadata().expect("seen");
    assert!(seen.get("x-tier").is_none());
    assert!(seen.get("x-debug").is_some());
}

#[test]
fn a_route_enrich_takes_only_edits() {
    let err = sluice::Config::from_toml_str(
        "[[routes]]\nupstream = \"default\"\nenrich = { forwarded = true }\n",
    )
    .expect_err("forwarded is global");
    assert!(err.to_string().contains("routes[0].enrich"), "{err}");
}
