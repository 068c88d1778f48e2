//! Issue #10: fan-out (merge and interleave) and mirror, through a real
//! sluice to real tonic nodes in the Talos layout.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use sluice::{Config, Running};
use sluice_testkit::{
    NodeServer,
    npb::{Chunk, Log, LogsRequest, Metadata, VersionRequest, nodes_client::NodesClient},
};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Streaming, transport::Channel};

use crate::support::*;

/// A sluice on free ports (admin too) whose default upstream is `default`,
/// with `rest` (groups, `[fanout]`, routes) after that.
fn sluice_config(default: SocketAddr, rest: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{default}\"\n{rest}"
    );
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Group `nodes` of the named endpoints, a keyed fan-out route for the
/// Nodes service (`nodes` metadata), `extra` TOML appended.
fn config(nodes: &[(&str, SocketAddr)], extra: &str) -> Config {
    let endpoints: Vec<String> = nodes
        .iter()
        .map(|(name, addr)| format!("{{ address = \"{addr}\", ids = [\"{name}\"] }}"))
        .collect();
    let text = format!(
        r#"
[upstreams.nodes]
endpoints = [{endpoints}]
[fanout]
streaming_methods = ["*/Logs"]
{extra}
[[routes]]
name = "nodes"
method = "/sluice.test.nodes.Nodes/*"
fanout = {{ group = "nodes", key = "nodes" }}
"#,
        endpoints = endpoints.join(", "),
    );
    sluice_config(nodes[0].1, &text)
}

async fn start(config: &Config) -> (Running, NodesClient<Channel>) {
    trace_init();
    let sluice = sluice::run(config).await.expect("sluice");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", sluice.listen_addr()))
            .expect("uri")
            .connect_lazy();
    (sluice, NodesClient::new(channel))
}

/// A node server for each of `names`, a sluice fanning out over them by
/// the `nodes` key, and a client of that sluice.
async fn fanout_over(names: &[&str]) -> (Vec<NodeServer>, Running, NodesClient<Channel>) {
    let nodes: Vec<NodeServer> = names.iter().map(|n| NodeServer::start(n)).collect();
    let named: Vec<(&str, SocketAddr)> = names
        .iter()
        .copied()
        .zip(nodes.iter().map(|n| n.addr))
        .collect();
    let (sluice, client) = start(&config(&named, "")).await;
    (nodes, sluice, client)
}

/// `lines` log lines of `line_size` bytes, `delay_ms` apart.
fn lines_of(lines: u32, line_size: u32, delay_ms: u64) -> LogsRequest {
    LogsRequest {
        lines,
        line_size,
        delay_ms,
        ..Default::default()
    }
}

/// Opens a Logs stream to `nodes` (the key's value) and waits for its
/// headers.
async fn logs(client: &mut NodesClient<Channel>, nodes: &str, req: LogsRequest) -> Streaming<Log> {
    within("the stream's headers", client.logs(to(nodes, req)))
        .await
        .expect("headers")
        .into_inner()
}

fn to<M>(nodes: &str, msg: M) -> Request<M> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("nodes", nodes.parse().expect("ascii"));
    req
}

