//! Issue #17 (8–11): a hub restarted in place or run as replicas behind
//! one address (one name, several processes), a hub that comes back
//! after a drain, and an agent that drains. Hubs and agents are real
//! sluices on loopback; the hubs of one name share their ports with
//! `SO_REUSEPORT`, as two processes of a rolling restart do.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice::{Config, Running};
use sluice_testkit::{EchoServer, Req};

use super::{Killable, agent, any, call, hub, hub_config, to};
use crate::support::*;

/// A hub of the same name on the same ports as `first`: its restart in
/// place, or a replica.
async fn same_hub(first: &Running, extra: &str) -> Running {
    let tunnel = first.tunnel_addr().expect("a hub");
    sluice::run(&hub_config("hub-1", first.listen_addr(), tunnel, extra))
        .await
        .expect("the second process of hub-1 starts")
}

/// Clients calling one agent through a hub address, each on its own
/// connection, one call after another, until stopped.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<tonic::Status>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, agent: &str, clients: usize) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = (0..clients)
            .map(|_| {
                let (ok, failed, stopped) = (ok.clone(), failed.clone(), stopped.clone());
                let agent = agent.to_owned();
                tokio::spawn(async move {
                    let mut client = sluice_testkit::client(addr);
                    while !*stopped.borrow() {
                        match tokio::time::timeout(LIMIT, client.unary(to(&agent, Req::default())))
                            .await
                        {
                            Ok(Ok(_)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(status)) => failed.lock().expect("lock").push(status),
                            Err(_) => failed
                                .lock()
                                .expect("lock")
                                .push(tonic::Status::deadline_exceeded("hung")),
                        }
                    }
                })
            })
            .collect();
        Self {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    /// Waits until `n` more calls succeeded.
    async fn more(&self, what: &str, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        eventually(what, || self.ok.load(Ordering::Relaxed) >= target).await;
    }

    async fn stop(self) -> (u64, Vec<tonic::Status>) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            within("a load client stops", t).await.expect("joined");
        }
        let failed = self.failed.lock().expect("lock").clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// Issue #17.8 and #17.11: a new process of hub-1 takes the ports, the old
/// one drains under load. The old one re-homes its agent before its
/// clients get GOAWAY, so a client that reconnects (to the new process,
/// the only one listening) finds the agent there: no call fails, even with
/// calls for a missing agent failing at once (`agent_wait = "0s"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_hub_restart_under_load_fails_no_call() {
    trace_init();
    let strict = "agent_wait = \"0s\"";
    let old = hub("hub-1", strict).await;
    let app = EchoServer::start().await;
    let tunnel = old.tunnel_addr().expect("a hub");
    let _agent = agent("agent-a", "a.internal", &[tunnel], app.addr, "").await;
    eventually("the agent joined the old hub", || {
        old.group_len("agents") == 1
    })
    .await;
    let load = Load::start(old.listen_addr(), "agent-a", 4);
    load.more("calls through the old hub", 50).await;

    let new = same_hub(&old, strict).await;
    let report = within("the old hub drains", old.drain()).await;
    assert_eq!(report.cut_off, 0);
    assert_eq!(
        new.group_len("agents"),
        1,
        "the agent moved to the new process"
    );
    load.more("calls through the new hub", 100).await;
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
}

/// Issue #17.8: two processes of one hub behind one address (one config,
/// ports shared) each get the agent: it learns of the second process by
/// a discovery that reaches it, and dials until it holds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_one_hub_behind_one_address_each_get_the_agent() {
    trace_init();
    let first = hub("hub-1", "").await;
    let second = same_hub(&first, "").await;
    let app = EchoServer::start().await;
    let tunnel = first.tunnel_addr().expect("a hub");
    let discovery = "discovery_interval = \"50ms\"";
    let agent = agent("agent-a", "a.internal", &[tunnel], app.addr, discovery).await;
    eventually("both replicas hold the agent", || {
        first.group_len("agents") == 1 && second.group_len("agents") == 1
    })
    .await;
    assert_eq!(agent.agent_tunnels().expect("agent").claimed, 2);
    // Each replica serves the agent's calls.
    for hub in [&first, &second] {
        let mut client = sluice_testkit::client(hub.listen_addr());
        call(&mut client, "a call", "agent-a", Req::default())
            .await
            .expect("served by this replica");
    }
}

