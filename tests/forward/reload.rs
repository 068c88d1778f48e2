//! Issue #20.1: the config file read again while calls run (`POST
//! /reload`, as SIGHUP and the file watch do): new calls follow the new
//! routes and groups at once, calls in flight finish where they started,
//! an invalid file changes nothing, and what needs a restart is said.

use std::{net::SocketAddr, path::PathBuf};

use sluice::{ConfigSource, Running};
use sluice_testkit::{EchoClient, EchoServer, Req};
use tonic::transport::Channel;

use crate::{
    metrics::{scrape, value},
    support::*,
};

/// A config file in the target's temporary directory, rewritten as a
/// ConfigMap is (a new file renamed over the old).
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(text: &str) -> Self {
        let path = temp_path("reload", "toml");
        let file = Self(path);
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        let next = self.0.with_extension("next");
        std::fs::write(&next, text).expect("write config");
        std::fs::rename(&next, &self.0).expect("rename config");
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A config whose default upstream is `upstream`, with `extra` after it.
fn text(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{upstream}\"\n{extra}"
    )
}

/// A sluice run from `file`, and a client of it.
async fn from_file(file: &ConfigFile) -> (Running, EchoClient<Channel>) {
    trace_init();
    let config = sluice::Config::from_file(&file.0).expect("valid config");
    let sluice = sluice::run_with(&config, Some(ConfigSource::file(&file.0, |_| {})))
        .await
        .expect("sluice");
    let client = sluice_testkit::client(sluice.listen_addr());
    (sluice, client)
}

async fn reload(sluice: &Running) -> (u16, String) {
    admin(sluice.admin_addr().expect("admin"), "POST", "/reload").await
}

