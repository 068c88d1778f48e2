//! End-to-end load: a tonic client → sluice → a tonic echo server, and the
//! same client → the echo server directly, in one run on loopback. Prints
//! RPC/s (MB/s), p50/p99 and the ratio through-sluice ÷ direct, plus
//! sluice's RSS under load, its CPU time per call, and its memory per idle
//! downstream connection.
//!
//! sluice runs as the real release binary (a child process), so its RSS and
//! CPU are its own. Every phase is bounded in time; the whole run takes
//! about a minute. `SLUICE_BENCH_SECS` changes the length of each phase.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{
    SluiceProcess,
    load::{
        BIDI_STREAMS, CONNECTIONS, SERVER_STREAMS, UNARY_PAYLOAD, UNARY_PER_CONNECTION, Workload,
        run_load, run_load_on,
    },
    percentile,
};

use sluice_testkit::EchoServer;

const UNARY_IN_FLIGHT: usize = CONNECTIONS * UNARY_PER_CONNECTION;
const IDLE_CONNECTIONS: usize = 500;

fn phase() -> Duration {
    let secs = std::env::var("SLUICE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    Duration::from_secs_f64(secs)
}

/// Starts sluice in front of `upstream`, with `workers` runtime threads
/// when given, and `extra` config (routes, groups) appended.
fn start_sluice(
    upstream: SocketAddr,
    workers: Option<usize>,
    extra: &str,
    tag: &str,
) -> SluiceProcess {
    let up = upstream.to_string();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("e2e-{}-{tag}.toml", std::process::id()));
    let path_text = path.to_string_lossy().into_owned();
    let mut text = String::new();
    if let Some(workers) = workers {
        text.push_str(&format!("[runtime]\nworker_threads = {workers}\n"));
    }
    text.push_str(extra);
    std::fs::write(&path, text).expect("write bench config");
    SluiceProcess::start(&[
        "--config",
        &path_text,
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--admin",
        "off",
    ])
}

#[derive(Clone, Copy, Debug, Default)]
struct Result {
    ops_per_sec: f64,
    mb_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    ops: u64,
}

/// Runs `workload` (the same load the peers bench drives) against `addr`.
async fn measure(addr: SocketAddr, workload: Workload, dur: Duration) -> Result {
    let (ops, secs, mut lat) = run_load(addr, workload, dur).await;
    Result {
        ops_per_sec: ops as f64 / secs,
        mb_per_sec: ops as f64 * workload.bytes_per_op() / secs / 1e6,
        p50_us: percentile(&mut lat, 0.50),
        p99_us: percentile(&mut lat, 0.99),
        ops,
    }
}

/// A client connection's driver, plaintext or TLS.
type ConnTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Memory sluice needs per idle downstream connection: open many h2
/// connections (over TLS with `tls`) that do nothing, and divide the RSS
/// growth.
async fn idle_connection_cost(
    sluice: &SluiceProcess,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> f64 {
    let before = sluice.rss_kib();
    let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let tcp = tokio::net::TcpStream::connect(sluice.addr)
            .await
            .expect("connect");
        let (send, conn) = match tls {
            None => {
                let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
                (
                    send,
                    Box::pin(async move {
                        let _ = conn.await;
                    }) as ConnTask,
                )
            }
            Some(tls) => {
                let tls = tls
                    .connect("localhost".try_into().expect("name"), tcp)
                    .await
                    .expect("tls handshake");
                let (send, conn) = h2::client::handshake(tls).await.expect("handshake");
                (
                    send,
                    Box::pin(async move {
                        let _ = conn.await;
                    }) as ConnTask,
                )
            }
        };
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        conns.push((send, task));
    }
    // Let sluice process every handshake: a ready SendRequest means the
    // server's SETTINGS arrived.
    for (send, _) in &mut conns {
        let _ = std::future::poll_fn(|cx| send.poll_ready(cx)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = sluice.rss_kib();
    for (_, task) in conns {
        task.abort();
    }
    (after.saturating_sub(before) as f64 * 1024.0) / IDLE_CONNECTIONS as f64
}

/// How many TLS handshakes the handshake-cost phase makes at most, and how
/// many at once.
const HANDSHAKES: usize = 20_000;
const HANDSHAKES_AT_ONCE: usize = 8;

/// TLS clients of `addr`, one per connection, trusting `pki`'s CA.
fn tls_clients(
    addr: SocketAddr,
    pki: &sluice_testkit::pki::Pki,
) -> Vec<sluice_testkit::EchoClient<tonic::transport::Channel>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    (0..CONNECTIONS)
        .map(|_| {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pki.ca_pem()))
                .domain_name("localhost");
            let channel = Endpoint::from_shared(format!("https://{addr}"))
                .expect("uri")
                .tcp_nodelay(true)
                .tls_config(tls)
                .expect("tls")
                .connect_lazy();
            sluice_testkit::EchoClient::new(channel)
        })
        .collect()
}

