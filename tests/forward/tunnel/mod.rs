//! Issue #12: reverse tunnels. Hubs and agents are real sluices (through
//! `sluice::run`) in this process, on loopback; each agent forwards to a
//! tonic echo server of its own, so which one answered tells which agent
//! a call reached.

use std::{net::SocketAddr, time::Duration};

use sluice::{Config, Running};
use sluice_testkit::{EchoClient, EchoServer, Reply, Req};
use tonic::transport::Channel;

use crate::support::*;

mod handover;

/// A hub named `name` on the given addresses (port 0: a free one); `extra`
/// is appended to its `[tunnel.hub]` section.
pub(crate) fn hub_config(
    name: &str,
    listen: SocketAddr,
    tunnel: SocketAddr,
    extra: &str,
) -> Config {
    let text = format!(
        "[server]\nlisten = \"{listen}\"\n[admin]\nlisten = \"off\"\n\
         [tunnel.hub]\nallow_anonymous = true\nlisten = \"{tunnel}\"\nname = \"{name}\"\n{extra}\n\
         [[routes]]\nupstream = \"agents\"\n"
    );
    Config::from_toml_str(&text).expect("hub config")
}

/// Port 0 on loopback: a free port.
pub(crate) fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// A hub named `name` whose tunnel listener is `tunnel`; `extra` is
/// appended to its `[tunnel.hub]` section.
pub(crate) async fn hub_on(name: &str, tunnel: SocketAddr, extra: &str) -> Running {
    trace_init();
    sluice::run(&hub_config(name, any(), tunnel, extra))
        .await
        .unwrap_or_else(|e| panic!("hub {name} starts: {e:?}"))
}

/// A hub named `name` on free ports; `extra` is appended to its
/// `[tunnel.hub]` section.
pub(crate) async fn hub(name: &str, extra: &str) -> Running {
    hub_on(name, any(), extra).await
}

pub(crate) fn agent_config(
    id: &str,
    host: &str,
    hubs: &[SocketAddr],
    upstream: SocketAddr,
    extra: &str,
) -> Config {
    let hubs: Vec<String> = hubs.iter().map(|h| format!("\"{h}\"")).collect();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
         [upstream]\naddress = \"{upstream}\"\n\
         [tunnel.agent]\nhubs = [{}]\nid = \"{id}\"\nidentifiers = {{ host = [\"{host}\"] }}\n\
         backoff_min = \"10ms\"\nbackoff_max = \"50ms\"\n{extra}\n",
        hubs.join(", ")
    );
    Config::from_toml_str(&text).expect("agent config")
}

/// Agent `id`, known also as `host`, dialling `hubs` and forwarding to
/// `app`; `extra` is appended to its `[tunnel.agent]` section.
pub(crate) async fn agent(
    id: &str,
    host: &str,
    hubs: &[SocketAddr],
    app: SocketAddr,
    extra: &str,
) -> Running {
    sluice::run(&agent_config(id, host, hubs, app, extra))
        .await
        .unwrap_or_else(|e| panic!("agent {id} starts: {e:?}"))
}

/// An agent and the echo app of its own that it forwards to.
pub(crate) struct Agent {
    pub(crate) running: Running,
    pub(crate) app: EchoServer,
}

/// hub-1 with one agent per `(id, host)` connected to it, each in front of
/// an echo app of its own.
async fn hub_with_agents<const N: usize>(agents: [(&str, &str); N]) -> (Running, [Agent; N]) {
    hub_with_tuned_agents(agents, |_| {}).await
}

/// [`hub_with_agents`], with each agent's config tuned first.
async fn hub_with_tuned_agents<const N: usize>(
    agents: [(&str, &str); N],
    tune: impl Fn(&mut Config),
) -> (Running, [Agent; N]) {
    let hub = hub("hub-1", "").await;
    let hub_addr = hub.tunnel_addr().expect("a tunnel listener");
    let mut started = Vec::with_capacity(N);
    for (id, host) in agents {
        let app = EchoServer::start().await;
        let mut config = agent_config(id, host, &[hub_addr], app.addr, "");
        tune(&mut config);
        let running = sluice::run(&config)
            .await
            .unwrap_or_else(|e| panic!("agent {id} starts: {e:?}"));
        started.push(Agent { running, app });
    }
    eventually(&format!("{N} agents connected"), || {
        hub.group_len("agents") == N
    })
    .await;
    let Ok(agents) = started.try_into() else {
        unreachable!("one agent per (id, host)")
    };
    (hub, agents)
}