/// Which echo server answered a unary call.
async fn served_by(client: &mut EchoClient<Channel>) -> String {
    let res = within("a unary call", client.unary(Req::default()))
        .await
        .expect("the call succeeds");
    res.metadata()
        .get("x-served-by")
        .expect("an echo server's answer")
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_calls_go_where_the_new_file_says_and_calls_in_flight_finish_where_they_began() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let file = ConfigFile::new(&text(a.addr, ""));
    let (sluice, mut client) = from_file(&file).await;
    assert_eq!(served_by(&mut client).await, a.addr.to_string());

    // A bidi call open on `a`, and a slow unary call on its way.
    let (tx, rx) = tokio::sync::mpsc::channel::<Req>(4);
    let mut bidi = within(
        "the bidi call",
        client.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("bidi starts")
    .into_inner();
    tx.send(Req::default()).await.expect("send");
    within("the first bidi reply", bidi.message())
        .await
        .expect("ok")
        .expect("a reply");
    let slow = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .unary(Req {
                    delay_ms: 300,
                    ..Req::default()
                })
                .await
        }
    });
    a.probe.wait_for(LIMIT, |c| c.started >= 3).await;

    file.write(&text(b.addr, ""));
    let (status, body) = reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("groups changed: default"), "{body}");
    assert!(body.contains("1 endpoint(s) left"), "{body}");

    // The very next call takes the new file.
    assert_eq!(served_by(&mut client).await, b.addr.to_string());
    // The calls that began on `a` end there, OK.
    let slow = within("the slow call", slow).await.expect("joined");
    assert_eq!(
        slow.expect("the slow call finishes OK")
            .metadata()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok()),
        Some(a.addr.to_string().as_str())
    );
    tx.send(Req::default()).await.expect("send");
    within("the second bidi reply", bidi.message())
        .await
        .expect("ok")
        .expect("a reply");
    drop(tx);
    assert!(
        within("the bidi end", bidi.message())
            .await
            .expect("the bidi call ends OK")
            .is_none()
    );
    assert_eq!(a.probe.counts().completed, 3);
    assert_eq!(b.probe.counts().completed, 1);

    let scrape = scrape(sluice.admin_addr().expect("admin")).await;
    assert_eq!(
        value(
            &scrape,
            "sluice_config_reloads_total",
            &[("outcome", "applied")]
        ),
        1.0
    );
    let (status, config) = admin(sluice.admin_addr().expect("admin"), "GET", "/config").await;
    assert_eq!(status, 200);
    assert!(config.contains("generation 1"), "{config}");
    assert!(config.contains(&b.addr.to_string()), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing_and_says_where_it_is_wrong() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let file = ConfigFile::new(&text(a.addr, ""));
    let (sluice, mut client) = from_file(&file).await;
    let admin_addr = sluice.admin_addr().expect("admin");
    let (_, before) = admin(admin_addr, "GET", "/config").await;

    // A valid upstream, and a key that does not exist on line 8.
    file.write(&text(b.addr, "[routing]\nno_such_key = 1\n"));
    let (status, body) = reload(&sluice).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains(":8:"), "names the line: {body}");
    assert!(body.contains("no_such_key"), "names the key: {body}");
    // A group whose TLS files do not exist is refused too.
    file.write(&text(
        b.addr,
        "[upstreams.g]\nendpoints = [\"127.0.0.1:1\"]\ntls = { ca = \"/nonexistent/ca.pem\" }\n",
    ));
    let (status, body) = reload(&sluice).await;
    assert_eq!(status, 422, "{body}");

    assert_eq!(served_by(&mut client).await, a.addr.to_string());
    assert_eq!(b.probe.counts().started, 0);
    let (_, after) = admin(admin_addr, "GET", "/config").await;
    assert_eq!(
        before.lines().skip(1).collect::<Vec<_>>(),
        after.lines().skip(1).collect::<Vec<_>>()
    );
    assert!(after.contains("generation 0"), "{after}");
    let (status, ready) = admin(admin_addr, "GET", "/ready").await;
    assert_eq!((status, ready.as_str()), (200, "ready\n"));
    let scrape = scrape(admin_addr).await;
    assert_eq!(
        value(
            &scrape,
            "sluice_config_reloads_total",
            &[("outcome", "invalid")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_needs_a_restart_is_named_and_the_rest_applied() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let file = ConfigFile::new(&text(a.addr, ""));
    let (sluice, mut client) = from_file(&file).await;
    let extra = format!(
        "[upstreams.b]\nendpoints = [\"{}\"]\n[[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"b\"\n",
        b.addr
    );
    let changed = text(a.addr, &format!("{extra}[runtime]\nworker_threads = 3\n"))
        .replace("[server]\n", "[server]\nmax_in_flight = 7\n");
    file.write(&changed);
    let (status, body) = reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("needs a restart (kept as it was): server, runtime"),
        "{body}"
    );
    assert!(body.contains("groups added: b"), "{body}");
    assert!(body.contains("routes changed"), "{body}");
    assert_eq!(served_by(&mut client).await, b.addr.to_string());

    // The same file again: nothing to apply, the restart still named.
    let (status, body) = reload(&sluice).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("unchanged"), "{body}");
    assert!(body.contains("needs a restart"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_without_a_file_is_a_conflict() {
    let (_upstream, sluice) = setup(|_| {}).await;
    let (status, body) = reload(&sluice).await;
    assert_eq!(status, 409, "{body}");
    let (status, config) = admin(sluice.admin_addr().expect("admin"), "GET", "/config").await;
    assert_eq!(status, 200);
    assert!(config.contains("embedded default"), "{config}");
}

/// The configs the load test cycles through, and which servers each
/// sends a unary call to.
fn cycle(a: SocketAddr, b: SocketAddr) -> Vec<(String, Vec<SocketAddr>)> {
    let route = "[[routes]]\nmethod = \"/sluice.test.Echo/Unary\"\nupstream = \"g\"\n";
    vec![
        (text(a, ""), vec![a]),
        (text(b, ""), vec![b]),
        (
            text(a, &format!("[upstreams.g]\nendpoints = [\"{b}\"]\n{route}")),
            vec![b],
        ),
        (
            text(
                b,
                &format!("[upstreams.g]\nendpoints = [\"{a}\", \"{b}\"]\n{route}"),
            ),
            vec![a, b],
        ),
        (
            text(
                b,
                &format!("[upstreams.g]\nendpoints = [\"{a}\"]\nstrategy = [\"random\"]\n{route}"),
            ),
            vec![a],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_fail_no_call() {
    const RELOADS: usize = 100;
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let configs = cycle(a.addr, b.addr);
    let file = ConfigFile::new(&configs[0].0);
    let (sluice, mut probe) = from_file(&file).await;

    // Four clients, each on its own connection, streaming until told to stop.
    let load = Load::start(sluice.listen_addr(), 4, |client| {
        Box::pin(async move {
            let mut stream = client
                .server_stream(Req {
                    replies: 2,
                    ..Req::default()
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        })
    });

    for i in 1..=RELOADS {
        let (config, expected) = &configs[i % configs.len()];
        file.write(config);
        let (status, body) = within("a reload", reload(&sluice)).await;
        assert_eq!(status, 200, "reload {i}: {body}");
        // The first call after the answer already follows the new file.
        let by = served_by(&mut probe).await;
        assert!(
            expected.iter().any(|e| e.to_string() == by),
            "reload {i}: served by {by}, expected one of {expected:?}"
        );
    }
    let (calls, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {calls} calls failed across {RELOADS} reloads: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    println!("{calls} streaming calls across {RELOADS} reloads, none failed");
}
