//! sluice beside HAProxy and nginx, pinned like a sidecar, in one run.
//!
//! The load generator runs on CPU 0; the backend (a tonic echo server) and
//! the proxy under test share CPU 1, as an application and its sidecar
//! share a pod's core. Every target gets the same workloads:
//!
//! - unary: 256 B requests and replies, a closed loop of 4 connections × 64
//!   calls in flight;
//! - unary1: the same, one call in flight;
//! - open2k: an open loop of 2,000 calls/s (a sidecar's usual load), each
//!   timed from when it was due;
//! - bidi: 64 ping-pong streams (4 connections × 16), 64 B each way;
//! - server streams of 1 KiB and of 64 KiB messages, 8 streams.
//!
//! For each it prints calls (or messages) per second, the proxy's CPU time
//! per call, its system calls per call (with `perf`), and sluice ÷ HAProxy
//! (and ÷ nginx) for both. Last, each proxy's resident memory per idle
//! HTTP/2 connection (1 000 of them, on a freshly started proxy): never
//! called, and after one call on each, as a sidecar's connections are.
//!
//! HAProxy and nginx are used when installed (`apt-get install haproxy
//! nginx-light`); their configs are generated here. Without `taskset` the
//! run is unpinned and says so. `PEERS_SECS` sets the length of each run
//! (default 5 s); `PEERS_ONLY=unary,bidi` picks workloads.
//!
//! The same binary plays the backend, the load generator and the idle
//! client: it re-executes itself with `PEERS_ROLE` set.

mod support;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sluice_testkit::EchoServer;
use support::{
    SluiceProcess, cpu_secs,
    load::{Workload, run_load},
    percentile, rss_kib,
};

const LOAD_CPU: usize = 0;
const SERVER_CPU: usize = 1;
const IDLE_CONNECTIONS: usize = 1000;
/// Longest any one load run may take beyond its length before the bench
/// gives up on it.
const RUN_SLACK: Duration = Duration::from_secs(30);

fn main() {
    match std::env::var("PEERS_ROLE").as_deref() {
        Ok("backend") => backend(),
        Ok("load") => load(),
        Ok("idle") => idle(),
        _ => orchestrate(),
    }
}

// === roles ===

/// The echo server on its own single-threaded runtime; prints its address
/// and runs until stdin closes.
fn backend() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(EchoServer::start());
    println!("ADDR {}", server.addr);
    std::io::stdout().flush().expect("stdout");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(server);
}

fn load() {
    let addr: SocketAddr = env("PEERS_ADDR").parse().expect("PEERS_ADDR");
    let workload = Workload::from_name(&env("PEERS_WORKLOAD")).expect("PEERS_WORKLOAD");
    let secs: f64 = env("PEERS_SECS").parse().expect("PEERS_SECS");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (ops, elapsed, mut lat) =
        rt.block_on(run_load(addr, workload, Duration::from_secs_f64(secs)));
    println!(
        "RESULT {ops} {elapsed} {} {}",
        percentile(&mut lat, 0.50),
        percentile(&mut lat, 0.99)
    );
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"))
}

/// Opens idle HTTP/2 connections, says READY once each has the server's
/// SETTINGS, and holds them until stdin closes.
fn idle() {
    let addr: SocketAddr = env("PEERS_ADDR").parse().expect("PEERS_ADDR");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
        for _ in 0..IDLE_CONNECTIONS {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            conns.push((send, task));
        }
        for (send, _) in &mut conns {
            let _ = std::future::poll_fn(|cx| send.poll_ready(cx)).await;
        }
        if std::env::var_os("PEERS_IDLE_CALL").is_some() {
            // One unary call on each, as a sidecar's connections have
            // carried calls before they idle.
            for (send, _) in &mut conns {
                one_call(send).await;
            }
        }
        println!("READY");
        std::io::stdout().flush().expect("stdout");
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await
        .expect("stdin");
        drop(conns);
    });
}

/// One unary call (an empty message) on `send`, read to its trailers.
async fn one_call(send: &mut h2::client::SendRequest<bytes::Bytes>) {
    let head = http::Request::post("http://peers/sluice.test.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut ready = send.clone().ready().await.expect("ready");
    let (response, mut body) = ready.send_request(head, false).expect("send");
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .expect("message");
    let mut recv = response.await.expect("response").into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("data");
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await.expect("trailers");
    assert!(trailers.is_some(), "a gRPC answer ends with trailers");
}

// === the orchestrator ===

/// A child of the bench, pinned; killed on drop.
struct Pinned {
    child: Child,
}

impl Pinned {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pinned(cpu: usize, pin: bool, program: &Path) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", &cpu.to_string()]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn self_role(role: &str, cpu: usize, pin: bool) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut c = pinned(cpu, pin, &exe);
    c.env("PEERS_ROLE", role);
    c
}

/// Reads stdout lines until one starts with `prefix`; returns the rest.
fn expect_line(child: &mut Child, prefix: &str) -> (String, BufReader<std::process::ChildStdout>) {
    let mut reader = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read child stdout");
        assert!(n > 0, "child exited before printing {prefix}");
        if let Some(rest) = line.trim_end().strip_prefix(prefix) {
            return (rest.trim().to_owned(), reader);
        }
    }
}

