//! The load every process-level bench drives: the same workloads, with the
//! same shapes, whoever the target is.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use sluice_testkit::{EchoClient, Req};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub(crate) const CONNECTIONS: usize = 4;
pub(crate) const UNARY_PER_CONNECTION: usize = 64;
pub(crate) const UNARY_PAYLOAD: usize = 256;
pub(crate) const BIDI_STREAMS: usize = 64;
pub(crate) const BIDI_PAYLOAD: usize = 64;
pub(crate) const SERVER_STREAMS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    Unary,
    /// One client making one unary call after another (one in flight): the
    /// connection goes idle between calls.
    UnarySequential,
    /// Open loop: unary calls started at a fixed rate ([`OPEN_LOOP_RATE`]
    /// per second, a sidecar's usual load) whatever the answers do, each
    /// timed from when it was due.
    OpenLoop,
    Bidi,
    Stream1K,
    Stream64K,
}

/// Calls per second of the open-loop workload.
pub(crate) const OPEN_LOOP_RATE: u64 = 2_000;

impl Workload {
    pub(crate) const ALL: [Self; 6] = [
        Self::Unary,
        Self::UnarySequential,
        Self::OpenLoop,
        Self::Bidi,
        Self::Stream1K,
        Self::Stream64K,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::UnarySequential => "unary1",
            Self::OpenLoop => "open2k",
            Self::Bidi => "bidi",
            Self::Stream1K => "stream1k",
            Self::Stream64K => "stream64k",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == name)
    }

    pub(crate) fn unit(self) -> &'static str {
        match self {
            Self::Unary | Self::UnarySequential | Self::OpenLoop => "calls",
            Self::Bidi => "round trips",
            Self::Stream1K | Self::Stream64K => "messages",
        }
    }

    pub(crate) fn bytes_per_op(self) -> f64 {
        match self {
            Self::Unary | Self::UnarySequential | Self::OpenLoop => (2 * UNARY_PAYLOAD) as f64,
            Self::Bidi => (2 * BIDI_PAYLOAD) as f64,
            Self::Stream1K => 1024.0,
            Self::Stream64K => 65536.0,
        }
    }
}

pub(crate) fn clients(addr: SocketAddr) -> Vec<EchoClient<Channel>> {
    (0..CONNECTIONS)
        .map(|_| sluice_testkit::client(addr))
        .collect()
}

/// Runs `workload` against `addr` for `dur`; returns operations, seconds
/// and per-operation latencies (µs).
pub(crate) async fn run_load(
    addr: SocketAddr,
    workload: Workload,
    dur: Duration,
) -> (u64, f64, Vec<u32>) {
    run_load_on(clients(addr), workload, dur).await
}

/// [`run_load`] over `clients` (one per connection, [`CONNECTIONS`] of
/// them), however they connect.
pub(crate) async fn run_load_on(
    clients: Vec<EchoClient<Channel>>,
    workload: Workload,
    dur: Duration,
) -> (u64, f64, Vec<u32>) {
    for c in &clients {
        c.clone().unary(Req::default()).await.expect("warm-up call");
    }
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = tokio::task::JoinSet::new();
    match workload {
        Workload::Unary => {
            let payload = bytes::Bytes::from(vec![7u8; UNARY_PAYLOAD]);
            for i in 0..CONNECTIONS * UNARY_PER_CONNECTION {
                let mut client = clients[i % CONNECTIONS].clone();
                let payload = payload.clone();
                tasks.spawn(async move {
                    let mut lat = Vec::with_capacity(1 << 12);
                    while Instant::now() < end {
                        let t = Instant::now();
                        let req = Req {
                            payload: payload.clone(),
                            ..Req::default()
                        };
                        client.unary(req).await.expect("unary call");
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                    lat
                });
            }
        }
        Workload::UnarySequential => {
            let mut client = clients[0].clone();
            tasks.spawn(async move {
                let mut lat = Vec::with_capacity(1 << 14);
                let payload = bytes::Bytes::from(vec![7u8; UNARY_PAYLOAD]);
                while Instant::now() < end {
                    let t = Instant::now();
                    let req = Req {
                        payload: payload.clone(),
                        ..Req::default()
                    };
                    client.unary(req).await.expect("unary call");
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            });
        }
        Workload::OpenLoop => {
            let payload = bytes::Bytes::from(vec![7u8; UNARY_PAYLOAD]);
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / OPEN_LOOP_RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut k = 0;
            loop {
                let due = tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                let mut client = clients[k % CONNECTIONS].clone();
                k += 1;
                let payload = payload.clone();
                tasks.spawn(async move {
                    let req = Req {
                        payload,
                        ..Req::default()
                    };
                    client.unary(req).await.expect("unary call");
                    vec![due.elapsed().as_micros() as u32]
                });
            }
        }
        Workload::Bidi => {
            for i in 0..BIDI_STREAMS {
                let mut client = clients[i % CONNECTIONS].clone();
                tasks.spawn(async move {
                    let (tx, rx) = mpsc::channel(1);
                    let mut replies = client
                        .bidi(ReceiverStream::new(rx))
                        .await
                        .expect("bidi call")
                        .into_inner();
                    let mut lat = Vec::with_capacity(1 << 12);
                    let payload = bytes::Bytes::from(vec![1u8; BIDI_PAYLOAD]);
                    let mut seq = 0;
                    while Instant::now() < end {
                        let t = Instant::now();
                        let req = Req {
                            seq,
                            payload: payload.clone(),
                            ..Req::default()
                        };
                        tx.send(req).await.expect("send");
                        replies.message().await.expect("reply").expect("a reply");
                        lat.push(t.elapsed().as_micros() as u32);
                        seq += 1;
                    }
                    drop(tx);
                    while replies.message().await.ok().flatten().is_some() {}
                    lat
                });
            }
        }
        Workload::Stream1K | Workload::Stream64K => {
            let size = workload.bytes_per_op() as u32;
            for i in 0..SERVER_STREAMS {
                let mut client = clients[i % CONNECTIONS].clone();
                tasks.spawn(async move {
                    let mut stream = client
                        .server_stream(Req {
                            replies: u32::MAX,
                            reply_size: size,
                            ..Req::default()
                        })
                        .await
                        .expect("server stream")
                        .into_inner();
                    let mut gaps = Vec::with_capacity(1 << 14);
                    let mut t = Instant::now();
                    while Instant::now() < end {
                        stream.message().await.expect("message").expect("more");
                        gaps.push(t.elapsed().as_micros() as u32);
                        t = Instant::now();
                    }
                    gaps
                });
            }
        }
    }
    let mut all = Vec::new();
    while let Some(lat) = tasks.join_next().await {
        all.extend(lat.expect("load task"));
    }
    (all.len() as u64, start.elapsed().as_secs_f64(), all)
}
