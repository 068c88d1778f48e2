//! Reverse tunnels under load: 100 agents (in this process, each a real
//! `sluice::run` forwarding to one tonic echo server) dial one hub (the
//! real release binary, a child process, so its CPU and RSS are its own);
//! 10 calls per agent are kept in flight through the hub, each addressed
//! to its agent by `x-dest-host`. Prints RPC/s through the hub as a ratio
//! to the same load sent directly to the echo server, the hub's CPU per
//! call, and the hub's memory per connected agent. Bounded: agents and
//! calls by count, each phase by `SLUICE_BENCH_SECS` (default 4 s).

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use sluice_testkit::{EchoClient, EchoServer, Req};
use support::{SluiceProcess, percentile};
use tonic::transport::Channel;

const AGENTS: usize = 100;
const PER_AGENT: usize = 10;
const CONNECTIONS: usize = 4;

fn phase() -> Duration {
    Duration::from_secs_f64(
        std::env::var("SLUICE_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4.0),
    )
}

/// `AGENTS × PER_AGENT` callers, each calling in a loop until `dur` ends;
/// with `dest`, each caller's calls carry its agent's id.
async fn load(addr: SocketAddr, dest: bool, dur: Duration) -> (u64, f64, Vec<u32>) {
    let clients: Vec<EchoClient<Channel>> = (0..CONNECTIONS)
        .map(|_| sluice_testkit::client(addr))
        .collect();
    let end = Instant::now() + dur;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..AGENTS * PER_AGENT {
        let mut client = clients[i % CONNECTIONS].clone();
        let agent = format!("agent-{}", i % AGENTS);
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(1024);
            while Instant::now() < end {
                let mut req = tonic::Request::new(Req {
                    payload: vec![7u8; 256].into(),
                    ..Req::default()
                });
                if dest {
                    req.metadata_mut()
                        .insert("x-dest-host", agent.parse().expect("ascii"));
                }
                let t = Instant::now();
                client.unary(req).await.expect("a call through the hub");
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(lat) = tasks.join_next().await {
        all.extend(lat.expect("caller"));
    }
    (all.len() as u64, start.elapsed().as_secs_f64(), all)
}

fn main() {
    let dur = phase();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let app = EchoServer::start().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tunnel-hub-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            format!(
                "[tunnel.hub]\nallow_anonymous = true\nlisten = \"127.0.0.1:{port}\"\nname = \"hub-1\"\n\
                 [[routes]]\nupstream = \"agents\"\n"
            ),
        )
        .expect("hub config");
        let hub = SluiceProcess::start(&[
            "--config",
            &path.to_string_lossy(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ]);
        let rss_before = hub.rss_kib();
        let mut agents = Vec::with_capacity(AGENTS);
        for i in 0..AGENTS {
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
                 [upstream]\naddress = \"{}\"\n\
                 [tunnel.agent]\nhubs = [\"127.0.0.1:{port}\"]\nid = \"agent-{i}\"\n",
                app.addr
            );
            let config = sluice::Config::from_toml_str(&text).expect("agent config");
            agents.push(sluice::run(&config).await.expect("agent"));
        }
        let connected = Instant::now();
        while agents.iter().any(|a| a.agent_tunnels().is_none_or(|t| t.claimed == 0)) {
            assert!(connected.elapsed() < Duration::from_secs(30), "agents did not connect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every agent's tunnel is claimed; give the hub a moment to finish
        // the HTTP/2 side of the last ones before reading its memory.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let per_agent = (hub.rss_kib().saturating_sub(rss_before)) as f64 / AGENTS as f64;
        println!(
            "tunnel: {AGENTS} agents × {PER_AGENT} calls in flight, {CONNECTIONS} client connections to the hub, unary 256 B, {dur:?} per phase"
        );
        println!("hub memory per connected agent (idle): {per_agent:.1} KiB");

        let (direct_ops, direct_secs, mut direct_lat) = load(app.addr, false, dur).await;
        let cpu0 = hub.cpu_secs();
        let (ops, secs, mut lat) = load(hub.addr, true, dur).await;
        let cpu = (hub.cpu_secs() - cpu0) / ops as f64 * 1e6;
        let (direct_rps, rps) = (direct_ops as f64 / direct_secs, ops as f64 / secs);
        println!(
            "direct {direct_rps:>9.0} rpc/s p50 {:>7.0}µs p99 {:>7.0}µs | through the hub {rps:>9.0} rpc/s p50 {:>7.0}µs p99 {:>7.0}µs | ratio {:.2}",
            percentile(&mut direct_lat, 0.5),
            percentile(&mut direct_lat, 0.99),
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            rps / direct_rps
        );
        println!("hub CPU {cpu:.1} µs per call (the agents' CPU is this process's, not counted)");
        println!("hub RSS under load: {:.1} MiB", hub.rss_kib() as f64 / 1024.0);
        drop(agents);
    });
}
