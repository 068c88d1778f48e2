//! Issue #21: retries and hedging, transparent retry, outlier ejection,
//! rate and concurrency limits, stream and connection age, fault
//! injection — through a real sluice, with tonic clients and echo servers
//! that fail of their own accord.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use sluice::Running;
use sluice_testkit::{EchoClient, EchoServer, Req};
use tonic::transport::Channel;

use crate::support::*;

/// A sluice whose default upstream is `default`, with `extra` (groups,
/// routes, tables) in its config, and a client of it.
async fn sluice_with(default: SocketAddr, extra: &str) -> (Running, EchoClient<Channel>) {
    trace_init();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
         [upstream]\naddress = \"{default}\"\n{extra}"
    );
    let config = sluice::Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let sluice = sluice::run(&config).await.expect("sluice");
    let client = sluice_testkit::client(sluice.listen_addr());
    (sluice, client)
}

/// A route over group `g` (the endpoints `addrs`) with `policy` (TOML
/// keys of the route) and `group` (TOML keys of the group).
fn over(addrs: &[SocketAddr], group: &str, policy: &str) -> String {
    let list = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[upstreams.g]\nendpoints = [{list}]\n{group}\n\
         [[routes]]\nname = \"r\"\nmethod = \"/sluice.test.Echo/*\"\nupstream = \"g\"\n{policy}\n"
    )
}

