//! The command line is the contract external harnesses drive:
//! `sluice --listen ADDR --upstream ADDR`, the bound address on one log
//! line, exit 0 on SIGTERM, exit 64 on a bad config, and `sluice check`.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use sluice_testkit::{EchoServer, Req};

const LIMIT: Duration = Duration::from_secs(20);

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// A finished run of sluice: how it exited and what it wrote.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` (a [`sluice`] with its arguments) to its end.
fn ran(cmd: &mut Command) -> Ran {
    let out = cmd.output().expect("run sluice");
    Ran {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sluice check` over `files`, run to its end.
fn check<S: AsRef<OsStr>>(files: impl IntoIterator<Item = S>) -> Ran {
    ran(sluice().arg("check").args(files))
}

/// The example configs, `config/` in the repository.
fn examples() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Waits for `fut` at most [`LIMIT`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {LIMIT:?}"))
}

/// Kills the child when dropped, so a failing test leaves no process.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sluice` with `args` and reads stderr until the line that names
/// the bound listen address.
fn spawn(args: &[&str]) -> (Proc, SocketAddr) {
    let (proc, addr, _) = spawn_logged(args);
    (proc, addr)
}

/// `sluice --config config --listen 127.0.0.1:0 [--upstream upstream]
/// --admin off`, started as [`spawn`] does.
fn spawn_config(config: &str, upstream: Option<&str>) -> (Proc, SocketAddr) {
    let mut args = vec!["--config", config, "--listen", "127.0.0.1:0"];
    if let Some(upstream) = upstream {
        args.extend(["--upstream", upstream]);
    }
    args.extend(["--admin", "off"]);
    spawn(&args)
}

/// [`spawn`], with the log lines before the address line.
fn spawn_logged(args: &[&str]) -> (Proc, SocketAddr, Vec<String>) {
    let mut child = sluice()
        .args(args)
        // Set but empty, as some harnesses leave it: the address line must
        // still be logged.
        .env("RUST_LOG", "")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut before = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .expect("sluice exited before logging its address")
            .expect("read stderr");
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().expect("an address");
            break addr.parse().expect("a socket address");
        }
        before.push(line);
    };
    // Keep draining stderr so sluice never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), addr, before)
}

/// Issue #18.6: a second sluice started on a port the first holds shares
/// it (SO_REUSEPORT) and says so in one clear warning naming the port; the
/// first one alone says nothing of the kind.
#[test]
fn a_second_sluice_on_a_taken_port_says_it_shares_it() {
    let beside = |listen: &str| {
        spawn_logged(&[
            "--listen",
            listen,
            "--upstream",
            "127.0.0.1:1",
            "--admin",
            "off",
        ])
    };
    let (_first, addr, first_log) = beside("127.0.0.1:0");
    assert!(
        !first_log.iter().any(|l| l.contains("already listens")),
        "{first_log:?}"
    );
    let (_second, same, log) = beside(&addr.to_string());
    assert_eq!(same, addr);
    let warnings: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("already listens"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log:?}");
    assert!(
        warnings[0].contains(&addr.to_string()) && warnings[0].contains("WARN"),
        "{log:?}"
    );
}

