//! Point 2: DATA passes in order, byte-exact, with no message-size limit,
//! and a client that stops reading stalls the upstream instead of growing
//! sluice.

use std::time::Duration;

use bytes::Bytes;
use sluice_testkit::Req;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_pass_byte_exact_with_no_size_limit() {
    let mut p = proxied().await;
    // 20 MiB each way: far above gRPC's usual 4 MiB default cap.
    let payload = pattern(20 << 20, 7);
    let reply = within(
        "unary",
        p.client.unary(Req {
            payload: payload.clone(),
            ..Req::default()
        }),
    )
    .await
    .expect("ok")
    .into_inner();
    assert_eq!(reply.payload.len(), payload.len());
    assert!(reply.payload == payload, "payload changed on the way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_messages_arrive_in_order_and_intact() {
    let mut p = proxied().await;
    let req = Req {
        replies: 500,
        payload: pattern(3000, 1),
        ..Req::default()
    };
    let mut stream = within("server stream", p.client.server_stream(req))
        .await
        .expect("headers")
        .into_inner();
    let mut seq = 0;
    while let Some(reply) = within("reply", stream.message()).await.expect("ok") {
        assert_eq!(reply.seq, seq);
        assert_eq!(reply.payload, pattern(3000, 1));
        seq += 1;
    }
    assert_eq!(seq, 500);
}

/// A client that stops reading a 64 MiB stream: sluice must stop pulling
/// from the upstream once the windows are full and hold no more than they
/// allow; the stream resumes when the client reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stalls_the_upstream_not_sluice() {
    let p = proxied().await;
    let mut h2 = raw_client(p.sluice.listen_addr()).await;
    const REPLIES: u32 = 1024;
    const SIZE: u32 = 64 << 10;
    let (response, mut body) = send_call(
        &mut h2,
        grpc_head("ServerStream"),
        &Req {
            replies: REPLIES,
            reply_size: SIZE,
            ..Req::default()
        },
    );
    let res = within("headers", response).await.expect("headers");
    let mut recv = res.into_body();
    // The raw client never releases capacity while it is not reading: its
    // 64 KiB stream window fills, then sluice's 256 KiB upstream window.
    p.upstream
        .probe
        .wait_for(LIMIT, |c| c.replies_sent >= 4)
        .await;
    // A stall can only be seen over time: give the upstream every chance to
    // run ahead, then check it did not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ahead = p.upstream.probe.counts().replies_sent;
    // Windows: client 64 KiB + sluice upstream stream 256 KiB, plus the
    // upstream's own buffers (tonic encodes ahead, hyper buffers up to
    // 400 KiB) — about 13 replies of 64 KiB. Unbounded buffering would have
    // taken all 1024.
    assert!(
        ahead <= 24,
        "upstream ran {ahead} replies ({} MiB) ahead of a stalled client",
        (ahead * u64::from(SIZE)) >> 20
    );

    // Reading again resumes the stream where it stopped...
    let mut bytes = 0usize;
    let mut flow = recv.flow_control().clone();
    while bytes < 8 << 20 {
        let chunk: Bytes = within("data", recv.data())
            .await
            .expect("the stream goes on")
            .expect("data");
        bytes += chunk.len();
        flow.release_capacity(chunk.len()).expect("release");
    }
    assert!(p.upstream.probe.counts().replies_sent >= 8 << 20 >> 16);
    // ...and abandoning it cancels the upstream instead of draining it into
    // sluice.
    drop(recv);
    body.send_reset(h2::Reason::CANCEL);
    let counts = p.upstream.probe.wait_for(LIMIT, |c| c.cancelled == 1).await;
    assert!(counts.replies_sent < u64::from(REPLIES), "{counts:?}");
}