/// A proxy (or none) in front of the backend.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The proxy's pid, to read its CPU and RSS; `None` for direct calls.
    pid: Option<u32>,
    _process: Option<Box<dyn std::any::Any>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn find_program(name: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
    ]
    .iter()
    .map(|dir| Path::new(dir).join(name))
    .find(|p| p.exists())
}

/// Waits until something accepts connections on `addr`.
fn wait_listening(addr: SocketAddr, what: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "{what} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_haproxy(dir: &Path, upstream: SocketAddr, pin: bool) -> Option<Target> {
    let program = find_program("haproxy")?;
    let port = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    nbthread 1\n    maxconn 8000\n\n\
             defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    \
             timeout server 60s\n\n\
             frontend grpc\n    bind 127.0.0.1:{port} proto h2\n    default_backend echo\n\n\
             backend echo\n    server echo {upstream} proto h2\n"
        ),
    )
    .expect("write haproxy.cfg");
    let child = pinned(SERVER_CPU, pin, &program)
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let process = Pinned { child };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(addr, "haproxy");
    Some(Target {
        name: "haproxy",
        addr,
        pid: Some(process.pid()),
        _process: Some(Box::new(process)),
    })
}

fn start_nginx(dir: &Path, upstream: SocketAddr, pin: bool) -> Option<Target> {
    let program = find_program("nginx")?;
    let port = free_port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let cfg = prefix.join("nginx.conf");
    std::fs::write(
        &cfg,
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\n\
             error_log stderr error;\npid {pid};\n\
             events {{ worker_connections 8000; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  \
             client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  \
             fastcgi_temp_path {tmp}/fcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  \
             scgi_temp_path {tmp}/scgi;\n  \
             upstream echo {{ server {upstream}; keepalive 256; keepalive_requests 100000000; }}\n  \
             server {{\n    listen 127.0.0.1:{port} http2;\n    \
             http2_max_concurrent_streams 1024;\n    \
             location / {{ grpc_pass grpc://echo; }}\n  }}\n}}\n",
            pid = prefix.join("nginx.pid").display(),
            tmp = prefix.display(),
        ),
    )
    .expect("write nginx.conf");
    let child = pinned(SERVER_CPU, pin, &program)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let process = Pinned { child };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(addr, "nginx");
    Some(Target {
        name: "nginx",
        addr,
        pid: Some(process.pid()),
        _process: Some(Box::new(process)),
    })
}

fn start_sluice(upstream: SocketAddr, pin: bool) -> Target {
    let up = upstream.to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--admin",
        "off",
    ];
    let process = if pin {
        SluiceProcess::start_pinned(SERVER_CPU, &args)
    } else {
        SluiceProcess::start(&args)
    };
    Target {
        name: "sluice",
        addr: process.addr,
        pid: Some(process.child.id()),
        _process: Some(Box::new(process)),
    }
}

#[derive(Clone, Copy, Debug)]
struct Measured {
    ops_per_sec: f64,
    /// Proxy CPU per operation, µs (0 for direct calls).
    cpu_us: f64,
    p50_us: f64,
    p99_us: f64,
    /// Proxy system calls per operation (with `perf`).
    syscalls: Option<f64>,
}

/// Counts the system calls of `pid` (`perf stat`) until stopped.
struct SyscallCount(Child);

impl SyscallCount {
    fn start(pid: u32) -> Option<Self> {
        find_program("perf")?;
        Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter",
                "-p",
                &pid.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()
            .map(Self)
    }

    fn stop(mut self) -> Option<f64> {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let out = std::mem::replace(&mut self.0, Command::new("true").spawn().ok()?)
            .wait_with_output()
            .ok()?;
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))?
            .split(',')
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

fn measure(target: &Target, workload: Workload, secs: f64, pin: bool) -> Measured {
    let cpu0 = target.pid.map(cpu_secs);
    let syscalls = target.pid.and_then(SyscallCount::start);
    // perf needs a moment to attach.
    if syscalls.is_some() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut child = self_role("load", LOAD_CPU, pin)
        .env("PEERS_ADDR", target.addr.to_string())
        .env("PEERS_WORKLOAD", workload.name())
        .env("PEERS_SECS", secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn load generator");
    let started = Instant::now();
    let (result, _) = expect_line(&mut child, "RESULT");
    let status = child.wait().expect("load generator");
    assert!(
        status.success(),
        "load generator failed against {}",
        target.name
    );
    assert!(
        started.elapsed() < Duration::from_secs_f64(secs) + RUN_SLACK,
        "a run took far longer than asked"
    );
    let cpu = match (target.pid, cpu0) {
        (Some(pid), Some(before)) => cpu_secs(pid) - before,
        _ => 0.0,
    };
    let syscalls = syscalls.and_then(SyscallCount::stop);
    let fields: Vec<f64> = result
        .split_whitespace()
        .map(|f| f.parse().expect("a number"))
        .collect();
    let (ops, elapsed) = (fields[0], fields[1]);
    Measured {
        ops_per_sec: ops / elapsed,
        cpu_us: cpu / ops * 1e6,
        p50_us: fields[2],
        p99_us: fields[3],
        syscalls: syscalls.map(|n| n / ops),
    }
}

/// RSS growth of the proxy per idle HTTP/2 connection, KiB.
fn idle_cost(target: &Target, pin: bool, after_a_call: bool) -> Option<f64> {
    let pid = target.pid?;
    let before = rss_kib(pid);
    let mut role = self_role("idle", LOAD_CPU, pin);
    if after_a_call {
        role.env("PEERS_IDLE_CALL", "1");
    }
    let mut child = role
        .env("PEERS_ADDR", target.addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn idle client");
    let _ = expect_line(&mut child, "READY");
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    drop(child.stdin.take());
    let _ = child.wait();
    Some(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

fn orchestrate() {
    let secs: f64 = std::env::var("PEERS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let workloads: Vec<Workload> = match std::env::var("PEERS_ONLY") {
        Ok(list) => list.split(',').filter_map(Workload::from_name).collect(),
        Err(_) => Workload::ALL.to_vec(),
    };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let pin = find_program("taskset").is_some() && cpus >= 2;
    println!(
        "peers: load generator on CPU {LOAD_CPU}; backend and proxy on CPU {SERVER_CPU}{}; {secs} s per run",
        if pin {
            ""
        } else {
            " (NOT pinned: no taskset or one CPU)"
        }
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");

    let mut backend = self_role("backend", SERVER_CPU, pin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn backend");
    let (addr, _stdout) = expect_line(&mut backend, "ADDR");
    let upstream: SocketAddr = addr.parse().expect("backend address");
    let backend = Pinned { child: backend };

    let mut targets = vec![
        Target {
            name: "direct",
            addr: upstream,
            pid: None,
            _process: None,
        },
        start_sluice(upstream, pin),
    ];
    match start_haproxy(&dir, upstream, pin) {
        Some(t) => targets.push(t),
        None => println!("haproxy not installed: `apt-get install haproxy` to compare"),
    }
    match start_nginx(&dir, upstream, pin) {
        Some(t) => targets.push(t),
        None => println!("nginx not installed: `apt-get install nginx-light` to compare"),
    }

    for workload in workloads {
        let results: Vec<(&str, Measured)> = targets
            .iter()
            .map(|t| (t.name, measure(t, workload, secs, pin)))
            .collect();
        println!(
            "\n{} ({}/s; proxy CPU per op):",
            workload.name(),
            workload.unit()
        );
        for (name, m) in &results {
            println!(
                "  {name:<8} {:>9.0}/s {:>8.1} MB/s  p50 {:>6.0} µs  p99 {:>6.0} µs  CPU {:>6.2} µs{}",
                m.ops_per_sec,
                m.ops_per_sec * workload.bytes_per_op() / 1e6,
                m.p50_us,
                m.p99_us,
                m.cpu_us,
                m.syscalls
                    .map(|n| format!("  {n:.2} syscalls"))
                    .unwrap_or_default()
            );
        }
        let get = |n: &str| results.iter().find(|(name, _)| *name == n).map(|(_, m)| *m);
        if let Some(s) = get("sluice") {
            for peer in ["haproxy", "nginx"] {
                if let Some(p) = get(peer) {
                    println!(
                        "  sluice ÷ {peer}: {:.2}× the {}/s, {:.2}× the CPU per op",
                        s.ops_per_sec / p.ops_per_sec,
                        workload.unit(),
                        s.cpu_us / p.cpu_us
                    );
                }
            }
        }
    }

    drop(targets);
    // Each proxy fresh, so that memory freed by the load runs does not
    // absorb the idle connections' allocations.
    println!(
        "\nmemory per idle HTTP/2 connection ({IDLE_CONNECTIONS} connections, each proxy freshly started):"
    );
    let fresh: [fn(&Path, SocketAddr, bool) -> Option<Target>; 3] = [
        |_, up, pin| Some(start_sluice(up, pin)),
        start_haproxy,
        start_nginx,
    ];
    for after_a_call in [false, true] {
        for start in fresh {
            if let Some(t) = start(&dir, upstream, pin)
                && let Some(kib) = idle_cost(&t, pin, after_a_call)
            {
                println!(
                    "  {:<8} {kib:.2} KiB{}",
                    t.name,
                    if after_a_call {
                        " after one call on each"
                    } else {
                        " never called"
                    }
                );
            }
        }
    }
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
}
