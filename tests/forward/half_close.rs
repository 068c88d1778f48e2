//! Point 4: the client's END_STREAM reaches the upstream while the response
//! side stays open; half-duplex and ping-pong bidi calls work.

use sluice_testkit::Req;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_ends_when_the_client_half_closes() {
    let mut p = proxied().await;
    let reqs: Vec<Req> = (0..50)
        .map(|i| Req {
            payload: pattern(100 + i, i as u8),
            ..Req::default()
        })
        .collect();
    let reply = within(
        "client stream",
        p.client.client_stream(tokio_stream::iter(reqs)),
    )
    .await
    .expect("ok")
    .into_inner();
    assert_eq!(reply.seq, 50, "the upstream counted every message");
    assert_eq!(reply.payload, pattern(149, 49));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_duplex_bidi_sends_everything_then_reads_everything() {
    let mut p = proxied().await;
    let reqs: Vec<Req> = (0..200)
        .map(|seq| Req {
            seq,
            payload: pattern(64, seq as u8),
            ..Req::default()
        })
        .collect();
    let mut replies = within("bidi", p.client.bidi(tokio_stream::iter(reqs)))
        .await
        .expect("headers")
        .into_inner();
    let mut seq = 0;
    while let Some(reply) = within("reply", replies.message()).await.expect("ok") {
        assert_eq!(reply.seq, seq);
        assert_eq!(reply.payload, pattern(64, seq as u8));
        seq += 1;
    }
    assert_eq!(seq, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_bidi_does_not_deadlock() {
    let mut p = proxied().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = within("bidi", p.client.bidi(ReceiverStream::new(rx)))
        .await
        .expect("headers")
        .into_inner();
    for seq in 0..100 {
        tx.send(Req {
            seq,
            payload: pattern(10, seq as u8),
            ..Req::default()
        })
        .await
        .expect("request stream open");
        // The next message is sent only once this reply came back.
        let reply = within("pong", replies.message())
            .await
            .expect("ok")
            .expect("a reply per message");
        assert_eq!(reply.seq, seq);
    }
    drop(tx); // half-close: the upstream ends its side, OK
    assert!(
        within("end", replies.message())
            .await
            .expect("ok status")
            .is_none()
    );
    assert_eq!(p.upstream.probe.counts().cancelled, 0);
}