fn tls_connector(pki: &sluice_testkit::pki::Pki) -> tokio_rustls::TlsConnector {
    pki.connector(&[b"h2"], rustls::DEFAULT_VERSIONS)
}

/// New TLS connections to `addr`, each to the point where sluice's HTTP/2
/// SETTINGS arrived, [`HANDSHAKES_AT_ONCE`] at a time, until
/// [`HANDSHAKES`] or `dur`; returns how many were made.
async fn handshakes(addr: SocketAddr, pki: &sluice_testkit::pki::Pki, dur: Duration) -> usize {
    let connector = tls_connector(pki);
    let end = Instant::now() + dur;
    let made = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..HANDSHAKES_AT_ONCE {
        let (connector, made) = (connector.clone(), made.clone());
        tasks.spawn(async move {
            while Instant::now() < end
                && made.load(std::sync::atomic::Ordering::Relaxed) < HANDSHAKES
            {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let tls = connector
                    .connect("localhost".try_into().expect("name"), tcp)
                    .await
                    .expect("handshake");
                let (mut send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                std::future::poll_fn(|cx| send.poll_ready(cx))
                    .await
                    .expect("settings");
                drop(send);
                task.abort();
                made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    made.load(std::sync::atomic::Ordering::Relaxed)
}

fn report(name: &str, direct: Result, through: Result, unit: &str) {
    let ratio = through.ops_per_sec / direct.ops_per_sec;
    println!(
        "{name:<24} direct {:>9.0} {unit}/s {:>8.1} MB/s p50 {:>7.0}µs p99 {:>7.0}µs | sluice {:>9.0} {unit}/s {:>8.1} MB/s p50 {:>7.0}µs p99 {:>7.0}µs | ratio {ratio:.2}",
        direct.ops_per_sec,
        direct.mb_per_sec,
        direct.p50_us,
        direct.p99_us,
        through.ops_per_sec,
        through.mb_per_sec,
        through.p50_us,
        through.p99_us,
    );
}

/// `n` generated routes: every other one by an exact `x-tenant` value,
/// the rest by the exact method of another service.
fn many_routes(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        if i % 2 == 0 {
            text.push_str(&format!(
                "[[routes]]\nmetadata = {{ \"x-tenant\" = {{ equals = \"tenant-{i}\" }} }}\nupstream = \"default\"\n"
            ));
        } else {
            text.push_str(&format!(
                "[[routes]]\nmethod = \"/svc{i}.v1.Things/Get\"\nupstream = \"default\"\n"
            ));
        }
    }
    text
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let dur = phase();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    client_rt.block_on(async {
        let upstream = EchoServer::start().await;
        let workers = std::env::var("SLUICE_BENCH_WORKERS").ok().and_then(|w| w.parse().ok());
        let sluice = start_sluice(upstream.addr, workers, "", "plain");
        // The routed variant: two upstream groups (a second echo server),
        // every unary call matched by a method route to the second group.
        let second = EchoServer::start().await;
        let routed = start_sluice(
            upstream.addr,
            workers,
            &format!(
                "[upstreams.second]\nendpoints = [\"{}\"]\n\
                 [[routes]]\nmethod = \"/sluice.test.Echo/Stream*\"\nupstream = \"default\"\n\
                 [[routes]]\nmethod = \"/sluice.test.Echo/Un*\"\nupstream = \"second\"\n",
                second.addr
            ),
            "routed",
        );
        let started = Instant::now();
        println!(
            "e2e: {CONNECTIONS} connections; unary {UNARY_PAYLOAD} B x {UNARY_IN_FLIGHT} in flight; \
             {SERVER_STREAMS} server streams; {BIDI_STREAMS} bidi ping-pong streams; {dur:?} per phase"
        );

        let mut peak_rss = sluice.rss_kib();
        let direct = measure(upstream.addr, Workload::Unary, dur).await;
        let cpu0 = sluice.cpu_secs();
        let through = measure(sluice.addr, Workload::Unary, dur).await;
        let cpu_per_call = (sluice.cpu_secs() - cpu0) / through.ops as f64 * 1e6;
        peak_rss = peak_rss.max(sluice.rss_kib());
        report("unary 256 B", direct, through, "rpc");
        println!("{:<24} sluice CPU {cpu_per_call:.1} µs per call", "");
        let direct1 = measure(upstream.addr, Workload::UnarySequential, dur).await;
        let cpu0 = sluice.cpu_secs();
        let through1 = measure(sluice.addr, Workload::UnarySequential, dur).await;
        let cpu_seq = (sluice.cpu_secs() - cpu0) / through1.ops as f64 * 1e6;
        report("unary, 1 in flight", direct1, through1, "rpc");
        println!("{:<24} sluice CPU {cpu_seq:.1} µs per call", "");
        let cpu0 = routed.cpu_secs();
        let through_routed = measure(routed.addr, Workload::Unary, dur).await;
        let cpu_routed = (routed.cpu_secs() - cpu0) / through_routed.ops as f64 * 1e6;
        report("unary 256 B, routed", direct, through_routed, "rpc");
        println!("{:<24} sluice CPU {cpu_routed:.1} µs per call (2 groups, method routes)", "");
        assert!(second.probe.counts().completed > 0, "the routed calls reached the second group");
        drop(routed);

        // A retry policy that never acts (the upstream never fails): it
        // must cost nothing until it is used. Both routed the same way, so
        // the policy is the only difference; measured in turns (A B B A
        // A B B A), medians, as the machine's speed drifts.
        let route = |policy: &str| {
            format!(
                "[upstreams.second]\nendpoints = [\"{}\"]\n\
                 [[routes]]\nmethod = \"/sluice.test.Echo/Un*\"\nupstream = \"second\"\n{policy}\n",
                second.addr
            )
        };
        let bare = start_sluice(upstream.addr, workers, &route(""), "no-policy");
        let retrying = start_sluice(
            upstream.addr,
            workers,
            &route("retry = { max_attempts = 3, initial_backoff = \"10ms\" }"),
            "retry-policy",
        );
        let (mut cpu_bare, mut cpu_retry) = (Vec::new(), Vec::new());
        for turn in 0..4 {
            // Each goes first in every other turn: whichever runs second
            // in a turn was measured slower, whichever it was.
            let mut pair = [(&bare, &mut cpu_bare), (&retrying, &mut cpu_retry)];
            if turn % 2 == 1 {
                pair.reverse();
            }
            for (p, out) in pair {
                let cpu0 = p.cpu_secs();
                let r = measure(p.addr, Workload::Unary, dur / 2).await;
                out.push((p.cpu_secs() - cpu0) / r.ops as f64 * 1e6);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        let (b, r) = (median(&mut cpu_bare), median(&mut cpu_retry));
        println!(
            "{:<24} sluice CPU {r:.1} µs per call with a retry policy, {b:.1} without: {:.3}x",
            "unary, retry policy",
            r / b
        );
        drop(bare);
        drop(retrying);

        // The access log on (JSON lines to stdout, which the bench
        // discards): what a logged call costs beside an unlogged one.
        let logged = start_sluice(
            upstream.addr,
            workers,
            "[log]\nformat = \"json\"\naccess = true\n",
            "access-log",
        );
        let cpu0 = logged.cpu_secs();
        let through_logged = measure(logged.addr, Workload::Unary, dur).await;
        let cpu_logged = (logged.cpu_secs() - cpu0) / through_logged.ops as f64 * 1e6;
        report("unary, access log on", direct, through_logged, "rpc");
        println!(
            "{:<24} sluice CPU {cpu_logged:.1} µs per call = {:.2}x an unlogged call's",
            "",
            cpu_logged / cpu_per_call
        );
        drop(logged);

        // 10,000 routes (half by metadata value, half by exact method of
        // other services): the unary calls match none and take the
        // fallback, the worst case for a table tried route by route.
        let many = start_sluice(upstream.addr, workers, &many_routes(10_000), "many-routes");
        let cpu0 = many.cpu_secs();
        let through_many = measure(many.addr, Workload::Unary, dur).await;
        let cpu_many = (many.cpu_secs() - cpu0) / through_many.ops as f64 * 1e6;
        report("unary, 10,000 routes", direct, through_many, "rpc");
        println!(
            "{:<24} sluice CPU {cpu_many:.1} µs per call; {:.2}x the one-route calls/s",
            "",
            through_many.ops_per_sec / through.ops_per_sec
        );
        drop(many);

        // Fan-out to 3 (every unary call merged from three echo servers)
        // and mirror to 1 (the default group answers, a second echo server
        // gets a copy): sluice CPU per call beside the single-upstream one.
        let third = EchoServer::start().await;
        let fanout = start_sluice(
            upstream.addr,
            workers,
            &format!(
                "[upstreams.trio]\nendpoints = [\"{}\", \"{}\", \"{}\"]\n\
                 [[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nfanout = {{ group = \"trio\" }}\n",
                upstream.addr, second.addr, third.addr
            ),
            "fanout",
        );
        let cpu0 = fanout.cpu_secs();
        let through_fanout = measure(fanout.addr, Workload::Unary, dur).await;
        let cpu_fanout = (fanout.cpu_secs() - cpu0) / through_fanout.ops as f64 * 1e6;
        report("unary, fan-out to 3", direct, through_fanout, "rpc");
        println!(
            "{:<24} sluice CPU {cpu_fanout:.1} µs per call = {:.2}x a single call's",
            "",
            cpu_fanout / cpu_per_call
        );
        drop(fanout);
        let mirror = start_sluice(
            upstream.addr,
            workers,
            &format!(
                "[upstreams.shadow]\nendpoints = [\"{}\"]\n\
                 [[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\n\
                 mirror = {{ primary = \"default\", secondaries = [\"shadow\"] }}\n",
                second.addr
            ),
            "mirror",
        );
        let cpu0 = mirror.cpu_secs();
        let through_mirror = measure(mirror.addr, Workload::Unary, dur).await;
        let cpu_mirror = (mirror.cpu_secs() - cpu0) / through_mirror.ops as f64 * 1e6;
        report("unary, mirror to 1", direct, through_mirror, "rpc");
        println!(
            "{:<24} sluice CPU {cpu_mirror:.1} µs per call = {:.2}x a single call's",
            "",
            cpu_mirror / cpu_per_call
        );
        drop(mirror);

        // TLS in, h2c out: the same unary load over TLS connections, and
        // the cost of a full handshake.
        let pki = sluice_testkit::pki::Pki::new("e2e bench CA");
        let (cert, key) = pki.write("server", &sluice_testkit::pki::Leaf::server());
        let tls = start_sluice(
            upstream.addr,
            workers,
            &format!("[server.tls]\ncert = {cert:?}\nkey = {key:?}\n"),
            "tls",
        );
        let cpu0 = tls.cpu_secs();
        let (ops, secs, mut lat) = run_load_on(tls_clients(tls.addr, &pki), Workload::Unary, dur).await;
        let cpu_tls = (tls.cpu_secs() - cpu0) / ops as f64 * 1e6;
        let through_tls = Result {
            ops_per_sec: ops as f64 / secs,
            mb_per_sec: ops as f64 * Workload::Unary.bytes_per_op() / secs / 1e6,
            p50_us: percentile(&mut lat, 0.50),
            p99_us: percentile(&mut lat, 0.99),
            ops,
        };
        report("unary 256 B, TLS in", direct, through_tls, "rpc");
        println!(
            "{:<24} sluice CPU {cpu_tls:.1} µs per call ({:.2}x plaintext's {cpu_per_call:.1}); {:.2}x plaintext RPC/s",
            "",
            cpu_tls / cpu_per_call,
            through_tls.ops_per_sec / through.ops_per_sec,
        );
        let cpu0 = tls.cpu_secs();
        let t0 = Instant::now();
        let made = handshakes(tls.addr, &pki, dur).await;
        let cpu_hs = (tls.cpu_secs() - cpu0) / made as f64 * 1e6;
        println!(
            "{:<24} {made} full handshakes (TLS 1.3, P-256, no resumption) in {:.1} s: sluice CPU {cpu_hs:.0} µs each = {:.0} new connections/s at one core",
            "TLS handshakes",
            t0.elapsed().as_secs_f64(),
            1e6 / cpu_hs
        );
        drop(tls);

        for (name, workload) in [("server stream 1 KiB", Workload::Stream1K), ("server stream 64 KiB", Workload::Stream64K)] {
            let direct = measure(upstream.addr, workload, dur).await;
            let through = measure(sluice.addr, workload, dur).await;
            peak_rss = peak_rss.max(sluice.rss_kib());
            report(name, direct, through, "msg");
        }

        let direct = measure(upstream.addr, Workload::Bidi, dur).await;
        let cpu0 = sluice.cpu_secs();
        let through = measure(sluice.addr, Workload::Bidi, dur).await;
        let cpu_per_rt = (sluice.cpu_secs() - cpu0) / through.ops as f64 * 1e6;
        peak_rss = peak_rss.max(sluice.rss_kib());
        report("bidi ping-pong 64 B", direct, through, "rt");
        println!("{:<24} sluice CPU {cpu_per_rt:.1} µs per round trip", "");

        println!("sluice RSS after load phases: {:.1} MiB (peak sampled)", peak_rss as f64 / 1024.0);
        drop(sluice);
        // A fresh process: after the load phases the allocator hands freed
        // memory back to new connections and the growth would read as zero.
        let fresh = start_sluice(upstream.addr, workers, "", "idle");
        let per_conn = idle_connection_cost(&fresh, None).await;
        println!("sluice memory per idle downstream connection: {:.1} KiB ({IDLE_CONNECTIONS} connections, fresh process)", per_conn / 1024.0);
        drop(fresh);
        let fresh_tls = start_sluice(
            upstream.addr,
            workers,
            &format!("[server.tls]\ncert = {cert:?}\nkey = {key:?}\n"),
            "tls-idle",
        );
        let per_tls = idle_connection_cost(&fresh_tls, Some(&tls_connector(&pki))).await;
        println!("sluice memory per idle TLS downstream connection: {:.1} KiB ({IDLE_CONNECTIONS} connections, fresh process)", per_tls / 1024.0);
        println!("e2e done in {:.1} s", started.elapsed().as_secs_f64());
    });
}
