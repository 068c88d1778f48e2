//! Issue #4, the attacks whose cost is memory: sluice's RSS must stay
//! within 16 MiB of where it started while each runs. A test binary of its
//! own, its tests run one at a time, so `/proc/self/status` measures the
//! attack and not a neighbouring test.

#[allow(dead_code, unreachable_pub)]
#[path = "forward/raw.rs"]
mod raw;
#[allow(dead_code, unreachable_pub)]
#[path = "forward/support.rs"]
mod support;

use std::time::{Duration, Instant};

use sluice_testkit::Req;

use crate::{raw::*, support::*};

const MIB: u64 = 1 << 20;

/// One attack at a time in this process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// 1. Rapid reset (CVE-2023-44487).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_with_enhance_your_calm() {
    let _serial = SERIAL.lock().await;
    let (upstream, sluice) = setup(|_| {}).await;
    let addr = sluice.listen_addr();
    let rss_before = rss();
    let normal = tokio::spawn(async move {
        let mut client = sluice_testkit::client(addr);
        let (mut ok, mut total) = (0u32, 0u32);
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            total += 1;
            if tokio::time::timeout(Duration::from_secs(1), client.unary(Req::default()))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                ok += 1;
            }
        }
        (ok, total)
    });

    let mut raw = Raw::handshake(addr).await;
    let message = frame(DATA, END_STREAM, 0, &grpc_message(&Req::default()));
    let mut sent = 0u32;
    let mut stream = 1u32;
    let started = Instant::now();
    'attack: while sent < 20_000 && started.elapsed() < Duration::from_secs(3) {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend(frame(
                HEADERS,
                END_HEADERS,
                stream,
                &block_of(&grpc_fields("Unary")),
            ));
            let mut data = message.clone();
            data[5..9].copy_from_slice(&stream.to_be_bytes());
            batch.extend(data);
            batch.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
            stream += 2;
            sent += 1;
        }
        if !raw.try_send(&batch, Duration::from_secs(1)).await {
            break 'attack;
        }
    }
    let after_attack = rss();
    let goaway = raw.goaway().await.expect("the attacker gets GOAWAY");
    assert_eq!(goaway.error_code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    assert!(
        sent < 20_000,
        "the connection was cut off before the attack ended"
    );

    let (ok, total) = normal.await.expect("normal client");
    assert!(
        f64::from(ok) >= 0.9 * f64::from(total),
        "normal client: {ok}/{total}"
    );
    let counts = upstream.probe.counts();
    let attack_calls = counts.started.saturating_sub(u64::from(total));
    assert!(
        attack_calls * 20 <= u64::from(sent),
        "{attack_calls} of {sent} reset streams reached the upstream"
    );
    assert!(sluice.stats().upstream_connections <= 1);
    let grown = after_attack.saturating_sub(rss_before);
    assert!(
        grown < 16 * MIB,
        "RSS grew {} MiB during the attack",
        grown / MIB
    );
}

// 3. Oversized header lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_header_list_is_refused_and_never_forwarded() {
    let _serial = SERIAL.lock().await;
    trace_init();
    // A bare h2 upstream, which accepts header lists up to h2's 16 MiB
    // default and records every request head: a forward would show.
    let mut upstream = RawUpstream::start(Behaviour::Hang).await;
    let sluice = sluice::run(&config(upstream.addr)).await.expect("sluice");
    let rss_before = rss();
    let big_value = vec![b'v'; 1 << 20];
    let many: Vec<(Vec<u8>, Vec<u8>)> = (0..10_000)
        .map(|i| (format!("x-field-{i}").into_bytes(), vec![b'f'; 100]))
        .collect();
    for (what, extra) in [
        ("one 1 MiB value", vec![(b"x-big".to_vec(), big_value)]),
        ("10 000 fields", many),
    ] {
        let mut raw = Raw::handshake(sluice.listen_addr()).await;
        let mut fields = grpc_fields("Unary");
        fields.extend(extra);
        let block = block_of(&fields);
        let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
        let last = chunks.len() - 1;
        let mut stopped = false;
        for (i, chunk) in chunks.iter().enumerate() {
            let (kind, flags) = match i {
                0 => (
                    HEADERS,
                    END_STREAM | if last == 0 { END_HEADERS } else { 0 },
                ),
                i if i == last => (CONTINUATION, END_HEADERS),
                _ => (CONTINUATION, 0),
            };
            if !raw
                .try_send(&frame(kind, flags, 1, chunk), Duration::from_secs(1))
                .await
            {
                stopped = true;
                break;
            }
        }
        // The answer: a 431 response, a reset, or GOAWAY; never a forward.
        let answer = raw
            .until(|f| matches!(f.kind, HEADERS | RST_STREAM | GOAWAY))
            .await;
        assert!(answer.is_some() || stopped, "{what}: no answer at all");
    }
    assert!(
        upstream.heads.try_recv().is_err(),
        "an oversized header list was forwarded"
    );
    assert!(rss().saturating_sub(rss_before) < 16 * MIB);
}