/// A call to agent `dest` that its app holds for `delay_ms`, in a task of
/// its own, on a clone of `client`.
fn held_call(
    client: &EchoClient<Channel>,
    dest: &str,
    delay_ms: u64,
) -> tokio::task::JoinHandle<Result<tonic::Response<Reply>, tonic::Status>> {
    let mut client = client.clone();
    let req = to(
        dest,
        Req {
            delay_ms,
            ..Req::default()
        },
    );
    tokio::spawn(async move { client.unary(req).await })
}

/// A sluice in a runtime of its own on its own thread, so that a test
/// can kill it outright (every socket closed at once, no drain), as a
/// machine that dies.
pub(crate) struct Killable {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tunnel: Option<SocketAddr>,
}

impl Killable {
    pub(crate) fn start(config: Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (up, is_up) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let running = sluice::run(&config).await.expect("agent starts");
                let _ = up.send(running.tunnel_addr());
                let _ = stopped.await;
                drop(running);
            });
            rt.shutdown_background();
        });
        let tunnel = is_up.recv().expect("the agent started");
        Self {
            stop: Some(stop),
            thread: Some(thread),
            tunnel,
        }
    }

    /// Where agents dial it, when it is a hub.
    pub(crate) fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel.expect("a hub")
    }

    pub(crate) fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub(crate) fn to(dest: &str, req: Req) -> tonic::Request<Req> {
    let mut req = tonic::Request::new(req);
    req.metadata_mut()
        .insert("x-dest-host", dest.parse().expect("ascii"));
    req
}