fn terminate(proc: &mut Proc) -> ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        if let Some(status) = proc.0.try_wait().expect("wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sluice did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`terminate`], off the async runtime.
async fn sigterm(mut proc: Proc) -> ExitStatus {
    tokio::task::spawn_blocking(move || terminate(&mut proc))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_upstream_flags_serve_h2c_and_sigterm_exits_zero() {
    let upstream = EchoServer::start().await;
    let up = upstream.addr.to_string();
    let (proc, addr) = spawn(&["--listen", "127.0.0.1:0", "--upstream", &up]);
    assert_ne!(addr.port(), 0, "the real bound port is logged");
    let mut client = sluice_testkit::client(addr);
    let req = Req {
        seq: 42,
        ..Req::default()
    };
    let reply = within("a call", client.unary(req))
        .await
        .expect("call through the sluice process");
    assert_eq!(reply.into_inner().seq, 42);
    assert_eq!(upstream.probe.counts().completed, 1);
    assert_eq!(sigterm(proc).await.code(), Some(0));
}

fn write_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(text)
}

/// A config file in the target directory, removed on drop (no fixed /tmp
/// name, nothing left behind).
mod tempfile_path {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(crate) struct TempPath(pub(crate) PathBuf);

    impl TempPath {
        pub(crate) fn with(text: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let path = dir.join(format!(
                "cli-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).expect("write config");
            Self(path)
        }

        pub(crate) fn as_str(&self) -> &str {
            self.0.to_str().expect("utf-8 path")
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn a_bad_config_exits_64_naming_the_key_and_line() {
    let file = write_config(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstream]\nconnect_timeout = \"soon\"\n",
    );
    let Ran { status, stderr, .. } = ran(sluice().args(["--config", file.as_str()]));
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("upstream.connect_timeout"), "{stderr}");
    assert!(stderr.contains(":5:"), "line 5 named: {stderr}");
}

#[test]
fn check_accepts_a_good_file_and_refuses_a_bad_one() {
    let good = write_config("[upstream]\naddress = \"127.0.0.1:9\"\n");
    let Ran { status, stdout, .. } = check([good.as_str()]);
    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains("127.0.0.1:9"), "{stdout}");

    let bad = write_config("[server]\nmax_concurrent_streams = -1\n");
    let Ran { status, stderr, .. } = check([bad.as_str()]);
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("server.max_concurrent_streams"), "{stderr}");
    assert!(stderr.contains(":2:"), "{stderr}");
}

#[test]
fn check_prints_the_routes_it_read() {
    let Ran { status, stdout, .. } = check([examples().join("routes.toml")]);
    assert!(status.success());
    assert!(
        stdout.contains("group     billing: 127.0.0.1:50061, 127.0.0.1:50062"),
        "{stdout}"
    );
    assert!(
        stdout.contains("when first message field 1.2 starts with \"@hashed/\" → tenants"),
        "{stdout}"
    );
    assert!(stdout.contains("refuse with grpc-status 7"), "{stdout}");
    assert!(stdout.contains("otherwise → default"), "{stdout}");
}

#[test]
fn check_accepts_every_example_config() {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(examples()).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    // All of them in one run, as `sluice check config/*.toml` (#18.7).
    let Ran {
        status,
        stdout,
        stderr,
    } = check(&files);
    assert!(status.success(), "{stderr}");
    for path in &files {
        assert!(
            stdout.contains(&format!("{}: ok", path.display())),
            "{}: {stdout}",
            path.display()
        );
    }
}

/// Issue #18.7: `sluice check` takes many files and says which are bad; a
/// log filter that does not parse (in the file, or in RUST_LOG) and an
/// https OTLP endpoint (the exporter has no TLS) are errors at their key,
/// never silently `info` or a failing export.
#[test]
fn check_takes_many_files_and_refuses_bad_log_filters_and_https_otlp() {
    let good = write_config("[upstream]\naddress = \"127.0.0.1:9\"\n");
    let filter = write_config("[log]\nlevel = \"sluice=verbose!!\"\n");
    let https = write_config("[trace]\notlp_endpoint = \"https://collector:4318\"\n");
    let Ran {
        status,
        stdout,
        stderr,
    } = check([good.as_str(), filter.as_str(), https.as_str()]);
    assert_eq!(status.code(), Some(64));
    assert!(
        stdout.contains(&format!("{}: ok", good.as_str())),
        "{stdout}"
    );
    assert!(
        stderr.contains("`log.level`") && stderr.contains(filter.as_str()),
        "{stderr}"
    );
    assert!(
        stderr.contains("`trace.otlp_endpoint`") && stderr.contains("https"),
        "{stderr}"
    );
    // The server refuses them too, and a RUST_LOG that does not parse.
    let out = ran(sluice().args(["--config", filter.as_str()]));
    assert_eq!(out.status.code(), Some(64));
    let out = ran(sluice()
        .args(["--listen", "127.0.0.1:0", "--admin", "off"])
        .env("RUST_LOG", "sluice=verbose!!"));
    assert_eq!(out.status.code(), Some(64));
    let stderr = out.stderr;
    assert!(stderr.contains("RUST_LOG"), "{stderr}");
    let out = ran(sluice()
        .args(["check", good.as_str()])
        .env("RUST_LOG", "sluice=verbose!!"));
    assert_eq!(out.status.code(), Some(64), "check sees RUST_LOG too");
}

/// A fake OTLP/HTTP collector: answers every POST with 200 and hands each
/// request body to the test.
async fn fake_collector() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        if tcp.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    if tcp.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = tx.send((head, body));
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if tcp.write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_configured() {
    let upstream = EchoServer::start().await;
    let routed = EchoServer::start().await;
    let (collector, mut exports) = fake_collector().await;
    let file = write_config(&format!(
        "[trace]\notlp_endpoint = \"http://{collector}/v1/traces\"\nservice_name = \"sluice-under-test\"\n\n\
         [admin]\nlisten = \"off\"\n\
         [upstreams.routed]\nendpoints = [\"{}\"]\n\
         [[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"routed\"\n",
        routed.addr
    ));
    let up = upstream.addr.to_string();
    let (proc, addr) = spawn_config(file.as_str(), Some(&up));
    let mut client = sluice_testkit::client(addr);
    // The caller's span: sluice's call spans must be its children.
    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT_ID: &str = "b7ad6b7169203331";
    for _ in 0..3 {
        let mut req = tonic::Request::new(Req::default());
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{PARENT_ID}-01")
                .parse()
                .expect("ascii"),
        );
        within("a call", client.unary(req)).await.expect("call");
    }
    // Spans are batched; stopping sluice flushes them.
    assert_eq!(sigterm(proc).await.code(), Some(0));
    let (head, body) = within("an export", exports.recv())
        .await
        .expect("an export");
    assert!(head.starts_with("post /v1/traces"), "{head}");
    assert!(head.contains("application/x-protobuf"), "{head}");
    // Protobuf keeps strings as UTF-8: the span's method and the service
    // name are in there verbatim.
    let has = |needle: &str| body.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(has("/sluice.test.Echo/Unary"), "no call span in the export");
    assert!(has("sluice-under-test"), "no service.name in the export");
    // The upstream the route chose, not the default group's.
    assert!(
        has(&routed.addr.to_string()),
        "the span names the routed endpoint"
    );
    assert!(!has(&up), "the span names the default upstream");
    // Trace and parent ids are raw bytes in OTLP's protobuf.
    let bytes = |hex: &str| -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    };
    let contains = |needle: Vec<u8>| body.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(bytes(TRACE_ID)),
        "the span is not in the caller's trace"
    );
    assert!(
        contains(bytes(PARENT_ID)),
        "the span is not a child of the caller's span"
    );
}