// 4. SETTINGS and PING floods from a peer that never reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_stay_bounded() {
    let _serial = SERIAL.lock().await;
    let (_upstream, sluice) = setup(|_| {}).await;
    let rss_before = rss();
    let mut pings = Vec::new();
    for i in 0..1000u64 {
        pings.extend(frame(PING, 0, 0, &i.to_be_bytes()));
    }
    let settings = frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
    let mut flood_settings = Vec::new();
    for _ in 0..1000 {
        flood_settings.extend_from_slice(&settings);
    }
    let mut raw = Raw::handshake(sluice.listen_addr()).await;
    let end = Instant::now() + Duration::from_secs(2);
    let mut batches = 0;
    while Instant::now() < end && batches < 400 {
        let batch = if batches % 2 == 0 {
            &pings
        } else {
            &flood_settings
        };
        if !raw.try_send(batch, Duration::from_millis(200)).await {
            break; // sluice stopped reading: throttled
        }
        batches += 1;
    }
    // Other clients are served meanwhile.
    normal_calls(sluice.listen_addr(), 3).await;
    assert!(
        rss().saturating_sub(rss_before) < 16 * MIB,
        "grew {} MiB",
        (rss() - rss_before) / MIB
    );
}

// 5. Zero-window readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_readers_do_not_pull_responses_into_memory() {
    let _serial = SERIAL.lock().await;
    let (upstream, sluice) = setup(|_| {}).await;
    let rss_before = rss();
    let mut raw = Raw::connect(sluice.listen_addr()).await;
    raw.send(PREFACE).await;
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: no stream may receive anything.
    raw.send(&frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0])).await;
    raw.until(|f| f.kind == SETTINGS && f.flags & ACK == 0)
        .await
        .expect("settings");
    raw.send(&frame(SETTINGS, ACK, 0, &[])).await;
    let req = Req {
        replies: 1024,
        reply_size: 64 << 10,
        ..Req::default()
    };
    for i in 0..20u32 {
        let stream = 1 + 2 * i;
        raw.request(stream, "ServerStream", false).await;
        raw.send(&frame(DATA, END_STREAM, stream, &grpc_message(&req)))
            .await;
    }
    upstream.probe.wait_for(LIMIT, |c| c.started == 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // give it every chance to over-read
    let sent = upstream.probe.counts().replies_sent;
    // 20 streams x 256 KiB upstream stream windows (4 replies of 64 KiB
    // each), plus tonic's buffering (~3 each): ~140.
    assert!(
        sent <= 200,
        "upstream sent {sent} replies ({} MiB) to zero-window readers",
        sent / 16
    );
    assert!(rss().saturating_sub(rss_before) < 16 * MIB);
    drop(raw);
    normal_calls(sluice.listen_addr(), 1).await;
}

// Issue #9: readers that stop reading hold their upstream stream windows
// and no more, however many there are: 32 of them on 4 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_hold_their_stream_windows_and_no_more() {
    let _serial = SERIAL.lock().await;
    let (upstream, sluice) = setup(|_| {}).await;
    let window = u64::from(sluice::Config::embedded().upstream.initial_stream_window.0);
    let rss_before = rss();
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(raw_client(sluice.listen_addr()).await);
    }
    let mut held = Vec::new();
    for i in 0..32 {
        let (response, mut body) = conns[i % 4]
            .send_request(grpc_head("ServerStream"), false)
            .expect("open");
        let req = Req {
            replies: 512,
            reply_size: 64 << 10,
            ..Req::default()
        };
        body.send_data(grpc_frame(&req), true).expect("request");
        let res = within("headers", response).await.expect("headers");
        held.push((res.into_body(), body));
    }
    upstream
        .probe
        .wait_for(LIMIT, |c| c.replies_sent >= 32 * 4)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // give it every chance to over-read
    let sent = upstream.probe.counts().replies_sent;
    let grown = rss().saturating_sub(rss_before);
    // In sluice: 32 × the stream window (256 KiB). In this same process,
    // tonic's side buffers up to 400 KiB per stream and the raw client's
    // 64 KiB window: 32 × ~720 KiB ≈ 23 MiB in all, against 1 GiB asked.
    let bound = 32 * (window + 512 * 1024) + 16 * MIB;
    assert!(
        grown < bound,
        "grew {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );
    assert!(
        sent <= 32 * 16,
        "upstream sent {sent} replies of 64 KiB to stalled readers"
    );
    // And the upstream connection still carries other calls.
    normal_calls(sluice.listen_addr(), 3).await;
}

// Issue #9: an idle HTTP/2 connection costs sluice a few KiB, not h2's
// 28 KiB of buffers: they are given back while no call is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cost_a_few_kib_each() {
    const CONNECTIONS: u64 = 400;
    let _serial = SERIAL.lock().await;
    let (_upstream, sluice) = setup(|_| {}).await;
    // One connection first, so that what is allocated once is not counted.
    let mut warm = Raw::handshake(sluice.listen_addr()).await;
    warm.request(1, "Unary", false).await;
    warm.send(&frame(DATA, END_STREAM, 1, &grpc_message(&Req::default())))
        .await;
    warm.until(|f| f.kind == HEADERS && f.flags & END_STREAM != 0)
        .await
        .expect("the warm-up call's trailers");
    let rss_before = rss();
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        // The handshake, then nothing: sluice's SETTINGS are acknowledged.
        idle.push(Raw::handshake(sluice.listen_addr()).await);
    }
    eventually("every connection is served", || {
        sluice.stats().downstream_connections as u64 == CONNECTIONS + 1
    })
    .await;
    let per_connection = rss().saturating_sub(rss_before) / CONNECTIONS;
    // Both ends are in this process; the raw client's side is a socket and
    // a few bytes of buffer. h2's own buffers alone were 28 KiB.
    assert!(
        per_connection < 10 * 1024,
        "{per_connection} bytes per idle connection"
    );
    drop(idle);
}