fn hostname(m: &Option<Metadata>) -> &str {
    m.as_ref().map_or("", |m| m.hostname.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_replies_carry_each_node_and_an_error_entry_for_the_one_down() {
    let a = NodeServer::start("a");
    let b = NodeServer::start("b");
    let cfg = config(&[("a", a.addr), ("b", b.addr), ("c", closed_addr())], "");
    let (sluice, mut client) = start(&cfg).await;

    let res = within(
        "a merged call",
        client.version(to("a,b,c", VersionRequest::default())),
    )
    .await
    .expect("OK: not every node failed");
    let summary = res
        .metadata()
        .get("sluice-fanout-status")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let entries = res.into_inner().messages;
    assert_eq!(entries.len(), 3, "{entries:?}");
    // The route's order: a, b, c.
    assert_eq!(
        (entries[0].node.as_str(), hostname(&entries[0].metadata)),
        ("a", "a")
    );
    assert_eq!(
        (entries[1].node.as_str(), hostname(&entries[1].metadata)),
        ("b", "b")
    );
    let down = &entries[2];
    assert_eq!(down.node, "", "an error entry has only metadata");
    let meta = down.metadata.as_ref().expect("metadata");
    assert_eq!(meta.hostname, "c");
    assert!(!meta.error.is_empty());
    assert_eq!(
        meta.status.as_ref().map(|s| s.code),
        Some(Code::Unavailable as i32)
    );
    // The trailer names each node's status (tonic merges a unary call's
    // trailers into its metadata).
    assert_eq!(summary.as_deref(), Some("a=OK, b=OK, c=UNAVAILABLE"));
    // The routing key is stripped before forwarding.
    let seen = a.probe.last_metadata().expect("a saw the call");
    assert!(
        seen.get("nodes").is_none(),
        "the routing key reached the node"
    );
    drop(sluice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_node_is_an_entry_and_all_failing_is_the_calls_status() {
    let (_nodes, _sluice, mut client) = fanout_over(&["a", "b"]).await;
    // Both nodes fail as asked: the call fails with their code.
    let err = within(
        "an all-failing call",
        client.version(to(
            "a,b",
            VersionRequest {
                fail_code: Code::NotFound as i32,
                delay_ms: 0,
            },
        )),
    )
    .await
    .expect_err("every destination failed");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("every destination failed"),
        "{err:?}"
    );
    // Repeated key values are destinations too, once each.
    let mut req = to("a", VersionRequest::default());
    req.metadata_mut()
        .append("nodes", "b, a".parse().expect("ascii"));
    let entries = within("repeated keys", client.version(req))
        .await
        .expect("OK")
        .into_inner()
        .messages;
    let names: Vec<&str> = entries.iter().map(|e| e.node.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_fanout_delivers_every_line_of_every_node_enriched() {
    let (_nodes, _sluice, mut client) = fanout_over(&["a", "b", "c"]).await;
    let req = lines_of(20, 10, 0);
    let mut stream = logs(&mut client, "a,b,c", req).await;
    let mut per_node: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    while let Some(line) = within("the next line", stream.next()).await {
        let line = line.expect("a line");
        assert_eq!(
            hostname(&line.metadata),
            line.node,
            "enriched with its node"
        );
        per_node
            .entry(line.node.clone())
            .or_default()
            .push(line.seq);
    }
    assert_eq!(per_node.len(), 3);
    for (node, seqs) in per_node {
        assert_eq!(
            seqs,
            (0..20).collect::<Vec<_>>(),
            "node {node}: every line, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_stalls_every_node_then_gets_everything() {
    let (nodes, _sluice, mut client) = fanout_over(&["a", "b", "c"]).await;
    // 3 × 4000 lines of 4 KiB (48 MiB): far past every window and queue.
    let lines = 4000;
    let req = lines_of(lines, 4096, 0);
    let mut stream = logs(&mut client, "a,b,c", req).await;
    // Not reading: every node gets going, then every node stops short.
    for n in &nodes {
        n.probe.wait_for(LIMIT, |c| c.lines_sent > 0).await;
    }
    let settled = |n: &NodeServer| n.probe.counts().lines_sent;
    let mut before: Vec<u64> = nodes.iter().map(settled).collect();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now: Vec<u64> = nodes.iter().map(settled).collect();
        if now == before {
            break;
        }
        before = now;
    }
    for (n, sent) in nodes.iter().zip(&before) {
        assert!(
            *sent < u64::from(lines) / 2,
            "a node sent {sent} of {lines} lines to a client that reads nothing: {:?}",
            n.probe.counts()
        );
    }
    // Reading again: everything arrives.
    let mut got = 0;
    while let Some(line) = within("the next line", stream.next()).await {
        line.expect("a line");
        got += 1;
    }
    assert_eq!(got, 3 * lines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_passes_unrewritten() {
    let (_nodes, _sluice, client) = fanout_over(&["a", "b"]).await;
    // The client accepts gzip, so the nodes compress every line.
    let mut client = client.accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let req = lines_of(5, 100, 0);
    let mut stream = logs(&mut client, "a,b", req).await;
    let mut got = 0;
    while let Some(line) = within("the next line", stream.next()).await {
        let line = line.expect("a line that decompresses and decodes");
        // Left as the node sent it: no metadata was appended.
        assert_eq!(hostname(&line.metadata), "");
        assert_eq!(line.text.len(), 100);
        got += 1;
    }
    assert_eq!(got, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_fanout_reaches_every_node() {
    let (nodes, _sluice, mut client) = fanout_over(&["a", "b", "c"]).await;
    let req = lines_of(1_000_000, 10, 5);
    let mut stream = logs(&mut client, "a,b,c", req).await;
    within("a first line", stream.next()).await;
    drop(stream);
    for n in &nodes {
        n.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
    }
}

/// Waits until the mirror finalizer counted `outcome` for `destination`
/// once (the report comes when the last destination has ended).
async fn reported(sluice: &Running, destination: &str, outcome: &str) {
    let admin_addr = sluice.admin_addr().expect("admin");
    within("the mirror's report", async {
        loop {
            let s = crate::metrics::scrape(admin_addr).await;
            let labels = [("destination", destination), ("outcome", outcome)];
            let n = crate::metrics::value(&s, "sluice_mirror_outcomes_total", &labels);
            if n >= 1.0 {
                assert_eq!(n, 1.0, "{destination} {outcome}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_merge_reaches_every_node_still_working() {
    let (nodes, _sluice, mut client) = fanout_over(&["a", "b", "c"]).await;
    // Every node takes a minute to answer; the client gives up once all
    // three are working on it.
    let call = client.version(to(
        "a,b,c",
        VersionRequest {
            fail_code: 0,
            delay_ms: 60_000,
        },
    ));
    let started = async {
        for n in &nodes {
            n.probe.wait_for(LIMIT, |c| c.started == 1).await;
        }
    };
    tokio::select! {
        _ = call => panic!("the call answered before every node started"),
        () = started => {}
    }
    // The call future is dropped: every node sees its call cancelled.
    for n in &nodes {
        n.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
    }
}

fn mirror_config(primary: SocketAddr, shadow: SocketAddr, policy: &str) -> Config {
    let text = format!(
        r#"
[upstreams.primary]
endpoints = ["{primary}"]
[upstreams.shadow]
endpoints = ["{shadow}"]
[fanout]
queue = 4
[[routes]]
name = "writes"
method = "/sluice.test.nodes.Nodes/Write"
mirror = {{ primary = "primary", secondaries = [{{ upstream = "shadow", overflow = "{policy}" }}] }}
"#
    );
    sluice_config(primary, &text)
}

/// A primary node, a shadow node that takes `per_chunk` over each chunk,
/// and a sluice mirroring Write to both (overflow `policy`), with a client.
async fn slow_shadow(
    per_chunk: Duration,
    policy: &str,
) -> ([NodeServer; 2], Running, NodesClient<Channel>) {
    let primary = NodeServer::start("primary");
    let shadow = NodeServer::start_with("shadow", per_chunk);
    let (sluice, client) = start(&mirror_config(primary.addr, shadow.addr, policy)).await;
    ([primary, shadow], sluice, client)
}

/// Streams `n` chunks of `size` bytes to Write and returns the time the
/// call took.
async fn write(client: &mut NodesClient<Channel>, n: usize, size: usize) -> (Duration, u64) {
    let chunks = tokio_stream::iter((0..n).map(move |_| Chunk {
        data: vec![7u8; size].into(),
    }));
    let started = std::time::Instant::now();
    let res = within("a mirrored write", client.write(chunks))
        .await
        .expect("the primary's OK");
    let r = res.into_inner().messages;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].node, "primary", "only the primary answers");
    (started.elapsed(), r[0].chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_secondary_in_drop_mode_never_slows_the_primary() {
    // 20 ms per 16 KiB chunk: 300 chunks (4.8 MiB, more than the windows
    // and queue in between hold) would take 6 s.
    let ([_primary, shadow], sluice, mut client) =
        slow_shadow(Duration::from_millis(20), "drop").await;
    let (took, chunks) = write(&mut client, 300, 16 << 10).await;
    assert_eq!(chunks, 300);
    assert!(
        took < Duration::from_secs(2),
        "the primary was paced by the secondary: {took:?}"
    );
    // The finalizer's report: the secondary was dropped.
    reported(&sluice, "shadow", "dropped").await;
    reported(&sluice, "primary", "ok").await;
    // Cut off: it never got the whole write (it may even have been dropped
    // before its call reached it).
    let c = shadow.probe.counts();
    assert_eq!(c.writes_done, 0, "{c:?}");
    assert!(c.chunks < 300, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_secondary_in_block_mode_paces_the_call_and_gets_everything() {
    // 300 chunks of 16 KiB at 2 ms each: 0.6 s at the secondary, of which
    // its windows and queues (about 1.4 MiB, 90 chunks) absorb 0.18 s.
    let ([_primary, shadow], sluice, mut client) =
        slow_shadow(Duration::from_millis(2), "block").await;
    let (took, chunks) = write(&mut client, 300, 16 << 10).await;
    assert_eq!(chunks, 300);
    let c = shadow.probe.wait_for(LIMIT, |c| c.writes_done == 1).await;
    assert_eq!(c.chunks, 300, "the secondary got every chunk");
    // Paced: the client could not run ahead of the secondary by more
    // than the queue (4 frames) plus the windows in between.
    assert!(
        took >= Duration::from_millis(250),
        "the call was not paced by the secondary: {took:?}"
    );
    reported(&sluice, "shadow", "ok").await;
}

/// A whole-group merge route over echo servers, whose `Reply { bytes
/// payload = 1; uint64 seq = 2; }` is not a list of field-1 entries as
/// soon as `seq` is set.
fn echo_fanout(a: SocketAddr, b: SocketAddr, malformed: &str) -> Config {
    let text = format!(
        r#"
[upstreams.echoes]
endpoints = [{{ address = "{a}", ids = ["e1"] }}, {{ address = "{b}", ids = ["e2"] }}]
[fanout]
malformed = "{malformed}"
[[routes]]
name = "echo everywhere"
method = "/sluice.test.Echo/Unary"
fanout = {{ group = "echoes" }}
"#
    );
    sluice_config(a, &text)
}

/// A request with payload `hi` and `seq` (0 leaves field 2 out, so the
/// reply is one field-1 entry).
fn hi(seq: u64) -> sluice_testkit::Req {
    sluice_testkit::Req {
        payload: b"hi".to_vec().into(),
        seq,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_in_the_wrong_layout_fails_the_call_naming_the_destination() {
    let (e1, e2) = (
        sluice_testkit::EchoServer::start().await,
        sluice_testkit::EchoServer::start().await,
    );
    trace_init();
    let sluice = sluice::run(&echo_fanout(e1.addr, e2.addr, "fail"))
        .await
        .expect("sluice");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    // Without seq the reply is one field-1 entry: it merges.
    let ok = within("a well-formed merge", client.unary(hi(0)))
        .await
        .expect("merged");
    assert_eq!(&ok.get_ref().payload[..2], b"hi", "{:?}", ok.get_ref());
    // With seq (field 2) it is not the layout: INTERNAL, naming e1.
    let err = within("a malformed merge", client.unary(hi(5)))
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("e1"), "{err:?}");

    // With `malformed = "pass"` it passes unenriched, and is counted.
    let sluice = sluice::run(&echo_fanout(e1.addr, e2.addr, "pass"))
        .await
        .expect("sluice");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let ok = within("a passed-through merge", client.unary(hi(5)))
        .await
        .expect("passed through");
    assert_eq!(ok.get_ref().seq, 5);
    assert_eq!(ok.get_ref().payload, b"hi".to_vec());
    let s = crate::metrics::scrape(sluice.admin_addr().expect("admin")).await;
    let malformed = crate::metrics::value(
        &s,
        "sluice_fanout_outcomes_total",
        &[("route", "echo everywhere"), ("outcome", "malformed")],
    );
    assert_eq!(malformed, 2.0);
}

/// A raw h2 upstream that takes one connection and hands its first stream
/// to `on_stream`, serving the connection meanwhile: a secondary that
/// does what a tonic server never does.
async fn raw_secondary<F, Fut>(on_stream: F) -> SocketAddr
where
    F: FnOnce(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(tcp).await.expect("h2");
        let (req, respond) = conn.accept().await.expect("a stream").expect("ok");
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        on_stream(req, respond).await;
    });
    addr
}

/// A secondary cut off in drop mode is reset with INTERNAL_ERROR: hyper
/// (tonic) servers read RST_STREAM(CANCEL) on a request stream as its clean
/// end, and would take the cut-off copy for the whole request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_secondary_is_reset_as_an_error_not_a_cancel() {
    let primary = NodeServer::start("primary");
    // A raw h2 upstream that never gives window back: the copy backs up.
    let (reason_tx, reason_rx) = tokio::sync::oneshot::channel();
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let shadow = raw_secondary(|req, respond| async move {
        let _ = opened_tx.send(());
        // Held, unanswered, while the body is read.
        let _respond = respond;
        let mut body = req.into_body();
        loop {
            match body.data().await {
                // Read, but never release capacity: the window stays shut.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = reason_tx.send(e.reason());
                    return;
                }
                None => {
                    let _ = reason_tx.send(None);
                    return;
                }
            }
        }
    })
    .await;
    let cfg = mirror_config(primary.addr, shadow, "drop");
    let (_sluice, mut client) = start(&cfg).await;
    // The copy's stream opens before the write outruns it: a copy dropped
    // before its stream opened never reaches the shadow, and then there is
    // nothing to reset.
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let chunk = || Chunk {
            data: vec![7u8; 16 << 10].into(),
        };
        if chunks_tx.send(chunk()).await.is_err() {
            return;
        }
        within("the copy's stream to open", opened_rx)
            .await
            .expect("the shadow saw the call");
        for _ in 1..300 {
            if chunks_tx.send(chunk()).await.is_err() {
                return;
            }
        }
    });
    let res = within(
        "a mirrored write",
        client.write(tokio_stream::wrappers::ReceiverStream::new(chunks_rx)),
    )
    .await
    .expect("the primary's OK");
    let r = res.into_inner().messages;
    assert_eq!(
        (r.len(), r[0].chunks),
        (1, 300),
        "the primary got the whole write"
    );
    let reason = within("the shadow's reset", reason_rx)
        .await
        .expect("a verdict");
    assert_eq!(reason, Some(h2::Reason::INTERNAL_ERROR));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cannot_name_more_destinations_than_the_group_has() {
    let (nodes, _sluice, mut client) = fanout_over(&["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let err = within(
        "an oversized fan-out",
        client.version(to("a,b,x,y,z", VersionRequest::default())),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(a.probe.counts().started + b.probe.counts().started, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_that_never_answers_is_cancelled_after_the_grace() {
    let primary = NodeServer::start("primary");
    // A raw h2 upstream that takes the call and never answers.
    let (reset_tx, reset_rx) = tokio::sync::oneshot::channel();
    let shadow = raw_secondary(|_req, mut respond| async move {
        let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
        let _ = reset_tx.send(reason.ok());
    })
    .await;
    let mut cfg = mirror_config(primary.addr, shadow, "block");
    cfg.fanout.secondary_grace = Duration::from_millis(200);
    let (sluice, mut client) = start(&cfg).await;
    let (_, chunks) = write(&mut client, 3, 10).await;
    assert_eq!(chunks, 3);
    // The secondary is cut off after the grace, and reported cancelled.
    let reason = within("the secondary's reset", reset_rx)
        .await
        .expect("reset");
    assert!(reason.is_some());
    reported(&sluice, "shadow", "cancelled").await;
    reported(&sluice, "primary", "ok").await;
}

/// A raw h2 upstream that answers every call with one message (flag
/// `flag`, bytes `payload`) and grpc-status 0.
async fn raw_node(flag: u8, payload: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let res = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-encoding", "gzip")
                        .body(())
                        .expect("response");
                    let Ok(mut send) = respond.send_response(res, false) else {
                        continue;
                    };
                    let mut m = vec![flag];
                    m.extend_from_slice(
                        &u32::try_from(payload.len()).expect("small").to_be_bytes(),
                    );
                    m.extend_from_slice(payload);
                    let _ = send.send_data(m.into(), false);
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().expect("value"));
                    let _ = send.send_trailers(t);
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_reply_is_never_merged_and_counts_as_failed() {
    let a = NodeServer::start("a");
    // Compressed bytes (flag 1) that would decode as anything at all.
    let zipped = raw_node(1, b"\x1f\x8b\x08\x00not-really").await;
    let (_sluice, mut client) = start(&config(&[("a", a.addr), ("z", zipped)], "")).await;
    let reply = within(
        "a merge with a compressed reply",
        client.version(to("a,z", VersionRequest::default())),
    )
    .await
    .expect("OK: one destination answered")
    .into_inner();
    assert_eq!(reply.messages.len(), 2, "{reply:?}");
    assert_eq!(reply.messages[0].node, "a");
    let z = reply.messages[1].metadata.as_ref().expect("an error entry");
    assert_eq!(z.hostname, "z");
    assert!(z.error.contains("compressed"), "{z:?}");
    assert_eq!(
        z.status.as_ref().map(|s| s.code),
        Some(Code::Internal as i32)
    );
}

/// Issue #17.1: every method mirrored, primary and shadow both nodes.
fn mirror_everything(primary: SocketAddr, shadow: SocketAddr) -> Config {
    let text = format!(
        r#"
[upstreams.primary]
endpoints = ["{primary}"]
[upstreams.shadow]
endpoints = ["{shadow}"]
[[routes]]
method = "/sluice.test.nodes.Nodes/*"
mirror = {{ primary = "primary", secondaries = ["shadow"] }}
"#
    );
    sluice_config(primary, &text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gives_the_client_the_primarys_trailers_only_answers() {
    let primary = NodeServer::start("primary");
    let shadow = NodeServer::start("shadow");
    let (sluice, mut client) = start(&mirror_everything(primary.addr, shadow.addr)).await;
    // The primary's handler aborts: a trailers-only answer.
    let err = within(
        "a failing unary call",
        client.version(VersionRequest {
            fail_code: Code::NotFound as i32,
            delay_ms: 0,
        }),
    )
    .await
    .expect_err("the primary said NOT_FOUND");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("primary failed as asked"), "{err:?}");
    // A server stream that ends OK with no message: trailers-only OK.
    let mut stream = within("an empty stream", client.logs(LogsRequest::default()))
        .await
        .expect("OK headers")
        .into_inner();
    let end = within("the end of the stream", stream.message()).await;
    assert!(matches!(end, Ok(None)), "an empty OK stream: {end:?}");
    // A stream that aborts before any message: the primary's status.
    let aborted = within(
        "an aborted stream",
        client.logs(LogsRequest {
            fail_code: Code::FailedPrecondition as i32,
            ..Default::default()
        }),
    )
    .await;
    let status = match aborted {
        Err(status) => status,
        Ok(res) => within("the stream's status", res.into_inner().message())
            .await
            .expect_err("the primary's status"),
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // On the wire: one HEADERS frame with END_STREAM, as the primary sent
    // it, not headers and then an empty DATA frame (which grpcio reads as
    // a stream with no status: UNKNOWN).
    let mut h2 = raw_client(sluice.listen_addr()).await;
    let mut head = grpc_head("Version");
    *head.uri_mut() = "http://sluice.test/sluice.test.nodes.Nodes/Version"
        .parse()
        .expect("uri");
    let (res, mut body) = h2.send_request(head, false).expect("send");
    let msg = VersionRequest {
        fail_code: Code::NotFound as i32,
        delay_ms: 0,
    };
    let mut frame = vec![0u8];
    frame.extend_from_slice(
        &u32::try_from(prost::Message::encoded_len(&msg))
            .expect("small")
            .to_be_bytes(),
    );
    frame.extend_from_slice(&prost::Message::encode_to_vec(&msg));
    body.send_data(frame.into(), true)
        .expect("send the request");
    let res = within("the raw answer", res).await.expect("headers");
    assert_eq!(res.headers()["grpc-status"], "5");
    assert!(
        res.body().is_end_stream(),
        "END_STREAM on the HEADERS frame"
    );
}

/// A fan-out config in interleave mode over `nodes`.
fn interleaved(nodes: &[(&str, SocketAddr)]) -> Config {
    let mut config = config(nodes, "");
    config.fanout.streaming_methods = vec!["*/Logs".to_owned()];
    config
}

/// Reads a stream to its end: its messages and its status.
async fn drain_stream(
    call: impl Future<
        Output = Result<tonic::Response<tonic::Streaming<sluice_testkit::npb::Log>>, tonic::Status>,
    >,
) -> (Vec<sluice_testkit::npb::Log>, tonic::Status) {
    let mut stream = match within("the stream's headers", call).await {
        Ok(res) => res.into_inner(),
        Err(status) => return (Vec::new(), status),
    };
    let mut lines = Vec::new();
    loop {
        match within("the next message or the end", stream.message()).await {
            Ok(Some(line)) => lines.push(line),
            Ok(None) => return (lines, tonic::Status::ok("")),
            Err(status) => return (lines, status),
        }
    }
}

fn error_of(line: &sluice_testkit::npb::Log) -> Option<(String, i32)> {
    let meta = line.metadata.as_ref()?;
    (!meta.error.is_empty()).then(|| {
        (
            meta.hostname.clone(),
            meta.status.as_ref().map_or(0, |s| s.code),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interleaved_fanout_ends_at_once_when_no_destination_answers() {
    let up = NodeServer::start("node-1");
    let cfg = interleaved(&[
        ("node-1", up.addr),
        ("node-2", closed_addr()),
        ("node-3", closed_addr()),
    ]);
    let (_sluice, mut client) = start(&cfg).await;
    let lines = |fail_code| LogsRequest {
        lines: 0,
        fail_code,
        ..Default::default()
    };
    // No deadline on any of these calls: a hang fails the test at LIMIT.
    // An id the group does not have.
    let (got, status) = drain_stream(client.logs(to("node-9", lines(0)))).await;
    assert_ne!(
        status.code(),
        Code::Ok,
        "the only destination failed: {status:?}"
    );
    assert_eq!(got.iter().filter_map(error_of).count(), 1, "{got:?}");
    // Every named endpoint down.
    let (got, status) = drain_stream(client.logs(to("node-2,node-3", lines(0)))).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let down: Vec<String> = got.iter().filter_map(error_of).map(|e| e.0).collect();
    assert_eq!(down.len(), 2, "an error message for each: {got:?}");
    // The one that answers aborts before any message.
    let (_, status) = drain_stream(client.logs(to("node-1", lines(Code::Aborted as i32)))).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    // One streams nothing (OK), another cannot be reached: OK, with the
    // error message of the one that failed.
    let (got, status) = drain_stream(client.logs(to("node-1,node-2", lines(0)))).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let errors: Vec<(String, i32)> = got.iter().filter_map(error_of).collect();
    assert_eq!(errors, [("node-2".to_owned(), Code::Unavailable as i32)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_destination_of_an_interleaved_stream_gets_its_error_message() {
    let up = NodeServer::start("node-1");
    let cfg = interleaved(&[("node-1", up.addr), ("node-2", closed_addr())]);
    let (_sluice, mut client) = start(&cfg).await;
    for nodes in ["node-1,node-9", "node-1,node-2", "node-9,node-1"] {
        let (got, status) = drain_stream(client.logs(to(
            nodes,
            LogsRequest {
                lines: 3,
                line_size: 4,
                ..Default::default()
            },
        )))
        .await;
        assert_eq!(status.code(), Code::Ok, "{nodes}: {status:?}");
        let served = got.iter().filter(|l| l.node == "node-1").count();
        assert_eq!(served, 3, "{nodes}: {got:?}");
        let failed: Vec<String> = got.iter().filter_map(error_of).map(|e| e.0).collect();
        let other = nodes.split(',').find(|n| *n != "node-1").expect("two");
        assert_eq!(failed, [other.to_owned()], "{nodes}: {got:?}");
    }
}
