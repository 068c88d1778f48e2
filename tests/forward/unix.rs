//! Issue #11 §1 (the first seam): an upstream reached over a Unix domain
//! socket (`unix:/path`), as a sidecar often reaches its application.

use sluice_testkit::{Echo, Probe, Req, pb::echo_server::EchoServer};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_on_a_unix_socket_is_forwarded_to() {
    trace_init();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("echo-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).expect("bind a unix socket");
    let probe = Probe::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Echo::new(probe.clone())))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let mut config = config("127.0.0.1:1".parse().expect("addr"));
    config.upstream.address = format!("unix:{}", path.display())
        .parse()
        .expect("unix address");
    let sluice = sluice::run(&config).await.expect("sluice");
    let mut client = sluice_testkit::client(sluice.listen_addr());
    let reply = within(
        "a call over the unix socket",
        client.unary(Req {
            seq: 9,
            ..Req::default()
        }),
    )
    .await
    .expect("forwarded")
    .into_inner();
    assert_eq!(reply.seq, 9);
    assert_eq!(probe.counts().completed, 1);
    server.abort();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_relative_unix_path_is_a_config_error() {
    let err = sluice::Config::from_toml_str("[upstream]\naddress = \"unix:sock\"\n")
        .expect_err("relative");
    assert!(err.to_string().contains("absolute"), "{err}");
}