#[test]
fn a_malformed_otlp_endpoint_is_a_config_error() {
    let bad = write_config("[trace]\notlp_endpoint = \"collector:4318\"\n");
    let Ran { status, stderr, .. } = check([bad.as_str()]);
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("trace.otlp_endpoint"), "{stderr}");
}

/// Issue #10's acceptance: `config/fanout.toml`, run by the real binary
/// against three tonic nodes: a keyed one-to-many call merges every node's
/// reply, and a write is mirrored with only the primary answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fanout_example_config_runs_against_three_nodes() {
    use sluice_testkit::{
        NodeServer,
        npb::{Chunk, VersionRequest, nodes_client::NodesClient},
    };
    let nodes: Vec<NodeServer> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| NodeServer::start(n))
        .collect();
    let path = examples().join("fanout.toml");
    let mut text = std::fs::read_to_string(&path).expect("config/fanout.toml");
    for (i, node) in nodes.iter().enumerate() {
        text = text.replace(&format!("127.0.0.1:5006{}", i + 1), &node.addr.to_string());
    }
    let file = write_config(&text);
    let Ran {
        status,
        stdout,
        stderr,
    } = check([file.as_str()]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("fan out to the endpoints of nodes named by nodes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mirror: storage answers, copies to replica (drop, swallow)"),
        "{stdout}"
    );

    let (proc, addr) = spawn_config(file.as_str(), None);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    let mut client = NodesClient::new(channel);
    let mut req = tonic::Request::new(VersionRequest::default());
    req.metadata_mut()
        .insert("nodes", "node-1,node-2,node-3".parse().expect("ascii"));
    let reply = within("a merged call", client.version(req))
        .await
        .expect("a merged reply")
        .into_inner();
    let hosts: Vec<&str> = reply
        .messages
        .iter()
        .map(|m| m.metadata.as_ref().map_or("", |md| md.hostname.as_str()))
        .collect();
    assert_eq!(hosts, ["node-1", "node-2", "node-3"]);
    let names: Vec<&str> = reply.messages.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(names, hosts, "each entry is its node's own");

    let chunks = tokio_stream::iter((0..3).map(|_| Chunk {
        data: vec![1u8; 10].into(),
    }));
    let written = within("a mirrored write", client.write(chunks))
        .await
        .expect("the primary's answer")
        .into_inner();
    assert_eq!(written.messages.len(), 1);
    assert_eq!(
        written.messages[0].node, "node-1",
        "storage (node-1) answers"
    );
    // The replica got the copy.
    nodes[1].probe.wait_for(LIMIT, |c| c.writes_done == 1).await;
    assert_eq!(nodes[1].probe.counts().chunks, 3);
    assert_eq!(sigterm(proc).await.code(), Some(0));
}