/// Issue #17.9: a hub drains and, after a while, comes back (another
/// process, same name and port). The closed tunnel gave up its claim, and
/// the drain was no failure: the agent is back within `backoff_max` of
/// the hub's return, not after a duplicate refusal and a longer wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_returns_within_backoff_max_when_its_hub_comes_back() {
    trace_init();
    let hub = hub("hub-1", "").await;
    let (listen, tunnel) = (hub.listen_addr(), hub.tunnel_addr().expect("a hub"));
    let app = EchoServer::start().await;
    let agent = sluice::run(&agent_config_backoff(&[tunnel], app.addr, "1s"))
        .await
        .expect("agent");
    eventually("connected", || hub.group_len("agents") == 1).await;
    within("the hub drains", hub.drain()).await;
    // Down long enough for the agent's backoff to reach its maximum.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let back = sluice::run(&hub_config("hub-1", listen, tunnel, ""))
        .await
        .expect("the hub comes back");
    let since = Instant::now();
    eventually("the agent came back", || back.group_len("agents") >= 1).await;
    let took = since.elapsed();
    assert!(
        took <= Duration::from_millis(1_000 + 700),
        "back after {took:?}: more than backoff_max (1 s) and a handshake"
    );
    drop(agent);
}

/// An agent `agent-b` with `backoff_min = 10ms` and the given maximum.
fn agent_config_backoff(hubs: &[SocketAddr], upstream: SocketAddr, max: &str) -> Config {
    let hubs: Vec<String> = hubs.iter().map(|h| format!("\"{h}\"")).collect();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
         [upstream]\naddress = \"{upstream}\"\n\
         [tunnel.agent]\nhubs = [{}]\nid = \"agent-b\"\n\
         backoff_min = \"10ms\"\nbackoff_max = \"{max}\"\n",
        hubs.join(", ")
    );
    Config::from_toml_str(&text).expect("agent config")
}

/// Issue #17.10: an agent whose tunnel broke is sleeping a long backoff
/// when its drain begins: the drain ends at once (no call is open), and
/// reports nothing cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_exits_when_its_calls_end_not_after_its_backoff() {
    trace_init();
    let hub = Killable::start(hub_config("hub-1", any(), any(), ""));
    let tunnel = hub.tunnel_addr();
    let app = EchoServer::start().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n\
         [upstream]\naddress = \"{}\"\n[drain]\ndeadline = \"3s\"\n\
         [tunnel.agent]\nhubs = [\"{tunnel}\"]\nid = \"agent-a\"\n\
         backoff_min = \"20s\"\nbackoff_max = \"40s\"\n",
        app.addr
    );
    let agent = sluice::run(&Config::from_toml_str(&text).expect("agent config"))
        .await
        .expect("agent");
    eventually("connected", || {
        agent.agent_tunnels().is_some_and(|t| t.claimed == 1)
    })
    .await;
    tokio::task::spawn_blocking(move || hub.kill())
        .await
        .expect("killed");
    eventually("the tunnel is gone", || {
        agent.agent_tunnels().is_some_and(|t| t.claimed == 0)
    })
    .await;
    // Now the agent sleeps 10–20 s before its next dial.
    let report = within("the agent drains", agent.drain()).await;
    assert_eq!(report.cut_off, 0, "no call was open");
    assert!(
        report.elapsed < Duration::from_secs(3),
        "the drain waited for the backoff: {:?}",
        report.elapsed
    );
}