fn unary_calls(server: &EchoServer) -> u64 {
    server.faults.calls.load(Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_turns_every_other_failure_into_success() {
    let b = EchoServer::start().await;
    b.faults.fail_every.store(2, Relaxed);
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &over(
            &[b.addr],
            "",
            "retry = { max_attempts = 3, initial_backoff = \"10ms\" }",
        ),
    )
    .await;
    for i in 0..20 {
        within("a retried call", client.unary(Req::default()))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    // Calls 0, 2, 4… of the server failed, and each was sent again.
    assert_eq!(unary_calls(&b), 40, "every call failed once, then passed");
    // The attempt after a failure says how many went before it.
    let metadata = b.probe.last_metadata().expect("metadata");
    assert_eq!(
        metadata
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_tried_max_attempts_times_then_ends_with_the_last_status() {
    let b = EchoServer::start().await;
    b.faults.fail_all.store(true, Relaxed);
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &over(
            &[b.addr],
            "",
            "retry = { max_attempts = 3, initial_backoff = \"10ms\", retryable_codes = [\"UNAVAILABLE\"] }",
        ),
    )
    .await;
    let err = within("a call that always fails", client.unary(Req::default()))
        .await
        .expect_err("fails");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "injected by the echo server");
    assert_eq!(unary_calls(&b), 3);
    // A status the policy does not name is not retried.
    let err = within(
        "a call that fails with another code",
        client.unary(Req {
            fail_code: tonic::Code::Internal as i32,
            ..Req::default()
        }),
    )
    .await
    .expect_err("fails");
    assert_eq!(
        err.code(),
        tonic::Code::Unavailable,
        "the server's own fault comes first"
    );
    b.faults.fail_all.store(false, Relaxed);
    let before = unary_calls(&b);
    let err = within(
        "a call that fails INTERNAL",
        client.unary(Req {
            fail_code: tonic::Code::Internal as i32,
            ..Req::default()
        }),
    )
    .await
    .expect_err("fails");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert_eq!(
        unary_calls(&b) - before,
        1,
        "INTERNAL is not retryable here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_failed_after_its_headers_is_not_retried() {
    let b = EchoServer::start().await;
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &over(&[b.addr], "", "retry = { initial_backoff = \"10ms\" }"),
    )
    .await;
    let mut replies = within(
        "a stream that fails after one reply",
        client.server_stream(Req {
            replies: 1,
            fail_code: tonic::Code::Unavailable as i32,
            fail_message: "late".to_owned(),
            ..Req::default()
        }),
    )
    .await
    .expect("headers")
    .into_inner();
    within("the reply", replies.message())
        .await
        .expect("a reply")
        .expect("one");
    let err = within("the end", replies.message())
        .await
        .expect_err("UNAVAILABLE trailers");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(b.probe.counts().started, 1, "committed: sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_retry_buffer_is_not_retried() {
    let b = EchoServer::start().await;
    b.faults.fail_all.store(true, Relaxed);
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &format!(
            "[retry]\nbuffer_per_call = \"256KiB\"\n{}",
            over(&[b.addr], "", "retry = { initial_backoff = \"10ms\" }")
        ),
    )
    .await;
    let err = within(
        "a 1 MiB call",
        client.unary(Req {
            payload: vec![7u8; 1 << 20].into(),
            ..Req::default()
        }),
    )
    .await
    .expect_err("fails");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(unary_calls(&b), 1, "past the buffer: committed, sent once");
    // A small one is retried.
    within("a small call", client.unary(Req::default()))
        .await
        .expect_err("fails");
    assert_eq!(unary_calls(&b), 1 + 3);
}

/// What uncommitted calls keep is what `retry_buffer_bytes` says, at most
/// `buffer_per_call` each: a call past it keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_keep_at_most_the_retry_buffer_until_they_commit() {
    let b = EchoServer::start().await;
    let (sluice, client) = sluice_with(
        b.addr,
        &format!(
            "[retry]\nbuffer_per_call = \"256KiB\"\n{}",
            over(&[b.addr], "", "retry = { initial_backoff = \"10ms\" }")
        ),
    )
    .await;
    let message = |seq| Req {
        payload: vec![1u8; 64 << 10].into(),
        seq,
        ..Req::default()
    };
    // Two uploads that stay open: one of 2 × 64 KiB, one of 8 × 64 KiB.
    let mut uploads = Vec::new();
    for (count, expected) in [(2u64, 2u64), (8, 10)] {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for i in 0..count {
            tx.send(message(i)).await.expect("queued");
        }
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            client
                .client_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        b.probe
            .wait_for(LIMIT, |c| c.requests_received >= expected)
            .await;
        uploads.push((tx, call));
    }
    let kept = sluice.stats().retry_buffer_bytes;
    // The small one keeps its 2 messages (5-byte prefixes and field tags
    // included); the large one passed 256 KiB and keeps nothing.
    assert!(
        (2 * (64 << 10)..3 * (64 << 10)).contains(&kept),
        "{kept} bytes kept"
    );
    for (tx, call) in uploads {
        drop(tx);
        within("the upload", call)
            .await
            .expect("joined")
            .expect("answered");
    }
    assert_eq!(
        sluice.stats().retry_buffer_bytes,
        0,
        "committed calls keep nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_pushback_stops_or_spaces_retries() {
    let b = EchoServer::start().await;
    b.faults.fail_all.store(true, Relaxed);
    *b.faults.pushback.lock().expect("faults") = Some("-1".to_owned());
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &over(
            &[b.addr],
            "",
            "retry = { max_attempts = 2, initial_backoff = \"10ms\" }",
        ),
    )
    .await;
    within("a call pushed back for good", client.unary(Req::default()))
        .await
        .expect_err("fails");
    assert_eq!(unary_calls(&b), 1, "negative pushback: no retry");
    *b.faults.pushback.lock().expect("faults") = Some("400".to_owned());
    let started = Instant::now();
    within("a call pushed back 400 ms", client.unary(Req::default()))
        .await
        .expect_err("fails");
    assert_eq!(unary_calls(&b), 3, "pushback: retried once");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the retry waited the pushback: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_endpoint_and_never_outlives_the_deadline() {
    let [bad, good] = [EchoServer::start().await, EchoServer::start().await];
    bad.faults.fail_all.store(true, Relaxed);
    let (_sluice, client) = sluice_with(
        good.addr,
        &over(
            &[bad.addr, good.addr],
            "strategy = [\"random\"]",
            "retry = { max_attempts = 2, initial_backoff = \"10ms\" }",
        ),
    )
    .await;
    for _ in 0..20 {
        within("a call", client.clone().unary(Req::default()))
            .await
            .expect("the retry goes to the good endpoint");
    }
    assert!(
        unary_calls(&bad) > 0,
        "the bad endpoint was chosen sometimes"
    );
    // A backoff longer than the deadline is not waited.
    bad.faults.fail_all.store(true, Relaxed);
    good.faults.fail_all.store(true, Relaxed);
    let (_slow, mut client) = sluice_with(
        good.addr,
        &over(
            &[bad.addr, good.addr],
            "",
            "retry = { max_attempts = 5, initial_backoff = \"5s\", max_backoff = \"5s\" }",
        ),
    )
    .await;
    let mut req = tonic::Request::new(Req::default());
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = within("a call with a short deadline", client.unary(req))
        .await
        .expect_err("fails");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_throttling_stops_retries_to_a_failing_group() {
    let b = EchoServer::start().await;
    b.faults.fail_all.store(true, Relaxed);
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &over(
            &[b.addr],
            "retry_throttling = { max_tokens = 4, token_ratio = 0.1 }",
            "retry = { max_attempts = 3, initial_backoff = \"1ms\" }",
        ),
    )
    .await;
    for _ in 0..10 {
        within("a failing call", client.unary(Req::default()))
            .await
            .expect_err("fails");
    }
    // Without the throttle: 30 attempts. With 4 tokens, retries stop once
    // 2 are left: 1 call's 3 attempts… then one attempt per call.
    let attempts = unary_calls(&b);
    assert!(
        attempts <= 13,
        "throttled: {attempts} attempts for 10 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_once_more_without_any_policy() {
    let refusing =
        RawUpstream::start(Behaviour::ResetBeforeHeaders(h2::Reason::REFUSED_STREAM)).await;
    let mut refusing = refusing;
    let good = EchoServer::start().await;
    let (_sluice, client) = sluice_with(
        good.addr,
        &over(&[refusing.addr, good.addr], "strategy = [\"random\"]", ""),
    )
    .await;
    for i in 0..20 {
        within("a call", client.clone().unary(Req::default()))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    let mut refused = 0;
    while refusing.heads.try_recv().is_ok() {
        refused += 1;
    }
    assert!(refused > 0, "some calls met the refusing endpoint first");
    assert_eq!(good.probe.counts().completed, 20);
    // Alone, the refusing endpoint gets each call exactly twice.
    let (_alone, mut client) = sluice_with(refusing.addr, "").await;
    let err = within("a refused call", client.unary(Req::default()))
        .await
        .expect_err("refused twice");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let mut seen = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_millis(200), refusing.heads.recv()).await
    {
        seen += 1;
    }
    assert_eq!(seen, 2, "sent once more, and only once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_answers_when_the_first_endpoint_stalls() {
    let [slow, fast] = [EchoServer::start().await, EchoServer::start().await];
    slow.faults.stall_every.store(1, Relaxed);
    slow.faults.stall_ms.store(2000, Relaxed);
    let (_sluice, client) = sluice_with(
        fast.addr,
        &over(
            &[slow.addr, fast.addr],
            "strategy = [\"random\"]",
            "hedge = { max_attempts = 2, delay = \"100ms\" }",
        ),
    )
    .await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        within("a hedged call", client.clone().unary(Req::default()))
            .await
            .expect("ok");
        slowest = slowest.max(started.elapsed());
    }
    assert!(unary_calls(&slow) > 0, "the slow endpoint was tried");
    assert!(
        slowest < Duration::from_millis(1500),
        "no call waited out the stall: slowest {slowest:?}"
    );
}

/// A hedged call whose request is larger than the retry buffer goes as
/// one attempt, with every byte of its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_request_past_the_buffer_arrives_whole() {
    let b = EchoServer::start().await;
    let (_sluice, mut client) = sluice_with(
        b.addr,
        &format!(
            "[retry]\nbuffer_per_call = \"64KiB\"\n{}",
            over(
                &[b.addr],
                "",
                "hedge = { max_attempts = 2, delay = \"1s\" }"
            )
        ),
    )
    .await;
    for size in [100, 300 << 10] {
        let payload = pattern(size, 3);
        let reply = within(
            "a hedged call",
            client.unary(Req {
                payload: payload.clone(),
                ..Req::default()
            }),
        )
        .await
        .expect("answered")
        .into_inner();
        assert_eq!(reply.payload.len(), size);
        assert!(
            reply.payload == payload,
            "the request arrived whole ({size} B)"
        );
    }
    assert_eq!(b.probe.counts().started, 2, "one attempt each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_fatal_status_starts_the_next_hedge_at_once_and_a_fatal_one_ends_the_call() {
    let [bad, good] = [EchoServer::start().await, EchoServer::start().await];
    bad.faults.fail_all.store(true, Relaxed);
    let hedged = |non_fatal: &str| {
        over(
            &[bad.addr, good.addr],
            "strategy = [\"random\"]",
            &format!(
                "hedge = {{ max_attempts = 2, delay = \"5s\", non_fatal_codes = [{non_fatal}] }}"
            ),
        )
    };
    let (_sluice, client) = sluice_with(good.addr, &hedged("\"UNAVAILABLE\"")).await;
    let started = Instant::now();
    for _ in 0..20 {
        within("a hedged call", client.clone().unary(Req::default()))
            .await
            .expect("the next attempt answers");
    }
    assert!(unary_calls(&bad) > 0, "the failing endpoint was tried");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "no call waited the 5 s hedge delay: {:?}",
        started.elapsed()
    );
    // UNAVAILABLE is fatal when not listed: a call that meets it ends.
    let (_fatal, client) = sluice_with(good.addr, &hedged("")).await;
    let mut failed = 0;
    for _ in 0..20 {
        if let Err(e) = within("a hedged call", client.clone().unary(Req::default())).await {
            assert_eq!(e.code(), tonic::Code::Unavailable);
            failed += 1;
        }
    }
    assert!(failed > 0, "a fatal status ends the call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_then_returns() {
    let [a, b, bad] = [
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    ];
    bad.faults.fail_all.store(true, Relaxed);
    let (_sluice, client) = sluice_with(
        a.addr,
        &over(
            &[a.addr, b.addr, bad.addr],
            "strategy = [\"random\"]\n\
             [upstreams.g.outlier_detection]\ninterval = \"300ms\"\nbase_ejection_time = \"1s\"\n\
             max_ejection_percent = 50\n\
             failure_percentage = { threshold = 50, minimum_hosts = 3, request_volume = 3 }",
            "",
        ),
    )
    .await;
    // Calls until the bad endpoint is ejected: it stops getting calls.
    let started = Instant::now();
    let mut ejected_at = None;
    let mut last = unary_calls(&bad);
    let mut quiet = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let _ = within("a call", client.clone().unary(Req::default())).await;
        let now = unary_calls(&bad);
        if now == last {
            quiet += 1;
            if quiet == 30 {
                ejected_at = Some(started.elapsed());
                break;
            }
        } else {
            quiet = 0;
            last = now;
        }
    }
    let ejected_at = ejected_at.expect("the bad endpoint stopped getting calls");
    assert!(
        ejected_at < Duration::from_millis(1500),
        "ejected within two intervals of its failures (and the calls after): {ejected_at:?}"
    );
    // While ejected, every call succeeds on the other two.
    for _ in 0..20 {
        within("a call while ejected", client.clone().unary(Req::default()))
            .await
            .expect("the others answer");
    }
    // After its ejection time (and the sweep after it), it gets calls again.
    bad.faults.fail_all.store(false, Relaxed);
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let before = unary_calls(&bad);
    for _ in 0..30 {
        within("a call after", client.clone().unary(Req::default()))
            .await
            .expect("ok");
    }
    assert!(unary_calls(&bad) > before, "back after its ejection time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_eject_at_once() {
    let [good, bad] = [EchoServer::start().await, EchoServer::start().await];
    bad.faults.fail_all.store(true, Relaxed);
    let (_sluice, client) = sluice_with(
        good.addr,
        &over(
            &[good.addr, bad.addr],
            "strategy = [\"random\"]\n[upstreams.g.outlier_detection]\nconsecutive_failures = 3\nmax_ejection_percent = 50\n\
             base_ejection_time = \"30s\"",
            "",
        ),
    )
    .await;
    for _ in 0..60 {
        let _ = within("a call", client.clone().unary(Req::default())).await;
    }
    assert_eq!(
        unary_calls(&bad),
        3,
        "ejected after its third failure in a row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_refuses_what_passes_its_rate() {
    let b = EchoServer::start().await;
    let (_sluice, client) = sluice_with(
        b.addr,
        &over(
            &[b.addr],
            "",
            "rate_limit = { rate = 2.0, burst = 5, per = \"x-tenant\" }",
        ),
    )
    .await;
    let call = |tenant: &'static str| {
        let mut client = client.clone();
        async move {
            let mut req = tonic::Request::new(Req::default());
            req.metadata_mut()
                .insert("x-tenant", tenant.parse().expect("value"));
            client.unary(req).await
        }
    };
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..20 {
        match within("a call", call("acme")).await {
            Ok(_) => ok += 1,
            Err(e) => refused.push(e),
        }
    }
    assert!(
        (5..=6).contains(&ok),
        "{ok} of 20 passed a burst of 5 at 2/s"
    );
    let e = &refused[0];
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("rate limit"), "{e:?}");
    // Another tenant has a bucket of its own.
    within("another tenant", call("globex"))
        .await
        .expect("its own bucket");
    assert_eq!(b.probe.counts().started as usize, ok + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_refuses_the_call_over_it() {
    let b = EchoServer::start().await;
    let (_sluice, mut client) =
        sluice_with(b.addr, &over(&[b.addr], "", "max_in_flight = 1")).await;
    let slow = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .unary(Req {
                    delay_ms: 800,
                    ..Req::default()
                })
                .await
        }
    });
    b.probe.wait_for(LIMIT, |c| c.started > c.completed).await;
    let e = within("the second call", client.unary(Req::default()))
        .await
        .expect_err("over max_in_flight");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("max_in_flight"), "{e:?}");
    within("the slow call", slow)
        .await
        .expect("joined")
        .expect("ok");
    within("a call after", client.unary(Req::default()))
        .await
        .expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_unavailable_at_its_max_stream_age() {
    let b = EchoServer::start().await;
    let (_sluice, mut client) =
        sluice_with(b.addr, &over(&[b.addr], "", "max_stream_age = \"500ms\"")).await;
    let started = Instant::now();
    let mut replies = within(
        "a long stream",
        client.server_stream(Req {
            replies: 1000,
            delay_ms: 20,
            ..Req::default()
        }),
    )
    .await
    .expect("headers")
    .into_inner();
    let mut got = 0;
    let err = loop {
        match within("a reply", replies.message()).await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream ended OK after {got} replies"),
            Err(e) => break e,
        }
    };
    let age = started.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("max_stream_age"), "{err:?}");
    assert!(got > 5, "replies flowed until then: {got}");
    assert!(
        age >= Duration::from_millis(500) && age < Duration::from_millis(1500),
        "ended at its age (+ up to 10 %): {age:?}"
    );
    b.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_their_share_of_calls() {
    let b = EchoServer::start().await;
    let (_sluice, client) = sluice_with(
        b.addr,
        &over(
            &[b.addr],
            "",
            "fault = { abort_code = \"UNAVAILABLE\", abort_percent = 30, headers = true }",
        ),
    )
    .await;
    let mut aborted = 0;
    let calls = 1000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut aborted = 0;
            for _ in 0..calls / 8 {
                match client.unary(Req::default()).await {
                    Ok(_) => {}
                    Err(e) if e.code() == tonic::Code::Unavailable => {
                        assert!(e.message().contains("fault injected"), "{e:?}");
                        aborted += 1;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            aborted
        });
    }
    while let Some(n) = within("the calls", tasks.join_next()).await {
        aborted += n.expect("joined");
    }
    assert!(
        (250..=350).contains(&aborted),
        "{aborted} of {calls} aborted at 30 %"
    );
    assert_eq!(b.probe.counts().started, (calls - aborted) as u64);
    // A call may ask for its own delay when headers are on.
    let mut req = tonic::Request::new(Req::default());
    req.metadata_mut()
        .insert("x-envoy-fault-delay-request", "300".parse().expect("value"));
    req.metadata_mut().insert(
        "x-envoy-fault-abort-request-percentage",
        "0".parse().expect("value"),
    );
    let started = Instant::now();
    within("a delayed call", client.clone().unary(req))
        .await
        .expect("ok");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_age_gets_goaway_and_its_calls_finish() {
    let b = EchoServer::start().await;
    trace_init();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connection_age = \"300ms\"\n\
         [admin]\nlisten = \"off\"\n[upstream]\naddress = \"{}\"\n",
        b.addr
    );
    let sluice = sluice::run(&sluice::Config::from_toml_str(&text).expect("config"))
        .await
        .expect("sluice");
    let tcp = tokio::net::TcpStream::connect(sluice.listen_addr())
        .await
        .expect("connect");
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let started = Instant::now();
    let (response, _body) = send_call(
        &mut h2,
        grpc_head("Unary"),
        &Req {
            delay_ms: 700,
            ..Req::default()
        },
    );
    let response = within("the call across the age", response)
        .await
        .expect("answered");
    let mut body = response.into_body();
    while let Some(chunk) = within("its body", body.data()).await {
        chunk.expect("data");
    }
    let trailers = within("its trailers", body.trailers())
        .await
        .expect("trailers")
        .expect("some");
    assert_eq!(trailers["grpc-status"], "0");
    // The connection closes once its call is done: GOAWAY, then the end.
    within("the connection's end", conn)
        .await
        .expect("joined")
        .expect("a clean close");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(
        h2.clone().ready().await.is_err(),
        "no new stream after GOAWAY"
    );
}
