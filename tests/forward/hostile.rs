//! Issue #4: hostile and broken peers. Each test names the numbered point
//! it covers, checks the answer RFC 9113 (or gRPC) prescribes, that nothing
//! reached the upstream, and where it matters that memory stayed bounded
//! and other clients were served.

use std::time::Duration;

use sluice_testkit::Req;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{raw::*, support::*};

// 2. CONTINUATION floods (CVE-2024-27316 class).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_floods_close_the_connection_and_forward_nothing() {
    let (upstream, sluice) = setup(|_| {}).await;
    for (what, field) in [("with fields", true), ("empty", false)] {
        let mut raw = Raw::handshake(sluice.listen_addr()).await;
        raw.send(&frame(
            HEADERS,
            END_STREAM,
            1,
            &block_of(&grpc_fields("Unary")),
        ))
        .await;
        let filler = if field {
            header_block(&[(b"x-flood", &[b'a'; 1000])])
        } else {
            Vec::new()
        };
        let mut sent = 0;
        while sent < 20_000 {
            if !raw
                .try_send(
                    &frame(CONTINUATION, 0, 1, &filler),
                    Duration::from_millis(500),
                )
                .await
            {
                break;
            }
            sent += 1;
        }
        // The connection is cut with an error, whether the frames carry
        // fields (bytes) or not (frame count).
        let goaway = raw
            .goaway()
            .await
            .unwrap_or_else(|| panic!("{what}: no GOAWAY"));
        assert_ne!(goaway.error_code(), NO_ERROR, "{what}: {goaway:?}");
        if field {
            assert!(sent < 20_000, "{what}: 20 MB of CONTINUATION accepted");
        }
    }
    normal_calls(sluice.listen_addr(), 3).await;
    assert_eq!(
        upstream.probe.counts().started,
        3,
        "only the normal calls reached the upstream"
    );
}

fn timeouts(config: &mut sluice::Config) {
    config.server.handshake_timeout = Duration::from_millis(300);
    config.server.idle_timeout = Duration::from_millis(300);
}

// 6. Slowloris: silent, trickling and idle connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_trickling_and_idle_connections_are_closed() {
    let (_upstream, sluice) = setup(timeouts).await;
    let addr = sluice.listen_addr();

    // Says nothing: closed after the handshake timeout.
    let mut silent = Raw::connect(addr).await;
    let said = silent.until_closed(Duration::from_secs(3)).await;
    assert!(said.is_empty(), "a silent connection is closed: {said:?}");

    // Trickles the preface a byte every 50 ms: closed before it completes.
    let mut trickle = Raw::connect(addr).await;
    let mut written = 0;
    for byte in PREFACE {
        if !trickle.try_send(&[*byte], Duration::from_millis(100)).await {
            break;
        }
        written += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        written < PREFACE.len(),
        "cut off before the preface was complete"
    );
    trickle.until_closed(Duration::from_secs(3)).await;

    // Completes the handshake, then sits idle: GOAWAY(NO_ERROR), then closed.
    let mut idle = Raw::handshake(addr).await;
    let first = idle.goaway().await.expect("GOAWAY for an idle connection");
    assert_eq!(first.error_code(), NO_ERROR);
    // Two steps: 2^31-1 first, then (after a PING round trip) the real last
    // stream id, which is 0: no stream was ever opened.
    let last = if first.last_stream_id() == 0x7fff_ffff {
        idle.goaway().await.expect("the second GOAWAY")
    } else {
        first
    };
    assert_eq!((last.error_code(), last.last_stream_id()), (NO_ERROR, 0));
    idle.until_closed(Duration::from_secs(3)).await;
}