/// Issue #11's acceptance: `config/tls.toml`, run by the real binary in
/// front of a tonic upstream: a client with the example client certificate
/// makes the admin-only call and its identity reaches the upstream; a
/// client without one is served elsewhere and refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_example_config_runs_with_and_without_a_client_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = examples();
    let Ran {
        status,
        stdout,
        stderr,
    } = check([dir.join("tls.toml")]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("(TLS)") && stdout.contains("PERMISSION_DENIED"),
        "{stdout}"
    );

    let upstream = EchoServer::start().await;
    let config = dir.join("tls.toml");
    let upstream_addr = upstream.addr.to_string();
    let (_proc, addr) = spawn_config(config.to_str().expect("utf-8 path"), Some(&upstream_addr));
    let read = |f: &str| std::fs::read(dir.join("tls").join(f)).expect("example file");
    let client = |with_cert: bool| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .domain_name("localhost");
        if with_cert {
            tls = tls.identity(Identity::from_pem(read("client.pem"), read("client.key")));
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect_lazy();
        sluice_testkit::EchoClient::new(channel)
    };
    let uploads = || tokio_stream::iter([Req::default(), Req::default()]);

    let mut admin = client(true);
    let reply = within("an upload", admin.client_stream(uploads()))
        .await
        .expect("an admin may write")
        .into_inner();
    assert_eq!(reply.seq, 2, "both messages arrived");
    let seen = upstream.probe.last_metadata().expect("metadata");
    assert_eq!(
        seen.get("x-sluice-client-id").expect("the identity"),
        "spiffe://example.org/ns/default/sa/client"
    );

    let mut anon = client(false);
    within("a read", anon.unary(Req::default()))
        .await
        .expect("anyone may read");
    let denied = within("an upload", anon.client_stream(uploads()))
        .await
        .expect_err("no certificate, no write");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}

