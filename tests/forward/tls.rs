//! Issue #11: TLS on both sides with rustls, client certificates and the
//! identity they prove, routes that require one, certificates reloaded
//! under load, and the failures a wrong client meets (fast and clear,
//! never a hang). Certificates come from a throwaway CA per test
//! (`sluice_testkit::pki`).

use std::{sync::Arc, time::Duration};

use sluice::{Config, Running};
use sluice_testkit::{
    EchoClient, EchoServer, Req,
    pki::{Leaf, Pki},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    metrics::{scrape, value},
    support::*,
};

const WEB: &str = "spiffe://test.local/ns/prod/sa/web";
const BATCH: &str = "spiffe://test.local/ns/prod/sa/batch";

/// A PKI with a server certificate (`server.pem`/`server.key`) and two
/// clients: `web` (role `os:admin`) and `batch` (role `os:reader`).
fn pki() -> Pki {
    let pki = Pki::new("sluice test CA");
    pki.write("server", &Leaf::server());
    pki.write("web", &Leaf::client(WEB, &["os:admin"]));
    pki.write("batch", &Leaf::client(BATCH, &["os:reader"]));
    pki
}

/// `[server.tls]` on `server.listen` with the PKI's server certificate,
/// and client certificates `mode` (`None`: not asked for).
fn tls_config(pki: &Pki, upstream: std::net::SocketAddr, mode: Option<&str>) -> Config {
    let client_auth = mode
        .map(|m| {
            format!(
                "client_auth = {{ ca = {:?}, mode = {m:?} }}\n",
                pki.path("ca.pem")
            )
        })
        .unwrap_or_default();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = {:?}\nkey = {:?}\n{client_auth}\
         [upstream]\naddress = \"{upstream}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nreload_interval = \"50ms\"\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    Config::from_toml_str(&text).expect("tls config")
}