/// Every byte a peer makes sluice wait for before the first request is
/// under the handshake timeout: an HTTP/1 request line that never ends, a
/// request head trickled forever, a bad preface whose sender keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http1_heads_and_bad_prefaces_are_cut_off_at_the_handshake_timeout() {
    let (_upstream, sluice) = setup(timeouts).await;
    let addr = sluice.listen_addr();
    let started = tokio::time::Instant::now();
    // `GET` and nothing more.
    let mut get = Raw::connect(addr).await;
    get.send(b"GET").await;
    get.until_closed(Duration::from_secs(3)).await;
    // A head trickled a byte at a time, never ending.
    let mut trickle = Raw::connect(addr).await;
    let trickler = tokio::spawn(async move {
        for b in b"GET / HTTP/1.1\r\nhost: x\r\nx-long: "
            .iter()
            .chain([b'a'; 1000].iter())
        {
            if !trickle.try_send(&[*b], Duration::from_millis(100)).await {
                return trickle;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        trickle
    });
    let mut trickle = within("the trickler to be cut off", trickler)
        .await
        .expect("task");
    trickle.until_closed(Duration::from_secs(3)).await;
    // A bad first frame, then bytes that never stop.
    let (mut rd, mut wr) = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    wr.write_all(&[PREFACE.to_vec(), frame(PING, 0, 0, &[0; 8])].concat())
        .await
        .expect("write");
    let writer = tokio::spawn(async move {
        while wr.write_all(&[0u8; 64]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), rd.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "a sender that never stops is cut off anyway");
    writer.abort();
    let goaway = frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert!(
        got.windows(goaway.len()).any(|w| w == goaway),
        "GOAWAY(PROTOCOL_ERROR): {got:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "each was cut off near the 300 ms handshake timeout"
    );
    eventually("every connection is gone", || {
        sluice.stats().downstream_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slowloris_connections_do_not_stop_a_normal_call() {
    let (_upstream, sluice) = setup(|c| c.server.handshake_timeout = Duration::from_secs(30)).await;
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut raw = Raw::connect(sluice.listen_addr()).await;
        raw.send(&PREFACE[..5]).await;
        held.push(raw);
    }
    normal_calls(sluice.listen_addr(), 5).await;
    assert!(sluice.stats().downstream_connections >= 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_ping_is_dropped() {
    let (_upstream, sluice) = setup(|c| {
        c.server.keepalive_interval = Duration::from_millis(200);
        c.server.keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let mut raw = Raw::handshake(sluice.listen_addr()).await;
    // A call that stays open, so the connection is not idle.
    raw.request(1, "ServerStream", false).await;
    let hang = hanging();
    raw.send(&frame(DATA, END_STREAM, 1, &grpc_message(&hang)))
        .await;
    // The drop must come (not silence), after a PING left unanswered.
    let frames = raw.until_closed(Duration::from_secs(5)).await;
    assert!(
        frames.iter().any(|f| f.kind == PING && f.flags & ACK == 0),
        "sluice pinged the client before dropping it: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_ping_fails_calls_instead_of_hanging() {
    trace_init();
    // Accepts connections and never says a word.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = black_hole.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = black_hole.accept().await {
            held.push(tcp);
        }
    });
    let mut config = config(addr);
    config.upstream.keepalive_interval = Duration::from_millis(200);
    config.upstream.keepalive_timeout = Duration::from_millis(200);
    let sluice = sluice::run(&config).await.expect("sluice");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let status = within("call", client.unary(Req::default()))
        .await
        .expect_err("a dead upstream cannot answer");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

// 7. MAX_CONCURRENT_STREAMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_concurrent_streams_are_refused_and_the_rest_carry_on() {
    let (_upstream, sluice) = setup(|c| c.server.max_concurrent_streams = 3).await;
    let mut raw = Raw::handshake(sluice.listen_addr()).await;
    let hang = grpc_message(&hanging());
    for stream in [1, 3, 5, 7, 9] {
        raw.request(stream, "ServerStream", false).await;
        raw.send(&frame(DATA, END_STREAM, stream, &hang)).await;
    }
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    while answered.len() + refused.len() < 5 {
        let f = raw.next().await.expect("connection stays open");
        match f.kind {
            HEADERS => answered.push(f.stream),
            // The first reset of a refused stream says why; the DATA that
            // followed its HEADERS then draws STREAM_CLOSED, as it should.
            RST_STREAM if !refused.contains(&f.stream) => {
                assert_eq!(f.error_code(), REFUSED_STREAM, "{f:?}");
                refused.push(f.stream);
            }
            GOAWAY => panic!("the connection must carry on: {f:?}"),
            _ => {}
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 3, 5]);
    assert_eq!(refused, [7, 9]);
}

// 8. Malformed requests: stream errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_reset_and_never_forwarded() {
    let (upstream, sluice) = setup(|_| {}).await;
    let base = grpc_fields("Unary");
    let without = |name: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
        base.iter().filter(|(n, _)| n != name).cloned().collect()
    };
    let with = |extra: (&[u8], &[u8])| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut f = base.clone();
        f.push((extra.0.to_vec(), extra.1.to_vec()));
        f
    };
    let mut pseudo_after_regular = base.clone();
    pseudo_after_regular.swap(2, 4); // content-type before :path
    let mut empty_path = base.clone();
    empty_path[2].1.clear();
    let cases: Vec<(&str, Vec<(Vec<u8>, Vec<u8>)>)> = vec![
        ("missing :path", without(b":path")),
        ("missing :method", without(b":method")),
        ("missing :scheme", without(b":scheme")),
        (
            "duplicated :path",
            with((b":path", b"/sluice.test.Echo/Unary")),
        ),
        ("empty :path", empty_path),
        ("unknown pseudo-header", with((b":foo", b"bar"))),
        ("response pseudo-header", with((b":status", b"200"))),
        ("pseudo-header after a regular one", pseudo_after_regular),
        ("uppercase name", with((b"X-Upper", b"v"))),
        ("connection", with((b"connection", b"close"))),
        ("keep-alive", with((b"keep-alive", b"5"))),
        ("proxy-connection", with((b"proxy-connection", b"x"))),
        (
            "transfer-encoding",
            with((b"transfer-encoding", b"chunked")),
        ),
        ("upgrade", with((b"upgrade", b"h2c"))),
        ("te other than trailers", {
            let mut f = without(b"te");
            f.push((b"te".to_vec(), b"gzip".to_vec()));
            f
        }),
        ("LF in a value", with((b"x-evil", b"a\nb"))),
        ("CR in a value", with((b"x-evil", b"a\rb"))),
        ("NUL in a value", with((b"x-evil", b"a\0b"))),
    ];
    for (what, fields) in cases {
        let mut raw = Raw::handshake(sluice.listen_addr()).await;
        raw.send(&frame(HEADERS, END_HEADERS, 1, &block_of(&fields)))
            .await;
        raw.send(&frame(DATA, END_STREAM, 1, &grpc_message(&Req::default())))
            .await;
        let answer = raw
            .until(|f| {
                f.kind == RST_STREAM || f.kind == GOAWAY || (f.kind == HEADERS && f.stream == 1)
            })
            .await
            .unwrap_or_else(|| panic!("{what}: closed without an answer"));
        assert!(
            matches!(answer.kind, RST_STREAM | GOAWAY) && answer.error_code() == PROTOCOL_ERROR,
            "{what}: answered {answer:?}"
        );
    }
    // content-length that does not match the DATA.
    let mut raw = Raw::handshake(sluice.listen_addr()).await;
    let mut fields = base.clone();
    fields.push((b"content-length".to_vec(), b"100".to_vec()));
    raw.send(&frame(HEADERS, END_HEADERS, 1, &block_of(&fields)))
        .await;
    raw.send(&frame(DATA, END_STREAM, 1, &grpc_message(&Req::default())))
        .await;
    let answer = raw
        .until(|f| matches!(f.kind, RST_STREAM | GOAWAY))
        .await
        .expect("an answer");
    assert_eq!(
        answer.error_code(),
        PROTOCOL_ERROR,
        "content-length mismatch: {answer:?}"
    );

    assert_eq!(
        upstream.probe.counts().started,
        0,
        "a malformed request reached the upstream"
    );
}

// 8. Malformed frames: connection errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_level_errors_get_the_connection_error_the_rfc_names() {
    let (upstream, sluice) = setup(|_| {}).await;
    let addr = sluice.listen_addr();
    let hello = block_of(&grpc_fields("Unary"));
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("DATA on stream 0", frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
        (
            "even stream id",
            frame(HEADERS, END_HEADERS, 2, &hello),
            PROTOCOL_ERROR,
        ),
        (
            "HPACK garbage",
            frame(HEADERS, END_HEADERS, 1, &[0xff; 16]),
            COMPRESSION_ERROR,
        ),
        (
            "frame over SETTINGS_MAX_FRAME_SIZE",
            [
                frame(HEADERS, END_HEADERS, 1, &hello),
                frame(DATA, 0, 1, &[0; 20_000]),
            ]
            .concat(),
            FRAME_SIZE_ERROR,
        ),
        (
            "connection window overflow",
            frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
            FLOW_CONTROL_ERROR,
        ),
        (
            "DATA after END_STREAM",
            [
                frame(HEADERS, END_HEADERS | END_STREAM, 1, &hello),
                frame(DATA, 0, 1, b"late"),
            ]
            .concat(),
            STREAM_CLOSED,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut raw = Raw::handshake(addr).await;
        raw.send(&bytes).await;
        let answer = raw
            .until(|f| matches!(f.kind, RST_STREAM | GOAWAY))
            .await
            .unwrap_or_else(|| panic!("{what}: closed without GOAWAY"));
        let got = answer.error_code();
        // h2 answers PROTOCOL_ERROR where RFC 9113 names COMPRESSION_ERROR
        // (HPACK integer overflow) and STREAM_CLOSED (DATA on a
        // half-closed stream); both are noted in #4.
        let h2_code = matches!(code, COMPRESSION_ERROR | STREAM_CLOSED) && got == PROTOCOL_ERROR;
        assert!(got == code || h2_code, "{what}: {answer:?}");
    }
    // A bad preface (h2spec 3.5), and a first frame that is not SETTINGS:
    // SETTINGS, GOAWAY(PROTOCOL_ERROR) with last stream 0, and the close.
    for (what, bytes) in [
        ("bad preface", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec()),
        (
            "not a preface at all",
            b"INVALID CONNECTION PREFACE\r\n\r\n".to_vec(),
        ),
        (
            "first frame not SETTINGS",
            [PREFACE.to_vec(), frame(PING, 0, 0, &[0; 8])].concat(),
        ),
    ] {
        let mut raw = Raw::connect(addr).await;
        raw.send(&bytes).await;
        // Closing our side lets sluice close at once after its answer.
        let _ = raw.tcp.shutdown().await;
        let frames = raw.until_closed(LIMIT).await;
        let goaway = frames
            .iter()
            .find(|f| f.kind == GOAWAY)
            .unwrap_or_else(|| panic!("{what}: closed without GOAWAY: {frames:?}"));
        assert_eq!(
            (goaway.error_code(), goaway.last_stream_id()),
            (PROTOCOL_ERROR, 0),
            "{what}"
        );
    }
    assert_eq!(upstream.probe.counts().started, 0);
    normal_calls(addr, 1).await;
}

// 9. Not gRPC at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_gets_an_http1_answer_and_non_grpc_http2_gets_415() {
    let (upstream, sluice) = setup(|_| {}).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(sluice.listen_addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    within("HTTP/1.1 answer", tcp.read_to_string(&mut answer))
        .await
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 505 "), "{answer}");
    assert!(answer.contains("content-length:"), "{answer}");

    let mut h2 = raw_client(sluice.listen_addr()).await;
    let (response, _) = h2.send_request(json_post(), true).expect("open");
    let res = within("response", response).await.expect("a response");
    assert_eq!(res.status(), 415);
    assert_eq!(upstream.probe.counts().started, 0);
}

/// An HTTP/2 request that is not gRPC: a POST of JSON.
fn json_post() -> http::Request<()> {
    http::Request::post("http://x/api/thing")
        .header("content-type", "application/json")
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_grpc_http2_can_be_forwarded_by_config() {
    trace_init();
    let mut upstream = RawUpstream::start(Behaviour::HeadersThenHang).await;
    let mut config = config(upstream.addr);
    config.server.non_grpc = sluice::config::NonGrpc::Forward;
    let sluice = sluice::run(&config).await.expect("sluice");
    let mut h2 = raw_client(sluice.listen_addr()).await;
    let (response, _) = h2.send_request(json_post(), true).expect("open");
    within("response", response).await.expect("forwarded");
    let head = within("upstream", upstream.heads.recv())
        .await
        .expect("the upstream saw it");
    assert_eq!(head["content-type"], "application/json");
}

// 10. Connection and in-flight limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_goaway_and_calls_past_it_resource_exhausted() {
    let (upstream, sluice) = setup(|c| {
        c.server.max_connections = 2;
        c.server.max_in_flight = 2;
    })
    .await;
    let addr = sluice.listen_addr();
    let _a = Raw::handshake(addr).await;
    let _b = Raw::handshake(addr).await;
    let mut third = Raw::connect(addr).await;
    third.send(PREFACE).await;
    third.send(&frame(SETTINGS, 0, 0, &[])).await;
    let goaway = third
        .goaway()
        .await
        .expect("GOAWAY for the third connection");
    assert_eq!(goaway.error_code(), ENHANCE_YOUR_CALM);
    assert_eq!(goaway.last_stream_id(), 0);
    drop((_a, _b));

    eventually("connections close", || {
        sluice.stats().downstream_connections == 0
    })
    .await;
    let mut client = sluice_testkit::client(addr);
    let mut hanging = Vec::new();
    for _ in 0..2 {
        let stream = within(
            "headers",
            client.server_stream(Req {
                headers_then_hang: true,
                ..Req::default()
            }),
        )
        .await
        .expect("within the limit");
        hanging.push(stream);
    }
    let status = within("third call", client.unary(Req::default()))
        .await
        .expect_err("over max_in_flight");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(upstream.probe.counts().started, 2);
    drop(hanging);
}

// 1. Rapid reset on streams sluice already accepted and forwarded, which
// h2's pending-accept count cannot see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_accepted_calls_too_fast_gets_goaway() {
    let (upstream, sluice) = setup(|c| c.server.max_resets_per_second = 20).await;
    let mut raw = Raw::handshake(sluice.listen_addr()).await;
    let hang = grpc_message(&hanging());
    let mut reset = 0;
    let mut goaway = None;
    for i in 0..60u32 {
        let stream = 1 + 2 * i;
        // sluice closes the connection right after its GOAWAY: a write may
        // find it gone.
        let request = [
            frame(
                HEADERS,
                END_HEADERS,
                stream,
                &block_of(&grpc_fields("ServerStream")),
            ),
            frame(DATA, END_STREAM, stream, &hang),
        ]
        .concat();
        if !raw.try_send(&request, Duration::from_secs(1)).await {
            break;
        }
        // Wait until the call is accepted and answered, then cancel it.
        let answer = raw
            .until(|f| f.kind == GOAWAY || (f.kind == HEADERS && f.stream == stream))
            .await
            .expect("an answer");
        if answer.kind == GOAWAY {
            goaway = Some(answer);
            break;
        }
        if !raw
            .try_send(
                &frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()),
                Duration::from_secs(1),
            )
            .await
        {
            break;
        }
        reset += 1;
    }
    let goaway = match goaway {
        Some(g) => g,
        None => raw
            .goaway()
            .await
            .expect("GOAWAY for a client resetting too fast"),
    };
    assert!(reset > 20 && reset < 60, "cut off after {reset} resets");
    assert!(goaway.last_stream_id() > 0, "{goaway:?}");
    assert_eq!(goaway.error_code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    // Every reset call reached the upstream and was cancelled there.
    upstream.probe.wait_for(LIMIT, |c| c.cancelled >= 20).await;
    normal_calls(sluice.listen_addr(), 1).await;
}