/// SIGHUP reloads the certificates at once, with polling too slow to
/// matter (an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates() {
    use sluice_testkit::pki::{Leaf, Pki, der};
    let pki = Pki::new("cli test CA");
    let (cert, key) = pki.write("server", &Leaf::server());
    let file = write_config(&format!(
        "[server.tls]\ncert = {cert:?}\nkey = {key:?}\n[tls]\nreload_interval = \"1h\"\n"
    ));
    let (proc, addr) = spawn_config(file.as_str(), Some("127.0.0.1:1"));
    let der = |path: &std::path::Path| der(&std::fs::read_to_string(path).expect("pem"));
    assert_eq!(pki.served_leaf(addr).await, der(&cert));
    pki.write(
        "server",
        &Leaf {
            common_name: "localhost, second".to_owned(),
            ..Leaf::server()
        },
    );
    let second = der(&cert);
    let hup = Command::new("kill")
        .args(["-HUP", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    within("the new certificate is served after SIGHUP", async {
        while pki.served_leaf(addr).await != second {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Issue #17.12: a certificate that is not one, or a key that is not
/// there, is a bad config: exit 64, naming the file and what is wrong with
/// it (not rustls's "invalid peer certificate").
#[test]
fn unusable_tls_files_exit_64_naming_the_file() {
    use sluice_testkit::pki::{Leaf, Pki};
    let pki = Pki::new("cli test CA");
    let (cert, key) = pki.write("server", &Leaf::server());
    // PEM armour around bytes that are no certificate.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let file = write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n[server.tls]\ncert = {cert:?}\nkey = {key:?}\n"
    ));
    let run = |args: &[&str]| {
        let Ran { status, stderr, .. } = ran(sluice().args(args));
        (status.code(), stderr)
    };
    for args in [
        vec!["--config", file.as_str()],
        vec!["check", file.as_str()],
    ] {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(&*cert.to_string_lossy()), "{stderr}");
        assert!(stderr.contains("not a valid X.509 certificate"), "{stderr}");
        assert!(!stderr.contains("peer"), "{stderr}");
    }
    // A missing key.
    pki.write("server", &Leaf::server());
    std::fs::remove_file(&key).expect("remove the key");
    let (code, stderr) = run(&["--config", file.as_str()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(&*key.to_string_lossy()) && stderr.contains("no such file"),
        "{stderr}"
    );
}

/// Issue #12's acceptance: `config/hub.toml` and `config/agent.toml` run
/// as two real binaries, with a tonic upstream behind the agent: a call to
/// the hub reaches the application through the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_and_agent_example_configs_tunnel_a_call() {
    let dir = examples();
    for file in ["hub.toml", "agent.toml"] {
        let Ran { status, stderr, .. } = check([dir.join(file)]);
        assert!(status.success(), "{file}: {stderr}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let hub_text = std::fs::read_to_string(dir.join("hub.toml"))
        .expect("hub.toml")
        .replace("0.0.0.0:15052", &format!("127.0.0.1:{port}"));
    let hub_file = write_config(&hub_text);
    let (_hub, hub_addr) = spawn_config(hub_file.as_str(), None);
    let app = EchoServer::start().await;
    let agent_text = std::fs::read_to_string(dir.join("agent.toml"))
        .expect("agent.toml")
        .replace("127.0.0.1:15052", &format!("127.0.0.1:{port}"));
    let agent_file = write_config(&agent_text);
    let app_addr = app.addr.to_string();
    let (_agent, _) = spawn_config(agent_file.as_str(), Some(&app_addr));
    let mut client = sluice_testkit::client(hub_addr);
    // The agent dials in on its own time: call until it is there.
    let reply = within(
        "the call reached the application through the tunnel",
        async {
            loop {
                let mut req = tonic::Request::new(Req {
                    seq: 42,
                    ..Req::default()
                });
                req.metadata_mut()
                    .insert("x-dest-host", "node-1.internal".parse().expect("ascii"));
                match client.unary(req).await {
                    Ok(reply) => break reply.into_inner(),
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(s) => panic!("not a missing agent: {s:?}"),
                }
            }
        },
    )
    .await;
    assert_eq!(reply.seq, 42);
    assert_eq!(app.probe.counts().completed, 1);
}

/// A JSON value whose objects may not repeat a key: standard parsers keep
/// one of two `message` keys and drop the other silently.
#[derive(Debug)]
struct Strict(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Strict, A::Error> {
                let mut obj = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: Strict = map.next_value()?;
                    if obj.insert(key.clone(), value.0).is_some() {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                }
                Ok(Strict(serde_json::Value::Object(obj)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Strict, A::Error> {
                let mut items = Vec::new();
                while let Some(Strict(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Strict(serde_json::Value::Array(items)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_string<E>(self, v: String) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(serde_json::Value::Null))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every key named `key` anywhere in `v`, with its value.
fn values_of<'a>(v: &'a serde_json::Value, key: &str, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == key {
                    out.push(v);
                }
                values_of(v, key, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| values_of(v, key, out)),
        _ => {}
    }
}

/// Issue #18.4: with `log.format = "json"`, at debug (every call event),
/// through OK calls, failing calls and an upstream that is down, every
/// line is one JSON object with one key each, its `message` is the event's
/// text, and `grpc_status` is always a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_with_one_message_and_numeric_statuses() {
    let upstream = EchoServer::start().await;
    let file =
        write_config("[log]\nformat = \"json\"\nlevel = \"debug,h2=info,hyper=info,tower=info\"\n");
    let mut child = sluice()
        .args([
            "--config",
            file.as_str(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ])
        .args(["--upstream", &upstream.addr.to_string()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(LIMIT)
            .expect("a log line before the address");
        let found = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        lines.push(line);
        if let Some(addr) = found {
            break addr;
        }
    };
    let mut proc = Proc(child);
    let mut client = sluice_testkit::client(addr);
    client.unary(Req::default()).await.expect("an OK call");
    let failed = client
        .unary(Req {
            fail_code: tonic::Code::NotFound as i32,
            ..Req::default()
        })
        .await
        .expect_err("a failing call");
    assert_eq!(failed.code(), tonic::Code::NotFound);
    // The upstream goes away: UNAVAILABLE from sluice itself.
    drop(upstream);
    let down = client.unary(Req::default()).await.expect_err("no upstream");
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    assert_eq!(terminate(&mut proc).code(), Some(0));
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        lines.push(line);
    }
    let mut statuses = Vec::new();
    let mut failed_events = 0;
    for line in &lines {
        let Strict(v) = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let fields = &v["fields"];
        let message = fields["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {line}"));
        failed_events += usize::from(message == "call failed");
        let mut found = Vec::new();
        values_of(&v, "grpc_status", &mut found);
        statuses.extend(found.into_iter().cloned());
    }
    assert!(failed_events >= 1, "a call-failed event: {lines:#?}");
    assert!(!statuses.is_empty(), "statuses are logged: {lines:#?}");
    for s in &statuses {
        assert!(s.is_number(), "grpc_status {s} is not a number");
    }
}

/// Which echo server answered a unary call through `sluice`.
async fn served_by(sluice: SocketAddr) -> String {
    let mut client = sluice_testkit::client(sluice);
    let res = within("a unary call", client.unary(Req::default()))
        .await
        .expect("the call succeeds");
    res.metadata()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .expect("an echo server's answer")
        .to_owned()
}

/// Rewrites `file` as a ConfigMap update does: a new file renamed over it.
fn rewrite(file: &tempfile_path::TempPath, text: &str) {
    let next = file.0.with_extension("next");
    std::fs::write(&next, text).expect("write config");
    std::fs::rename(&next, &file.0).expect("rename config");
}

/// Issue #20.1: SIGHUP reads the config file again and applies it to new
/// calls, keeping what the command line overrides (`--upstream`); nothing
/// changes before the signal when the file is not watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_changed_config_file_and_keeps_the_command_line() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let file = write_config("[upstream]\naddress = \"127.0.0.1:1\"\n");
    let a_addr = a.addr.to_string();
    let (proc, addr) = spawn_config(file.as_str(), Some(&a_addr));
    assert_eq!(served_by(addr).await, a_addr);

    rewrite(
        &file,
        &format!(
            "[upstream]\naddress = \"127.0.0.1:1\"\n[upstreams.g]\nendpoints = [\"{}\"]\n\
             [[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"g\"\n",
            b.addr
        ),
    );
    // Not watched: the new file waits for the signal.
    assert_eq!(served_by(addr).await, a_addr);
    let hup = Command::new("kill")
        .args(["-HUP", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    within(
        "the route of the new file is followed after SIGHUP",
        async {
            while served_by(addr).await != b.addr.to_string() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    // Calls no route takes still go where --upstream said, not to the
    // file's 127.0.0.1:1.
    let before = a.probe.counts().completed;
    let mut client = sluice_testkit::client(addr);
    let mut stream = within(
        "a server stream",
        client.server_stream(Req {
            replies: 1,
            ..Req::default()
        }),
    )
    .await
    .expect("the default group is still --upstream")
    .into_inner();
    while within("a reply", stream.message())
        .await
        .expect("ok")
        .is_some()
    {}
    assert_eq!(a.probe.counts().completed, before + 1);
    assert_eq!(sigterm(proc).await.code(), Some(0));
}

/// Issue #20.1: with `reload.watch`, a change of the file (a rename over
/// it, as a ConfigMap update) is applied without a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_config_file_is_applied_when_it_changes() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let config = |upstream: SocketAddr| {
        format!(
            "[upstream]\naddress = \"{upstream}\"\n[reload]\nwatch = true\ninterval = \"50ms\"\n"
        )
    };
    let file = write_config(&config(a.addr));
    let (proc, addr) = spawn_config(file.as_str(), None);
    assert_eq!(served_by(addr).await, a.addr.to_string());
    rewrite(&file, &config(b.addr));
    within("the watched file is applied", async {
        while served_by(addr).await != b.addr.to_string() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(sigterm(proc).await.code(), Some(0));
}

/// Issue #20: `config/xds.toml` with its example bootstrap (its control
/// plane address pointed at the in-repo management server) routes a call
/// by its `:authority` through the real binary; `sluice check` names the
/// control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_xds_example_config_routes_by_authority_through_the_real_binary() {
    use sluice_testkit::xds::{ControlPlane, Snapshot};
    let echo = EchoServer::start().await;
    let plane = ControlPlane::start(Snapshot::single("svc", "echo", &[echo.addr])).await;
    let bootstrap = std::fs::read_to_string(examples().join("xds-bootstrap.json"))
        .expect("the example bootstrap")
        .replace("127.0.0.1:18000", &plane.addr.to_string());
    let bootstrap = write_config(&bootstrap);
    let config = std::fs::read_to_string(examples().join("xds.toml"))
        .expect("the example config")
        .replace(
            "\"xds-bootstrap.json\"",
            &format!("{:?}", bootstrap.as_str()),
        );
    let file = write_config(&config);
    let checked = check([file.as_str()]);
    assert!(checked.status.success(), "{}", checked.stderr);
    assert!(
        checked
            .stdout
            .contains(&format!("routed from {}", plane.addr)),
        "{}",
        checked.stdout
    );
    let (proc, addr) = spawn_config(file.as_str(), None);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .origin("http://svc".parse().expect("origin"))
        .connect_lazy();
    let mut client = sluice_testkit::EchoClient::new(channel);
    let res = within("a call routed by xDS", client.unary(Req::default()))
        .await
        .expect("routed");
    assert_eq!(
        res.metadata()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok()),
        Some(echo.addr.to_string().as_str())
    );
    assert_eq!(sigterm(proc).await.code(), Some(0));
}

/// Issue #20: a bootstrap that is missing or not one is a config error at
/// start: exit 64, naming it.
#[test]
fn a_bad_xds_bootstrap_exits_64_naming_it() {
    let missing = ran(sluice().args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--xds-bootstrap",
        "/nonexistent/bootstrap.json",
    ]));
    assert_eq!(missing.status.code(), Some(64), "{}", missing.stderr);
    assert!(
        missing.stderr.contains("/nonexistent/bootstrap.json"),
        "{}",
        missing.stderr
    );
    let bad = write_config(r#"{"xds_servers": []}"#);
    let empty = ran(sluice()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--xds-bootstrap",
        ])
        .arg(bad.as_str()));
    assert_eq!(empty.status.code(), Some(64), "{}", empty.stderr);
    assert!(
        empty.stderr.contains("xds_servers is empty"),
        "{}",
        empty.stderr
    );
}