/// A tonic client of sluice's TLS listener, trusting the PKI's CA, with
/// the client certificate `who` (`None`: without one).
async fn tls_client(
    addr: std::net::SocketAddr,
    pki: &Pki,
    who: Option<&str>,
) -> Result<EchoClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(who) = who {
        let cert = std::fs::read(pki.path(&format!("{who}.pem"))).expect("cert");
        let key = std::fs::read(pki.path(&format!("{who}.key"))).expect("key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(EchoClient::new(channel))
}

async fn start(config: &Config) -> Running {
    trace_init();
    sluice::run(config).await.expect("sluice starts")
}

/// An echo upstream and a sluice serving TLS in front of it with the
/// PKI's server certificate, client certificates `mode` (`None`: not
/// asked for), the config tuned first.
async fn tls_sluice(
    pki: &Pki,
    mode: Option<&str>,
    tune: impl FnOnce(&mut Config),
) -> (EchoServer, Running) {
    let upstream = EchoServer::start().await;
    let mut config = tls_config(pki, upstream.addr, mode);
    tune(&mut config);
    let sluice = start(&config).await;
    (upstream, sluice)
}

/// A sluice started from `config` and a (plaintext) client of it.
async fn start_with_client(config: &Config) -> (Running, EchoClient<Channel>) {
    let sluice = start(config).await;
    let client = sluice_testkit::client(sluice.listen_addr());
    (sluice, client)
}

/// [`tls_client`] that must connect within [`LIMIT`].
async fn connect_as(
    addr: std::net::SocketAddr,
    pki: &Pki,
    who: Option<&str>,
) -> EchoClient<Channel> {
    within("TLS connect", tls_client(addr, pki, who))
        .await
        .unwrap_or_else(|e| panic!("{who:?} connects over TLS: {e}"))
}

/// Waits until `read` (a counter) reaches `n`, polling every 20 ms.
async fn reaches<F, Fut>(what: &str, n: f64, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = f64>,
{
    within(what, async {
        while read().await < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// One unary call on a raw h2 connection: the response status, the reply
/// bytes and the trailers.
async fn raw_unary(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: &Req,
) -> (http::StatusCode, Vec<u8>, http::HeaderMap) {
    let (response, _body) = send_call(send, grpc_head("Unary"), req);
    let response = within("the reply", response).await.expect("response");
    let status = response.status();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = within("reply data", body.data()).await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    let trailers = within("trailers", body.trailers())
        .await
        .expect("trailers")
        .expect("some");
    (status, got, trailers)
}

fn spoofing(seq: u64) -> tonic::Request<Req> {
    let mut req = tonic::Request::new(Req {
        seq,
        ..Req::default()
    });
    req.metadata_mut().insert(
        "x-sluice-client-id",
        "spiffe://evil/admin".parse().expect("ascii"),
    );
    req
}

/// `sluice_tls_reloads_total{material, outcome}` now.
async fn reloads(sluice: &Running, material: &str, outcome: &str) -> f64 {
    let scrape = scrape(sluice.admin_addr().expect("admin")).await;
    value(
        &scrape,
        "sluice_tls_reloads_total",
        &[("material", material), ("outcome", outcome)],
    )
}

/// A sluice in front of a TLS upstream that requires a client certificate,
/// with the PKI's `web` one, reloading every 50 ms; and a first call
/// through it done.
async fn proxied_tls_upstream(
    pki: &Pki,
) -> (
    Running,
    EchoClient<Channel>,
    sluice_testkit::Probe,
    tokio::task::JoinHandle<()>,
) {
    let (addr, probe, server) = tls_upstream(pki).await;
    let mut config = config(addr);
    upstream_tls(&mut config, pki, true);
    config.tls.reload_interval = Duration::from_millis(50);
    let (sluice, mut client) = start_with_client(&config).await;
    within("a first call", client.unary(Req::default()))
        .await
        .expect("served");
    (sluice, client, probe, server)
}

async fn handshake_failures(sluice: &Running, reason: &str) -> f64 {
    let scrape = scrape(sluice.admin_addr().expect("admin")).await;
    value(
        &scrape,
        "sluice_tls_handshake_failures_total",
        &[("side", "downstream"), ("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_refuse_a_client_without_one_and_forward_the_identity() {
    let pki = pki();
    let (upstream, sluice) = tls_sluice(&pki, Some("required"), |_| {}).await;
    assert_eq!(sluice.tls_addr(), Some(sluice.listen_addr()));

    let mut web = connect_as(sluice.listen_addr(), &pki, Some("web")).await;
    let reply = within("a call with a certificate", web.unary(spoofing(7)))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(reply.seq, 7);
    let seen = upstream.probe.last_metadata().expect("metadata");
    let ids: Vec<_> = seen.get_all("x-sluice-client-id").iter().collect();
    assert_eq!(ids.len(), 1, "the client's copy is stripped: {ids:?}");
    assert_eq!(ids[0], WEB);

    // Without a certificate: TLS 1.3 lets the client finish its side of
    // the handshake, so the refusal shows on the first call. It must be a
    // failure, quickly, and nothing reaches the upstream.
    let before = upstream.probe.counts().started;
    let started = std::time::Instant::now();
    let outcome = within("a call without a certificate", async {
        match tls_client(sluice.listen_addr(), &pki, None).await {
            Err(e) => Err(e.to_string()),
            Ok(mut anon) => anon
                .unary(Req::default())
                .await
                .map(drop)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        }
    })
    .await;
    let err = outcome.expect_err("no certificate, no call");
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(upstream.probe.counts().started, before);
    reaches("the failure is counted", 1.0, || {
        handshake_failures(&sluice, "no_client_certificate")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_serve_a_client_without_one_with_no_identity() {
    let pki = pki();
    let (upstream, sluice) = tls_sluice(&pki, Some("optional"), |_| {}).await;

    let mut anon = connect_as(sluice.listen_addr(), &pki, None).await;
    within("a call without a certificate", anon.unary(spoofing(1)))
        .await
        .expect("optional: served");
    let seen = upstream.probe.last_metadata().expect("metadata");
    assert!(
        seen.get("x-sluice-client-id").is_none(),
        "no identity, and the client's own value is stripped: {seen:?}"
    );

    let mut batch = connect_as(sluice.listen_addr(), &pki, Some("batch")).await;
    within("a call with a certificate", batch.unary(spoofing(2)))
        .await
        .expect("served");
    let seen = upstream.probe.last_metadata().expect("metadata");
    assert_eq!(seen.get("x-sluice-client-id").expect("identity"), BATCH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_refuses_an_identity_it_does_not_accept_with_permission_denied() {
    let pki = pki();
    let upstream = EchoServer::start().await;
    let mut config = tls_config(&pki, upstream.addr, Some("optional"));
    let routes = Config::from_toml_str(
        "[[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"default\"\n\
         identity = { spiffe_trust_domain = \"test.local\", prefix = \"spiffe://test.local/ns/prod/\", roles = [\"os:admin\"] }\n",
    );
    // A route with identity needs client_auth: on its own it is refused.
    let err = routes.expect_err("identity without client_auth");
    assert!(err.to_string().contains("client_auth"), "{err}");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = {:?}\nkey = {:?}\n\
         client_auth = {{ ca = {:?}, mode = \"optional\" }}\n\
         [[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"default\"\n\
         identity = {{ spiffe_trust_domain = \"test.local\", prefix = \"spiffe://test.local/ns/prod/\", roles = [\"os:admin\"] }}\n",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    config.routes = Config::from_toml_str(&text).expect("routes").routes;
    let sluice = start(&config).await;

    let mut web = connect_as(sluice.listen_addr(), &pki, Some("web")).await;
    within("an admin's call", web.unary(Req::default()))
        .await
        .expect("os:admin in prod passes");

    let mut batch = connect_as(sluice.listen_addr(), &pki, Some("batch")).await;
    let denied = within("a reader's call", batch.unary(Req::default()))
        .await
        .expect_err("os:reader is refused");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        !denied.message().contains("os:admin") && !denied.message().contains("test.local"),
        "the refusal names nothing of the rule: {}",
        denied.message()
    );

    // Issue #17.14: a SPIFFE id that breaks the specification (a `..`
    // segment that climbs out of ns/prod) is no identity, whatever its
    // prefix and roles say.
    pki.write(
        "sneaky",
        &Leaf::client(
            "spiffe://test.local/ns/prod/sa/../../dev/sa/x",
            &["os:admin"],
        ),
    );
    // It connects: the certificate itself is valid.
    let mut sneaky = connect_as(sluice.listen_addr(), &pki, Some("sneaky")).await;
    let denied = within(
        "a call with a dotted SPIFFE id",
        sneaky.unary(Req::default()),
    )
    .await
    .expect_err("an invalid SPIFFE id is refused");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let mut anon = connect_as(sluice.listen_addr(), &pki, None).await;
    let denied = within("an anonymous call", anon.unary(Req::default()))
        .await
        .expect_err("no identity is refused");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("certificate"),
        "{}",
        denied.message()
    );
    assert_eq!(
        upstream.probe.counts().started,
        1,
        "only the admin's call reached the upstream"
    );
    // Other methods are not under the rule.
    let replies = within(
        "another method, anonymous",
        anon.server_stream(Req {
            replies: 2,
            ..Req::default()
        }),
    )
    .await
    .expect("not under the rule");
    let mut replies = replies.into_inner();
    let mut n = 0;
    while within("a reply", replies.message())
        .await
        .expect("ok")
        .is_some()
    {
        n += 1;
    }
    assert_eq!(n, 2);
}

/// A tonic echo server speaking TLS with the PKI's server certificate and
/// requiring client certificates from its CA.
async fn tls_upstream(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    sluice_testkit::Probe,
    tokio::task::JoinHandle<()>,
) {
    let identity = Identity::from_pem(
        std::fs::read(pki.path("server.pem")).expect("cert"),
        std::fs::read(pki.path("server.key")).expect("key"),
    );
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(pki.ca_pem()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let probe = sluice_testkit::Probe::default();
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("tls server")
        .add_service(sluice_testkit::pb::echo_server::EchoServer::new(
            sluice_testkit::Echo::new(probe.clone()),
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    (
        addr,
        probe,
        tokio::spawn(async move {
            let _ = server.await;
        }),
    )
}

fn upstream_tls(config: &mut Config, pki: &Pki, with_cert: bool) {
    config.upstream.tls = Some(sluice::config::UpstreamTlsConfig {
        ca: Some(pki.path("ca.pem")),
        server_name: Some("localhost".to_owned()),
        cert: with_cert.then(|| pki.path("web.pem")),
        key: with_cert.then(|| pki.path("web.key")),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_that_requires_a_client_certificate() {
    let pki = pki();
    let (addr, _probe, server) = tls_upstream(&pki).await;

    let mut with = config(addr);
    upstream_tls(&mut with, &pki, true);
    let (_sluice, mut client) = start_with_client(&with).await;
    let reply = within(
        "a call to the TLS upstream",
        client.unary(Req {
            seq: 3,
            ..Req::default()
        }),
    )
    .await
    .expect("sluice presents its client certificate")
    .into_inner();
    assert_eq!(reply.seq, 3);

    let mut without = config(addr);
    upstream_tls(&mut without, &pki, false);
    let (_bare, mut client) = start_with_client(&without).await;
    let refused = within(
        "a call without a client certificate",
        client.unary(Req::default()),
    )
    .await
    .expect_err("the upstream refuses sluice");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let message = refused.message().to_ascii_lowercase();
    assert!(
        message.contains("certificate"),
        "the reason is in grpc-message: {message}"
    );

    // A CA that did not sign the upstream's certificate: UNAVAILABLE, and
    // the message says why.
    let other = Pki::new("another CA");
    let mut wrong = config(addr);
    wrong.upstream.tls = Some(sluice::config::UpstreamTlsConfig {
        ca: Some(other.path("ca.pem")),
        server_name: Some("localhost".to_owned()),
        cert: None,
        key: None,
    });
    let (_untrusting, mut client) = start_with_client(&wrong).await;
    let refused = within(
        "a call to an untrusted upstream",
        client.unary(Req::default()),
    )
    .await
    .expect_err("an unknown issuer is refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("TLS handshake failed"),
        "{}",
        refused.message()
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_the_tls_port_and_tls_on_the_h2c_port_fail_fast() {
    let pki = pki();
    let (_upstream, sluice) = tls_sluice(&pki, None, |config| {
        let tls = config.server.tls.as_mut().expect("tls");
        tls.listen = Some("127.0.0.1:0".parse().expect("addr"));
        // A hang would be cut by the handshake timeout: make that longer
        // than the test's own limit, so that only a real refusal passes.
        config.server.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let tls_addr = sluice.tls_addr().expect("a TLS listener");
    assert_ne!(tls_addr, sluice.listen_addr());

    // Both listeners serve.
    normal_calls(sluice.listen_addr(), 1).await;
    let mut over_tls = connect_as(tls_addr, &pki, None).await;
    within("a call over TLS", over_tls.unary(Req::default()))
        .await
        .expect("served");

    // h2c on the TLS port: rustls answers the bytes with an alert, which
    // an h2c client reads as a broken frame: an error at once.
    let mut plain = sluice_testkit::client(tls_addr);
    let started = std::time::Instant::now();
    let err = within("h2c on the TLS port", plain.unary(Req::default()))
        .await
        .expect_err("not TLS");
    assert!(
        // Which code depends on what the client was doing when the alert
        // came (reading a frame, writing into a closed socket); what
        // matters is that it comes at once, not at a timeout.
        started.elapsed() < Duration::from_secs(5),
        "{err:?}"
    );
    let mut raw = tokio::net::TcpStream::connect(tls_addr)
        .await
        .expect("connect");
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    within(
        "the TLS port answers and closes",
        raw.read_to_end(&mut answer),
    )
    .await
    .expect("read");
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "a TLS alert record: {answer:?}"
    );

    // TLS on the h2c port: a handshake_failure alert, then close.
    within(
        "TLS on the h2c port",
        tls_client(sluice.listen_addr(), &pki, None),
    )
    .await
    .expect_err("the h2c port does not speak TLS");
    let connector = rustls_connector(&pki, &[b"h2"]);
    let err = handshake_with(
        "a TLS handshake on the h2c port",
        connector,
        sluice.listen_addr(),
    )
    .await
    .expect_err("refused");
    assert!(
        format!("{err:?}").contains("HandshakeFailure"),
        "an alert, not a timeout or a reset: {err:?}"
    );
    assert!(handshake_failures(&sluice, "not_tls").await >= 1.0);
}

fn rustls_connector(pki: &Pki, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    pki.connector(alpn, rustls::DEFAULT_VERSIONS)
}

/// A raw TLS handshake by `connector` with the server at `addr` (as
/// `localhost`), within [`LIMIT`].
async fn handshake_with(
    what: &str,
    connector: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    within(
        what,
        connector.connect("localhost".try_into().expect("name"), tcp),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_client_gets_no_application_protocol_and_a_stalled_one_the_timeout() {
    let pki = pki();
    let (_upstream, sluice) = tls_sluice(&pki, None, |config| {
        config.server.handshake_timeout = Duration::from_millis(300);
    })
    .await;

    let connector = rustls_connector(&pki, &[b"http/1.1"]);
    let err = handshake_with(
        "an http/1.1-only handshake",
        connector,
        sluice.listen_addr(),
    )
    .await
    .expect_err("no common protocol");
    assert!(
        format!("{err:?}").contains("NoApplicationProtocol"),
        "a no_application_protocol alert: {err:?}"
    );
    assert!(handshake_failures(&sluice, "no_application_protocol").await >= 1.0);

    // A client that connects and sends nothing is closed at the handshake
    // timeout (not before, not never).
    let started = std::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(sluice.listen_addr())
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let n = within("the stalled handshake is closed", idle.read(&mut buf))
        .await
        .expect("a close, not a reset");
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // A client that sends half a ClientHello and stalls: the same.
    let mut half = tokio::net::TcpStream::connect(sluice.listen_addr())
        .await
        .expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    let n = within("the half handshake is closed", half.read(&mut buf))
        .await
        .expect("a close, not a reset");
    assert_eq!(n, 0);
    reaches("both are counted as timeouts", 2.0, || {
        handshake_failures(&sluice, "timeout")
    })
    .await;
}

async fn served_leaf(addr: std::net::SocketAddr, pki: &Pki) -> Vec<u8> {
    pki.served_leaf(addr).await
}

fn pem_der(pem: &str) -> Vec<u8> {
    sluice_testkit::pki::der(pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_every_200ms_under_load_fail_no_call() {
    let pki = pki();
    let (_upstream, sluice) = tls_sluice(&pki, None, |_| {}).await;
    let addr = sluice.listen_addr();
    assert_eq!(
        served_leaf(addr, &pki).await,
        pem_der(&std::fs::read_to_string(pki.path("server.pem")).expect("pem"))
    );

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One client on one raw connection opened before the rotations: it
    // cannot reconnect behind the test's back, so every call on it is a
    // call on the old connection, and its certificate stays the first.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = pki
        .connector(&[b"h2"], rustls::DEFAULT_VERSIONS)
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("handshake");
    let old_leaf = tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec();
    assert_eq!(old_leaf, served_leaf(addr, &pki).await);
    let (mut old, h2conn) = h2::client::handshake(tls).await.expect("h2");
    let old_driver = tokio::spawn(h2conn);
    let old_conn = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (response, _body) = send_call(
                    &mut old,
                    grpc_head("Unary"),
                    &Req {
                        seq: n,
                        ..Req::default()
                    },
                );
                let mut body = response
                    .await
                    .expect("a response on the old connection")
                    .into_body();
                while body.data().await.is_some() {}
                let trailers = body.trailers().await.expect("trailers").expect("some");
                assert_eq!(
                    trailers["grpc-status"], "0",
                    "call {n} on the old connection"
                );
                n += 1;
            }
            n
        }
    });
    // Another that opens a new connection for every call.
    let ca = pki.ca_pem();
    let new_conns = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca))
                    .domain_name("localhost");
                let channel = Endpoint::from_shared(format!("https://{addr}"))
                    .expect("uri")
                    .tls_config(tls)
                    .expect("tls")
                    .connect()
                    .await
                    .unwrap_or_else(|e| panic!("a new connection failed: {e:?}"));
                EchoClient::new(channel)
                    .unary(Req::default())
                    .await
                    .unwrap_or_else(|s| panic!("a call on a new connection failed: {s:?}"));
                n += 1;
            }
            n
        }
    });
    let mut last = String::new();
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let leaf = Leaf {
            common_name: format!("localhost round {round}"),
            ..Leaf::server()
        };
        pki.write("server", &leaf);
        last = std::fs::read_to_string(pki.path("server.pem")).expect("pem");
    }
    // New handshakes see the newest certificate once the reload ran.
    let newest = pem_der(&last);
    within("the newest certificate is served", async {
        while served_leaf(addr, &pki).await != newest {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        !old_driver.is_finished(),
        "the old connection is still open after every rotation"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let on_old = within("the old-connection client", old_conn)
        .await
        .expect("no failure");
    let on_new = within("the new-connection client", new_conns)
        .await
        .expect("no failure");
    assert!(
        on_old > 20 && on_new > 5,
        "load ran: {on_old} old, {on_new} new"
    );

    // A corrupt replacement: logged, counted, and the last good
    // certificate stays in use.
    let scrape_failed = || reloads(&sluice, "server.tls", "failed");
    let failed_before = scrape_failed().await;
    sluice_testkit::pki::replace(
        &pki.path("server.pem"),
        b"-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    // A counter: more than before is one more at least.
    reaches(
        "the corrupt file is seen and refused",
        failed_before + 1.0,
        scrape_failed,
    )
    .await;
    assert_eq!(
        served_leaf(addr, &pki).await,
        newest,
        "the old material stays"
    );
    normal_tls_call(addr, &pki).await;
    assert!(sluice.is_ready());
}

async fn normal_tls_call(addr: std::net::SocketAddr, pki: &Pki) {
    let mut client = connect_as(addr, pki, None).await;
    within("a call", client.unary(Req::default()))
        .await
        .expect("served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_client_certificate_rotation_replaces_connections_once_their_calls_end() {
    let pki = pki();
    let (sluice, mut client, probe, server) = proxied_tls_upstream(&pki).await;
    assert_eq!(sluice.stats().upstream_connections, 1);
    // A call in flight on that connection while the certificate rotates.
    let mut slow = client.clone();
    let in_flight = tokio::spawn(async move {
        slow.unary(Req {
            delay_ms: 1500,
            ..Req::default()
        })
        .await
    });
    let scrape_swapped = || reloads(&sluice, "upstream.tls", "swapped");
    eventually("the slow call is at the upstream", || {
        probe.counts().started == 2
    })
    .await;
    pki.write("web", &Leaf::client(WEB, &["os:admin", "rotated"]));
    reaches("the new client certificate is loaded", 1.0, scrape_swapped).await;
    within("a call after the rotation", client.unary(Req::default()))
        .await
        .expect("a new connection with the new certificate serves it");
    assert_eq!(
        sluice.stats().upstream_connections,
        2,
        "the old connection still carries its call; a new one took the new call"
    );
    within("the call in flight", in_flight)
        .await
        .expect("joined")
        .expect("the call on the old connection completes");
    eventually("the old connection closes once its call ended", || {
        sluice.stats().upstream_connections == 1
    })
    .await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_is_served_on_a_unix_socket_beside_tcp() {
    let upstream = EchoServer::start().await;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sluice-listen-{}.sock", std::process::id()));
    let mut config = config(upstream.addr);
    config.server.listen_unix = Some(path.clone());
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).or_else(|_| {
        std::fs::remove_file(&path)?;
        std::os::unix::net::UnixListener::bind(&path)
    }));
    let sluice = start(&config).await;
    let unix = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let (mut send, conn) = h2::client::handshake(unix).await.expect("h2 over unix");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Req {
        seq: 5,
        ..Req::default()
    };
    let (status, got, trailers) = raw_unary(&mut send, &req).await;
    assert_eq!(status, 200);
    assert_eq!(trailers["grpc-status"], "0");
    assert!(got.len() > 5, "a reply message");
    assert_eq!(upstream.probe.counts().completed, 1);
    normal_calls(sluice.listen_addr(), 1).await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn unusable_tls_files_fail_the_start_naming_the_file() {
    let pki = pki();
    let upstream: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let mut config = tls_config(&pki, upstream, Some("required"));
    std::fs::write(pki.path("server.key"), "not a key").expect("write");
    let err = sluice::run(&config).await.expect_err("a bad key");
    assert!(err.to_string().contains("server.key"), "{err}");
    pki.write("server", &Leaf::server());
    config
        .server
        .tls
        .as_mut()
        .expect("tls")
        .client_auth
        .as_mut()
        .expect("auth")
        .ca = pki.path("missing.pem");
    let err = sluice::run(&config).await.expect_err("a missing CA");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // A key that is not the certificate's.
    let (_, other_key) = pki.issue(&Leaf::server());
    std::fs::write(pki.path("server.key"), other_key).expect("write");
    let mut config = tls_config(&pki, upstream, None);
    config.tls.reload_interval = Duration::from_secs(60);
    let err = sluice::run(&config).await.expect_err("a mismatched key");
    assert!(err.to_string().contains("server.tls"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_2_client_is_served_and_negotiates_h2() {
    let pki = pki();
    let (_upstream, sluice) = tls_sluice(&pki, None, |_| {}).await;
    let connector = pki.connector(&[b"h2"], &[&rustls::version::TLS12]);
    let tls = handshake_with("a TLS 1.2 handshake", connector, sluice.listen_addr())
        .await
        .expect("TLS 1.2 is accepted");
    let conn = tls.get_ref().1;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, h2conn) = h2::client::handshake(tls).await.expect("h2 over TLS");
    tokio::spawn(async move {
        let _ = h2conn.await;
    });
    let (_, _, trailers) = raw_unary(&mut send, &Req::default()).await;
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_rejects_the_new_client_certificate_keeps_being_served_on_the_old_connection()
 {
    let pki = pki();
    let (sluice, mut client, _probe, server) = proxied_tls_upstream(&pki).await;
    // The new certificate parses, but the upstream does not trust its CA
    // (it rotated first on sluice's side).
    let other = Pki::new("a CA the upstream does not know yet");
    let (cert, key) = other.issue(&Leaf::client(WEB, &["os:admin"]));
    sluice_testkit::pki::replace(&pki.path("web.key"), key.as_bytes());
    sluice_testkit::pki::replace(&pki.path("web.pem"), cert.as_bytes());
    let swapped = || reloads(&sluice, "upstream.tls", "swapped");
    reaches("the new certificate is loaded", 1.0, swapped).await;
    for seq in 0..20 {
        let reply = within(
            "a call after the rotation",
            client.unary(Req {
                seq,
                ..Req::default()
            }),
        )
        .await
        .unwrap_or_else(|s| panic!("call {seq} failed while the old connection works: {s:?}"));
        assert_eq!(reply.into_inner().seq, seq);
    }
    assert_eq!(sluice.stats().upstream_connections, 1, "still the old one");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_over_the_connection_limit_is_closed_before_its_handshake() {
    let pki = pki();
    let (_upstream, sluice) = tls_sluice(&pki, None, |config| {
        config.server.max_connections = 1;
    })
    .await;
    // The first connection is served.
    let mut first = connect_as(sluice.listen_addr(), &pki, None).await;
    within("a call", first.unary(Req::default()))
        .await
        .expect("served");
    let tcp = tokio::net::TcpStream::connect(sluice.listen_addr())
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let err = within(
        "a handshake over the limit",
        rustls_connector(&pki, &[b"h2"]).connect("localhost".try_into().expect("name"), tcp),
    )
    .await
    .expect_err("closed, no handshake");
    assert!(started.elapsed() < Duration::from_secs(5), "{err:?}");
    within("the first still works", first.unary(Req::default()))
        .await
        .expect("served");
}

/// Waits until `sluice_tls_reloads_total{material, outcome}` reaches `n`.
async fn reloads_reach(sluice: &Running, material: &str, outcome: &str, n: f64) {
    let what = format!("{n} {outcome} reloads of {material}");
    reaches(&what, n, || reloads(sluice, material, outcome)).await;
}

/// Issue #17.13: a key and a certificate rotated as two renames, with a
/// poll in between, is an ordinary rotation: the poll that sees the new
/// key with the old certificate defers, and the next one swaps. Only a
/// mismatch still there at the next poll is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_in_two_renames_is_no_failure_and_a_lasting_mismatch_is_one() {
    let pki = pki();
    let (_upstream, sluice) = tls_sluice(&pki, None, |_| {}).await;
    let addr = sluice.listen_addr();
    let (cert, key) = pki.issue(&Leaf {
        common_name: "localhost rotated".to_owned(),
        ..Leaf::server()
    });
    // The key first: a poll sees it with the old certificate.
    sluice_testkit::pki::replace(&pki.path("server.key"), key.as_bytes());
    reloads_reach(&sluice, "server.tls", "deferred", 1.0).await;
    // Then the certificate.
    sluice_testkit::pki::replace(&pki.path("server.pem"), cert.as_bytes());
    reloads_reach(&sluice, "server.tls", "swapped", 1.0).await;
    assert_eq!(reloads(&sluice, "server.tls", "failed").await, 0.0);
    assert_eq!(served_leaf(addr, &pki).await, pem_der(&cert));

    // A key that stays wrong: deferred once, then a failure, and the
    // material in use stays.
    let (_, stray) = pki.issue(&Leaf::server());
    sluice_testkit::pki::replace(&pki.path("server.key"), stray.as_bytes());
    reloads_reach(&sluice, "server.tls", "failed", 1.0).await;
    assert_eq!(reloads(&sluice, "server.tls", "deferred").await, 2.0);
    assert_eq!(served_leaf(addr, &pki).await, pem_der(&cert));
    normal_tls_call(addr, &pki).await;
}
