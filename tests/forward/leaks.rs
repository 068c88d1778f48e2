//! Point 9: nothing leaks. Thousands of calls, ending every way a call can
//! end, leave sluice's calls, pumps and tasks back at their baseline.

use std::{sync::Arc, time::Duration};

use sluice_testkit::Req;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

const CALLS: usize = 2000;
const CONCURRENCY: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_ending_every_way_leave_no_task_or_call_behind() {
    let p = proxied().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up: the client connection and sluice's upstream connection exist.
    within("warm-up", p.client.clone().unary(Req::default()))
        .await
        .expect("ok");
    eventually("warm-up settles", || p.sluice.stats().calls_in_flight == 0).await;
    let baseline_tasks = metrics.num_alive_tasks();
    let baseline = p.sluice.stats();

    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let mut client = p.client.clone();
        calls.spawn(async move {
            let _permit = permit;
            one_call(&mut client, i).await;
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("call task");
    }

    eventually("calls and pumps drain", || {
        let s = p.sluice.stats();
        s.calls_in_flight == 0 && s.request_pumps == 0
    })
    .await;
    let probe = &p.upstream.probe;
    eventually("the upstream sees every call end", || {
        let c = probe.counts();
        c.started == c.completed + c.cancelled
    })
    .await;
    eventually("tasks return to baseline", || {
        metrics.num_alive_tasks() <= baseline_tasks
    })
    .await;
    let after = p.sluice.stats();
    assert_eq!(
        after.downstream_connections,
        baseline.downstream_connections
    );
    assert_eq!(after.upstream_connections, baseline.upstream_connections);
    let c = probe.counts();
    // Every call must have reached the upstream but the abandoned ones (one
    // in eight, given 5 ms) and the ones whose 20 ms deadline may pass in
    // sluice on a loaded machine (one in eight).
    assert!(c.started >= (CALLS - CALLS / 4) as u64, "{c:?}");
    assert!(c.cancelled > 0 && c.completed > 0, "{c:?}");
}

/// One call, ending in the way `i` picks.
async fn one_call(client: &mut sluice_testkit::EchoClient<tonic::transport::Channel>, i: usize) {
    match i % 8 {
        // OK unary.
        0 => {
            client.unary(Req::default()).await.expect("ok");
        }
        // Failed unary.
        1 => {
            let _ = client
                .unary(Req {
                    fail_code: 5,
                    ..Req::default()
                })
                .await
                .expect_err("fails");
        }
        // A complete server stream.
        2 => {
            let mut s = client
                .server_stream(Req {
                    replies: 5,
                    ..Req::default()
                })
                .await
                .expect("ok")
                .into_inner();
            while s.message().await.expect("ok").is_some() {}
        }
        // A server stream the client drops after one reply.
        3 => {
            let mut s = client
                .server_stream(Req {
                    replies: 1000,
                    ..Req::default()
                })
                .await
                .expect("ok")
                .into_inner();
            s.message().await.expect("ok");
        }
        // A client stream the upstream ends early, while the client sends.
        4 => {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(Req {
                fail_code: 9,
                ..Req::default()
            })
            .await
            .expect("queue");
            let _ = client.client_stream(ReceiverStream::new(rx)).await;
        }
        // A bidi ping-pong, closed by the client.
        5 => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut s = client
                .bidi(ReceiverStream::new(rx))
                .await
                .expect("ok")
                .into_inner();
            for seq in 0..3 {
                tx.send(Req {
                    seq,
                    ..Req::default()
                })
                .await
                .expect("open");
                s.message().await.expect("ok");
            }
            drop(tx);
            while s.message().await.expect("ok").is_some() {}
        }
        // A deadline sluice enforces mid-stream.
        6 => {
            let mut req = tonic::Request::new(hanging());
            req.set_timeout(Duration::from_millis(20));
            if let Ok(res) = client.server_stream(req).await {
                let mut s = res.into_inner();
                let status = s.message().await.expect_err("deadline");
                assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
            }
        }
        // A unary call the client abandons before any answer.
        _ => {
            let call = client.unary(Req {
                delay_ms: 10_000,
                ..Req::default()
            });
            let _ = tokio::time::timeout(Duration::from_millis(5), call).await;
        }
    }
}