/// One unary call for agent `dest` (an id or a host) through `client`,
/// within [`LIMIT`].
pub(crate) async fn call(
    client: &mut EchoClient<Channel>,
    what: &str,
    dest: &str,
    req: Req,
) -> Result<Reply, tonic::Status> {
    within(what, client.unary(to(dest, req)))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_through_a_hub_reach_the_agent_named_by_id_or_host() {
    let (hub, [a, b]) = hub_with_agents([("node-a", "a.internal"), ("node-b", "b.internal")]).await;
    let (a_app, b_app) = (&a.app, &b.app);
    let tunnels = a.running.agent_tunnels().expect("an agent");
    assert_eq!((tunnels.claimed, tunnels.desired), (1, 1));

    let mut client = sluice_testkit::client(hub.listen_addr());
    for i in 0..5 {
        let req = Req {
            seq: i,
            ..Req::default()
        };
        call(&mut client, "to node-a by id", "node-a", req.clone())
            .await
            .expect("reached node-a");
        assert_eq!(
            a_app.probe.counts().completed,
            i + 1,
            "node-a's app answered"
        );
        call(&mut client, "to node-b by host", "b.internal", req)
            .await
            .expect("reached node-b");
        assert_eq!(
            b_app.probe.counts().completed,
            i + 1,
            "node-b's app answered"
        );
    }
    assert_eq!(a_app.probe.counts().completed, 5);
    assert_eq!(b_app.probe.counts().completed, 5);
    // Streams both ways through the tunnel, byte-exact.
    let replies = within(
        "a server stream through the tunnel",
        client.server_stream(to(
            "node-b",
            Req {
                replies: 50,
                reply_size: 70_000,
                ..Req::default()
            },
        )),
    )
    .await
    .expect("stream");
    let mut replies = replies.into_inner();
    let mut n = 0;
    while let Some(r) = within("a reply", replies.message()).await.expect("ok") {
        assert_eq!(r.payload.len(), 70_000);
        n += 1;
    }
    assert_eq!(n, 50);
    drop(b.running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_loss_fails_its_calls_with_unavailable_at_once_and_removes_it() {
    let hub = hub("hub-1", "").await;
    let hub_addr = hub.tunnel_addr().expect("tunnel listener");
    let app = EchoServer::start().await;
    let agent = Killable::start(agent_config(
        "node-a",
        "a.internal",
        &[hub_addr],
        app.addr,
        "",
    ));
    eventually("the agent connected", || hub.group_len("agents") == 1).await;
    let mut client = sluice_testkit::client(hub.listen_addr());
    call(&mut client, "a call", "node-a", Req::default())
        .await
        .expect("served");
    let in_flight = held_call(&client, "node-a", 8_000);
    eventually("the slow call is at the app", || {
        app.probe.counts().started == 2
    })
    .await;
    let killed = std::time::Instant::now();
    tokio::task::spawn_blocking(move || agent.kill())
        .await
        .expect("killed");
    let status = within("the call in flight ends", in_flight)
        .await
        .expect("joined")
        .expect_err("its agent is gone");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "at once, not at the call's end"
    );
    eventually("the agent left the group", || hub.group_len("agents") == 0).await;
    let status = call(
        &mut client,
        "a call with no agent",
        "node-a",
        Req::default(),
    )
    .await
    .expect_err("no agent");
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_never_slows_another_call_on_the_same_tunnel() {
    let (hub, [node_a]) = hub_with_agents([("node-a", "a.internal")]).await;
    let app = &node_a.app;
    // Four readers ask for 32 MiB each and read nothing.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut client = raw_client(hub.listen_addr()).await;
        let mut head = grpc_head("ServerStream");
        head.headers_mut()
            .insert("x-dest-host", "node-a".parse().expect("ascii"));
        let (response, _body) = stalled_stream(&mut client, head).await;
        stalled.push((client, response));
    }
    eventually("the app is blocked on the stalled streams", || {
        app.probe.counts().replies_sent >= 16
    })
    .await;
    let mut other = sluice_testkit::client(hub.listen_addr());
    let started = std::time::Instant::now();
    for seq in 0..50 {
        let req = Req {
            seq,
            payload: vec![7; 1024].into(),
            ..Req::default()
        };
        let reply = call(&mut other, "a call beside the stalled ones", "node-a", req)
            .await
            .expect("served");
        assert_eq!(reply.seq, seq);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "50 calls took {:?}",
        started.elapsed()
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_addresses_of_one_hub_make_one_tunnel() {
    // The hub says a second hub exists, so the agent wants two tunnels;
    // both of its addresses lead to hub-1: the second claim is refused
    // and only one tunnel stays.
    let hub = hub("hub-1", "peers = [{ name = \"hub-2\" }]").await;
    let hub_addr = hub.tunnel_addr().expect("tunnel listener");
    let app = EchoServer::start().await;
    let agent = agent("node-a", "a.internal", &[hub_addr, hub_addr], app.addr, "").await;
    eventually("the agent connected", || hub.group_len("agents") == 1).await;
    eventually("the agent wants two and holds one", || {
        agent
            .agent_tunnels()
            .is_some_and(|t| t.desired == 2 && t.claimed == 1)
    })
    .await;
    // It keeps dialling for hub-2 and landing on hub-1: each of those
    // tunnels is closed, never added.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(hub.group_len("agents") <= 1, "a duplicate tunnel stayed");
        assert_eq!(agent.agent_tunnels().expect("agent").claimed, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_released_on_failure_so_the_agent_connects_after_100_failed_dials() {
    // A port with nothing on it yet.
    let hub_addr = closed_addr();
    let app = EchoServer::start().await;
    let mut config = agent_config("node-a", "a.internal", &[hub_addr], app.addr, "");
    let a = config.tunnel.agent.as_mut().expect("agent");
    a.backoff_min = Duration::from_millis(1);
    a.backoff_max = Duration::from_millis(2);
    let agent = sluice::run(&config).await.expect("agent");
    eventually("100 dials failed", || {
        agent.agent_tunnels().is_some_and(|t| t.failed_dials >= 100)
    })
    .await;
    let t = agent.agent_tunnels().expect("agent");
    assert!(t.inflight <= 1, "no leaked lease: {t:?}");
    // The hub comes up on that port: the agent gets there.
    let hub = hub_on("late", hub_addr, "").await;
    eventually("the agent connected", || hub.group_len("agents") == 1).await;
    let mut client = sluice_testkit::client(hub.listen_addr());
    call(&mut client, "a call", "node-a", Req::default())
        .await
        .expect("served through the late hub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_and_a_wrong_version_never_join_the_group() {
    let hub = hub(
        "hub-1",
        "tokens = [\"s3cret\"]\nhandshake_timeout = \"300ms\"",
    )
    .await;
    let hub_addr = hub.tunnel_addr().expect("tunnel listener");
    let app = EchoServer::start().await;
    let bad = agent(
        "bad",
        "bad.internal",
        &[hub_addr],
        app.addr,
        "token = \"guess\"",
    )
    .await;
    eventually("the bad agent was refused a few times", || {
        bad.agent_tunnels().is_some_and(|t| t.failed_dials >= 3)
    })
    .await;
    assert_eq!(hub.group_len("agents"), 0);
    let good = agent(
        "good",
        "good.internal",
        &[hub_addr],
        app.addr,
        "token = \"s3cret\"",
    )
    .await;
    eventually("the good agent connected", || hub.group_len("agents") == 1).await;
    assert_eq!(good.agent_tunnels().expect("agent").failed_dials, 0);
    // A peer that speaks an unknown version: 426 with the reason.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(hub_addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"GET /sluice-tunnel HTTP/1.1\r\nhost: hub\r\nconnection: upgrade\r\nupgrade: sluice-tunnel/1\r\n\
          authorization: Bearer s3cret\r\nsluice-agent-id: x\r\nsluice-versions: 9\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = String::new();
    within("the refusal", tcp.read_to_string(&mut answer))
        .await
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(answer.contains("no common protocol version"), "{answer}");
    // One that opens the Upgrade and stalls costs the handshake timeout:
    // closed then, not before, not never.
    let started = std::time::Instant::now();
    let mut stall = tokio::net::TcpStream::connect(hub_addr)
        .await
        .expect("connect");
    stall
        .write_all(b"GET /sluice-tunnel HTTP/1.1\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    within(
        "the stalled handshake is closed",
        stall.read_to_end(&mut rest),
    )
    .await
    .expect("closed");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hub.group_len("agents"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_rollout_moves_the_agent_to_the_new_generation_before_the_old_tunnel_closes() {
    // The old hub already tells of the new generation, which is not up
    // yet: the agent must keep its old tunnel while it cannot reach it.
    let old = std::sync::Arc::new(
        hub(
            "hub-old",
            "generation = 1\npeers = [{ name = \"hub-new\", generation = 2 }]",
        )
        .await,
    );
    let old_addr = old.tunnel_addr().expect("tunnel listener");
    // The new hub's port, free until it starts.
    let new_addr = closed_addr();
    let app = EchoServer::start().await;
    let agent = agent(
        "node-a",
        "a.internal",
        &[old_addr, new_addr],
        app.addr,
        "discovery_interval = \"50ms\"",
    )
    .await;
    eventually("the agent is on the old hub", || {
        old.group_len("agents") == 1
    })
    .await;
    // Load: through whichever hub has the agent, the new one as soon as it
    // does (as clients behind a load balancer move).
    let new_slot: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<Running>>>> =
        std::sync::Arc::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (old, new_slot, stop) = (old.clone(), new_slot.clone(), stop.clone());
        async move {
            let mut to_old = sluice_testkit::client(old.listen_addr());
            let mut to_new = None;
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let new = new_slot.lock().expect("slot").clone();
                let client = match &new {
                    Some(new) if new.group_len("agents") == 1 => {
                        to_new.get_or_insert_with(|| sluice_testkit::client(new.listen_addr()))
                    }
                    _ => &mut to_old,
                };
                match client.unary(to("node-a", Req::default())).await {
                    Ok(_) => ok += 1,
                    Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            (ok, failed)
        }
    });
    eventually("the agent tried the unreachable new hub many times", || {
        agent.agent_tunnels().is_some_and(|t| t.failed_dials >= 40)
    })
    .await;
    assert_eq!(
        old.group_len("agents"),
        1,
        "the old tunnel stays while no new one exists"
    );
    assert_eq!(agent.agent_tunnels().expect("agent").desired, 1);

    let new = std::sync::Arc::new(hub_on("hub-new", new_addr, "generation = 2").await);
    *new_slot.lock().expect("slot") = Some(new.clone());
    // Make-before-break: the new tunnel exists while the old one still does.
    let mut both = false;
    within("the agent moved to the new hub", async {
        loop {
            let (n, o) = (new.group_len("agents"), old.group_len("agents"));
            assert!(n == 1 || o == 1, "a moment with no tunnel at all");
            both |= n == 1 && o == 1;
            if n == 1 && o == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        both,
        "the old tunnel closed only once the new one was there"
    );
    // The old hub lets the agent go before the agent's side of that tunnel
    // has ended: its claim goes a moment later.
    eventually("the agent holds the new tunnel only", || {
        agent
            .agent_tunnels()
            .is_some_and(|t| (t.desired, t.claimed) == (1, 1))
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = within("the load", load).await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "the load ran: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_an_agent_and_metrics_count_tunnels() {
    trace_init();
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\nready_requires_agents = true\n\
                [tunnel.hub]\nallow_anonymous = true\nlisten = \"127.0.0.1:0\"\nname = \"hub-1\"\n[[routes]]\nupstream = \"agents\"\n";
    let hub = sluice::run(&Config::from_toml_str(text).expect("config"))
        .await
        .expect("hub");
    let hub_admin = hub.admin_addr().expect("admin");
    let (status, body) = admin(hub_admin, "GET", "/ready").await;
    assert_eq!((status, body.as_str()), (503, "no agent connected\n"));
    let app = EchoServer::start().await;
    let mut config = agent_config(
        "node-a",
        "a.internal",
        &[hub.tunnel_addr().expect("tunnel")],
        app.addr,
        "",
    );
    config.admin.listen = sluice::config::AdminListen::On("127.0.0.1:0".parse().expect("addr"));
    let agent = sluice::run(&config).await.expect("agent");
    eventually("the agent connected", || hub.group_len("agents") == 1).await;
    let (status, _) = admin(hub_admin, "GET", "/ready").await;
    assert_eq!(status, 200);
    let scrape = crate::metrics::scrape(hub_admin).await;
    assert_eq!(
        crate::metrics::value(&scrape, "sluice_hub_agents", &[]),
        1.0
    );
    let scrape = crate::metrics::scrape(agent.admin_addr().expect("admin")).await;
    assert_eq!(
        crate::metrics::value(&scrape, "sluice_agent_hubs_claimed", &[]),
        1.0
    );
    assert_eq!(
        crate::metrics::value(&scrape, "sluice_agent_hubs_desired", &[]),
        1.0
    );
    assert_eq!(
        crate::metrics::value(&scrape, "sluice_agent_tunnels", &[("hub", "hub-1")]),
        1.0
    );
    // Only a hub has agents to wait for.
    let err =
        Config::from_toml_str("[admin]\nready_requires_agents = true\n").expect_err("not a hub");
    assert!(err.to_string().contains("[tunnel.hub]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_hub_closes_its_tunnels_and_the_agent_rehomes() {
    let a = hub("hub-a", "peers = [{ name = \"hub-b\" }]").await;
    let b = hub("hub-b", "peers = [{ name = \"hub-a\" }]").await;
    let (a_addr, b_addr) = (a.tunnel_addr().expect("a"), b.tunnel_addr().expect("b"));
    let (app, slow_app) = (EchoServer::start().await, EchoServer::start().await);
    // One tunnel each at most: an agent holds one hub at a time.
    let hubs = [a_addr, b_addr];
    let _agent = agent("node-a", "a.internal", &hubs, app.addr, "connections = 1").await;
    let _slow = agent(
        "node-slow",
        "slow.internal",
        &hubs,
        slow_app.addr,
        "connections = 1",
    )
    .await;
    eventually("both agents are on hub-a", || a.group_len("agents") == 2).await;
    // A long call through hub-a holds its drain open.
    let long = held_call(&sluice_testkit::client(a.listen_addr()), "node-slow", 3_000);
    eventually("the long call is at its app", || {
        slow_app.probe.counts().started == 1
    })
    .await;
    // Running::drain takes the handle: watch hub-a's group through this.
    let a_groups = a.group_len_fn("agents");
    let drain = tokio::spawn(a.drain());
    // Told to re-home, each agent opens its tunnel to hub-b before the one
    // to hub-a closes: at no moment is an agent on neither hub.
    within("both agents re-homed to hub-b", async {
        loop {
            let (on_a, on_b) = (a_groups(), b.group_len("agents"));
            assert!(
                on_a + on_b >= 2,
                "an agent on no hub: {on_a} on hub-a, {on_b} on hub-b"
            );
            if on_b == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut to_b = sluice_testkit::client(b.listen_addr());
    call(
        &mut to_b,
        "a call to node-a through hub-b",
        "node-a",
        Req::default(),
    )
    .await
    .expect("served");
    assert!(
        !drain.is_finished(),
        "re-homed before hub-a finished draining"
    );
    within("the long call", long)
        .await
        .expect("joined")
        .expect("the call in flight through the draining hub completes");
    let report = within("hub-a's drain", drain).await.expect("joined");
    assert_eq!(report.cut_off, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_is_chosen_last() {
    let (hub, [one, two]) =
        hub_with_agents([("one", "shared.internal"), ("two", "shared.internal")]).await;
    let (one_app, two_app) = (&one.app, &two.app);
    // A long call on agent one holds its drain (and its tunnel) open.
    let mut client = sluice_testkit::client(hub.listen_addr());
    let long = held_call(&client, "one", 2_000);
    eventually("the long call is at agent one's app", || {
        one_app.probe.counts().started == 1
    })
    .await;
    let drain = tokio::spawn(one.running.drain());
    // GOAWAY on its tunnel: once the hub has read it, calls that both
    // agents could take go to the one that is not draining.
    within("the hub sees agent one draining", async {
        while two_app.probe.counts().completed == 0 {
            client
                .unary(to("shared.internal", Req::default()))
                .await
                .expect("served by one agent or the other");
        }
    })
    .await;
    let before = two_app.probe.counts().completed;
    for _ in 0..20 {
        call(
            &mut client,
            "a call to the shared host",
            "shared.internal",
            Req::default(),
        )
        .await
        .expect("served");
    }
    assert_eq!(
        two_app.probe.counts().completed - before,
        20,
        "every call went to the agent that is not draining"
    );
    within("the long call", long)
        .await
        .expect("joined")
        .expect("completes on the draining agent");
    within("agent one's drain", drain).await.expect("joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_over_mutual_tls_refuse_an_agent_without_a_certificate_before_the_upgrade() {
    use sluice_testkit::pki::{Leaf, Pki};
    let pki = Pki::new("tunnel CA");
    let (cert, key) = pki.write("hub", &Leaf::server());
    let (agent_cert, agent_key) =
        pki.write("agent", &Leaf::client("spiffe://edge/agent/node-a", &[]));
    let hub = hub(
        "hub-1",
        &format!(
            "[tunnel.hub.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_auth = {{ ca = {:?} }}\n",
            pki.path("ca.pem")
        ),
    )
    .await;
    let hub_addr = hub.tunnel_addr().expect("tunnel listener");
    let app = EchoServer::start().await;
    let tls = |with_cert: bool| {
        let mut t = format!(
            "tls = {{ ca = {:?}, server_name = \"localhost\"",
            pki.path("ca.pem")
        );
        if with_cert {
            t.push_str(&format!(", cert = {agent_cert:?}, key = {agent_key:?}"));
        }
        t.push_str(" }");
        t
    };
    let bare = agent("bare", "bare.internal", &[hub_addr], app.addr, &tls(false)).await;
    eventually(
        "the agent without a certificate is refused a few times",
        || bare.agent_tunnels().is_some_and(|t| t.failed_dials >= 3),
    )
    .await;
    assert_eq!(hub.group_len("agents"), 0);
    let _good = agent("node-a", "a.internal", &[hub_addr], app.addr, &tls(true)).await;
    eventually("the certified agent connected", || {
        hub.group_len("agents") == 1
    })
    .await;
    // The same certificate claiming another agent's id: refused (403).
    let impostor = agent("node-b", "b.internal", &[hub_addr], app.addr, &tls(true)).await;
    eventually("the impostor is refused a few times", || {
        impostor
            .agent_tunnels()
            .is_some_and(|t| t.failed_dials >= 3)
    })
    .await;
    assert_eq!(hub.group_len("agents"), 1);
    let mut client = sluice_testkit::client(hub.listen_addr());
    let req = Req {
        seq: 3,
        ..Req::default()
    };
    call(&mut client, "a call over the TLS tunnel", "node-a", req)
        .await
        .expect("served");
    // Plaintext to a TLS hub: refused at once, never an endpoint.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(hub_addr)
        .await
        .expect("connect");
    plain
        .write_all(b"GET /sluice-tunnel HTTP/1.1\r\nupgrade: sluice-tunnel/1\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    within("the refusal", plain.read_to_end(&mut answer))
        .await
        .expect("closed, not reset");
    assert!(
        !answer.starts_with(b"HTTP/1.1 101"),
        "no upgrade without TLS"
    );
    assert_eq!(hub.group_len("agents"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_hub_cannot_forge_a_rehome_request() {
    let (hub, [node_a]) = hub_with_agents([("node-a", "a.internal")]).await;
    let mut client = raw_client(hub.listen_addr()).await;
    let head = http::Request::post("http://hub/sluice.tunnel.v1.Hub/Rehome")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-dest-host", "node-a")
        .header("sluice-hub-draining", "hub-1")
        .header("sluice-control-key", "guessed")
        .body(())
        .expect("request");
    let (response, _) = client.send_request(head, true).expect("send");
    let response = within("the forged request's answer", response)
        .await
        .expect("response");
    // Not the agent's control answer: forwarded to the app, which does not
    // know the method.
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().expect("ascii")),
        Some("12"),
        "{response:?}"
    );
    let t = node_a.running.agent_tunnels().expect("agent");
    assert_eq!((t.desired, t.claimed), (1, 1), "the agent did not re-home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_holds_at_most_max_agents_tunnels() {
    let hub = hub("hub-1", "max_agents = 1").await;
    let hub_addr = hub.tunnel_addr().expect("tunnel listener");
    let app = EchoServer::start().await;
    let _one = agent("one", "one.internal", &[hub_addr], app.addr, "").await;
    eventually("the first agent connected", || hub.group_len("agents") == 1).await;
    let two = agent("two", "two.internal", &[hub_addr], app.addr, "").await;
    eventually("the second agent is turned away a few times", || {
        two.agent_tunnels().is_some_and(|t| t.failed_dials >= 3)
    })
    .await;
    assert_eq!(hub.group_len("agents"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_outlives_the_agents_idle_and_first_request_deadlines() {
    let (hub, [node_a]) = hub_with_tuned_agents([("node-a", "a.internal")], |config| {
        config.server.handshake_timeout = Duration::from_millis(100);
        config.server.idle_timeout = Duration::from_millis(100);
    })
    .await;
    let agent = &node_a.running;
    // Idle well past both deadlines: nothing may happen to the tunnel.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t = agent.agent_tunnels().expect("agent");
    assert_eq!(
        t.claims, 1,
        "the tunnel was never closed and dialled again: {t:?}"
    );
    let mut client = sluice_testkit::client(hub.listen_addr());
    call(
        &mut client,
        "a call after the idle time",
        "node-a",
        Req::default(),
    )
    .await
    .expect("served on the same tunnel");
    assert_eq!(agent.agent_tunnels().expect("agent").claims, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_for_a_missing_agent_never_reaches_another() {
    let hub = hub("hub-1", "").await;
    let hub_addr = hub.tunnel_addr().expect("tunnel listener");
    let (a_app, b_app) = (EchoServer::start().await, EchoServer::start().await);
    let a = Killable::start(agent_config(
        "node-a",
        "a.internal",
        &[hub_addr],
        a_app.addr,
        "",
    ));
    let _b = agent("node-b", "b.internal", &[hub_addr], b_app.addr, "").await;
    eventually("both connected", || hub.group_len("agents") == 2).await;
    tokio::task::spawn_blocking(move || a.kill())
        .await
        .expect("killed");
    eventually("node-a left", || hub.group_len("agents") == 1).await;
    let mut client = sluice_testkit::client(hub.listen_addr());
    let status = call(&mut client, "a call for node-a", "node-a", Req::default())
        .await
        .expect_err("node-a is gone");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(b_app.probe.counts().started, 0, "never node-b's network");
    drop(a_app);
}

#[test]
fn a_hub_must_ask_agents_for_a_token_or_a_certificate_unless_told_otherwise() {
    let open = "[tunnel.hub]\nlisten = \"127.0.0.1:0\"\nname = \"hub-1\"\n";
    let err = Config::from_toml_str(open).expect_err("anyone could become an agent");
    assert!(err.to_string().contains("allow_anonymous"), "{err}");
    Config::from_toml_str(&format!("{open}tokens = [\"t\"]\n")).expect("a token");
    Config::from_toml_str(&format!("{open}allow_anonymous = true\n")).expect("said so");
}
