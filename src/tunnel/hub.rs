//! The hub: accepts agents' tunnels and makes each one an endpoint of the
//! agents' upstream group, for as long as the tunnel lasts.
//!
//! An agent that fails the handshake (a bad token, no common version, a
//! malformed or stalled request) is refused with its reason within
//! `tunnel.hub.handshake_timeout`. An accepted one is dialled at once (the
//! hub is the HTTP/2 client on the connection the agent opened); when the
//! tunnel ends its endpoint leaves the group, and calls in flight on it
//! fail with UNAVAILABLE at once (the connection is gone). An agent that
//! drains sends GOAWAY on its tunnel: its endpoint counts as draining and
//! is chosen last.
//!
//! A hub's drain begins with a hand-over ([`HandOver`]), before its
//! clients get GOAWAY: it stops taking agents and tells each one to re-home
//! (a control request on the tunnel, with the key only the hub and the
//! agent know, naming this hub process); the agent dials again (reaching
//! another hub, or the process that replaces this one under the same
//! name), and answers once it holds the tunnels it wants. Only then (or
//! after [`REHOME_GRACE`]) do clients get GOAWAY, so that a client that
//! reconnects finds its agent at the new hub; the agent drains this
//! tunnel a second later, and the hub closes what is left as its calls
//! end.

use std::{net::SocketAddr, sync::Arc};

use sluice_layers::drain::Watch;
use tokio::{task::JoinSet, time::Instant};
use tracing::{debug, info, warn};

use super::handshake::{self, HubPolicy};
use crate::{
    balance::{AgentEndpoint, Endpoint, Group},
    config::{HubConfig, UpstreamConfig},
    proto::transport::Stream,
    stats::Counters,
    tls::server::ServerTls,
};

/// The first step of a hub's drain: agents re-homed before clients are
/// told to go. Held by the process; [`HandOver::run`] starts it.
#[derive(Debug)]
pub(crate) struct HandOver {
    begin: tokio::sync::watch::Sender<bool>,
    /// Closed once every tunnel task has had its agent's answer (each
    /// holds a sender; the accept loop holds one until it stops).
    moved: tokio::sync::mpsc::Receiver<()>,
}

/// What the hub's tasks hold of a [`HandOver`].
#[derive(Clone, Debug)]
pub(crate) struct HandOverWatch {
    begun: tokio::sync::watch::Receiver<bool>,
    /// Held, never sent on: dropping every one tells the hand-over that
    /// each task is done.
    _moved: tokio::sync::mpsc::Sender<()>,
}

/// A hand-over and what the hub's tasks watch it by.
pub(crate) fn hand_over() -> (HandOver, HandOverWatch) {
    let (begin, begun) = tokio::sync::watch::channel(false);
    let (tx, moved) = tokio::sync::mpsc::channel(1);
    (
        HandOver { begin, moved },
        HandOverWatch { begun, _moved: tx },
    )
}

impl HandOver {
    /// Tells every agent to re-home and waits until each has answered (it
    /// holds its tunnels elsewhere), at most [`REHOME_GRACE`].
    pub(crate) async fn run(mut self) {
        let _ = self.begin.send(true);
        if tokio::time::timeout(REHOME_GRACE, self.moved.recv())
            .await
            .is_err()
        {
            info!("not every agent re-homed within {REHOME_GRACE:?}; draining anyway");
        }
    }
}

impl HandOverWatch {
    async fn begun(&mut self) {
        let _ = self.begun.wait_for(|b| *b).await;
    }

    fn has_begun(&self) -> bool {
        *self.begun.borrow()
    }
}

/// Everything the accept loop needs.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Where agents dial: any transport the server can listen on.
    pub(crate) listener: crate::proto::transport::Listener,
    pub(crate) config: HubConfig,
    pub(crate) group: Arc<Group>,
    /// Settings the agents' endpoints take (windows, keepalive).
    pub(crate) upstream: UpstreamConfig,
    pub(crate) counters: Arc<Counters>,
    pub(crate) watch: Watch,
    /// TLS before the handshake, when `tunnel.hub.tls` is set.
    pub(crate) tls: Option<Arc<ServerTls>>,
    /// The first step of the drain.
    pub(crate) hand_over: HandOverWatch,
}

impl Hub {
    fn policy(&self) -> HubPolicy {
        let me = super::tracker::HubInfo {
            name: self.config.name.clone(),
            group: self.config.hub_group.clone(),
            generation: self.config.generation,
        };
        let mut hubs = vec![me.clone()];
        hubs.extend(self.config.peers.iter().map(|p| super::tracker::HubInfo {
            name: p.name.clone(),
            group: p.group.clone(),
            generation: p.generation,
        }));
        HubPolicy {
            me,
            // One per process: a hub restarted in place, or a replica,
            // keeps the name but is another instance.
            instance: handshake::control_key(),
            hubs,
            tokens: self.config.tokens.clone(),
        }
    }

    /// Accepts agents until the drain begins. Tunnels then end with the
    /// upstream pools (closed last by the drain), once their calls are
    /// done.
    pub(crate) async fn serve(self) {
        let policy = Arc::new(self.policy());
        let draining = self.watch.clone().signaled();
        tokio::pin!(draining);
        let mut hand_over = self.hand_over.clone();
        let mut tunnels = JoinSet::new();
        let handshaking = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        loop {
            tokio::select! {
                _ = &mut draining => break,
                () = hand_over.begun() => break,
                Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((io, addr)) => {
                        // Over a Unix socket an agent has no address; its
                        // endpoint is keyed by its id anyway.
                        let peer = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                        if handshaking.load(std::sync::atomic::Ordering::Relaxed) >= MAX_HANDSHAKES {
                            debug!(%peer, "{MAX_HANDSHAKES} agent handshakes under way; closing a new connection");
                            continue;
                        }
                        if tunnels.len() >= self.config.max_agents {
                            warn!(%peer, max = self.config.max_agents, "tunnel.hub.max_agents reached; closing a new agent connection");
                            continue;
                        }
                        let deadline = Instant::now() + self.config.handshake_timeout;
                        let counted = Handshaking::hold(&handshaking);
                        tunnels.spawn(tunnel(
                            Accepted {
                                counted,
                                io,
                                peer,
                                deadline,
                            },
                            Shared {
                                tls: self.tls.clone(),
                                watch: self.watch.clone(),
                                hand_over: self.hand_over.clone(),
                                policy: policy.clone(),
                                group: self.group.clone(),
                                upstream: self.upstream.clone(),
                                counters: self.counters.clone(),
                            },
                        ));
                    }
                    Err(e) => {
                        debug!(error = %e, "accepting an agent failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        // Agents dialling again reach another hub (or the process that
        // takes this one's port).
        drop(self.listener);
        drop(self.hand_over);
        drop(hand_over);
        // Each tunnel's task tells its agent to re-home and closes the
        // tunnel once the agent has (or after REHOME_GRACE).
        info!(
            agents = self.group.len(),
            "draining: telling agents to re-home"
        );
        tunnels.detach_all();
    }
}

/// Agent handshakes under way at most (not yet agents): peers that open a
/// connection and stall cost at most this many tasks, each for at most
/// the handshake timeout, and never lock real agents out of `max_agents`
/// for longer than that.
const MAX_HANDSHAKES: usize = 256;

/// Counts one handshake under way while held.
#[derive(Debug)]
struct Handshaking(Arc<std::sync::atomic::AtomicUsize>);

impl Handshaking {
    fn hold(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long a draining hub waits for its agents to hold their tunnels
/// elsewhere before its clients get GOAWAY, and then for each agent to
/// drain this tunnel before it closes the tunnel itself (once its calls
/// end).
pub(crate) const REHOME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells the agent on `pool` that this hub process drains: a trailers-only
/// request on the tunnel with its control key. Whether it answered OK (it
/// answers once it holds its tunnels elsewhere).
async fn rehome(pool: &crate::upstream::Pool, policy: &HubPolicy, key: &str) -> bool {
    let asked = async {
        let checkout = pool.checkout().await.ok()?;
        let head = http::Request::post(format!("http://tunnel{}", handshake::REHOME_PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(handshake::CONTROL_KEY, key)
            .header("sluice-hub-draining", &policy.me.name)
            .header(handshake::INSTANCE, &policy.instance)
            .body(())
            .ok()?;
        let (response, _body, _lease) = pool.send(checkout, head, true).ok()?;
        let response = response.await.ok()?;
        Some(
            sluice_layers::grpc::status::code_of(response.headers())
                == Some(sluice_layers::grpc::status::Code::Ok),
        )
    };
    tokio::time::timeout(REHOME_GRACE, asked)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A connection from an agent, not yet one.
struct Accepted {
    counted: Handshaking,
    io: Stream,
    peer: SocketAddr,
    deadline: Instant,
}

/// What every tunnel task of the hub shares.
struct Shared {
    tls: Option<Arc<ServerTls>>,
    watch: Watch,
    hand_over: HandOverWatch,
    policy: Arc<HubPolicy>,
    group: Arc<Group>,
    upstream: UpstreamConfig,
    counters: Arc<Counters>,
}

/// One agent: the handshake, its endpoint in the group while the tunnel
/// lasts.
async fn tunnel(accepted: Accepted, shared: Shared) {
    let Accepted {
        counted,
        mut io,
        peer,
        deadline,
    } = accepted;
    let Shared {
        tls,
        watch,
        mut hand_over,
        policy,
        group,
        upstream,
        counters,
    } = shared;
    let mut certified = None;
    if let Some(tls) = tls {
        // A missing or bad certificate is refused here, before a byte of
        // the Upgrade is read.
        match Box::pin(tls.accept(io, deadline)).await {
            Ok((stream, identity)) => {
                io = Stream::TlsServer(Box::new(stream));
                certified = identity;
            }
            Err(e) => {
                debug!(%peer, reason = crate::tls::failure_reason(&e), error = %e, "agent refused at the TLS handshake");
                return;
            }
        }
    }
    let key = handshake::control_key();
    let (hello, version) =
        match handshake::hub(&mut io, &policy, &key, certified.as_ref(), deadline).await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Anyone can reach the port: not a warning each time.
                debug!(%peer, error = %e, "agent refused");
                return;
            }
        };
    if hello.discover {
        debug!(agent = %hello.id, %peer, "agent asked which hubs exist");
        return;
    }
    let id = hello.id.clone();
    let mut ids = vec![hello.id.clone()];
    let i = &hello.identifiers;
    ids.extend(i.host.iter().chain(&i.ipv4).chain(&i.ipv6).cloned());
    let agent = AgentEndpoint {
        id: &id,
        ids,
        default_route: i.default_route,
        peer,
    };
    let endpoint = Endpoint::agent(&agent, io, &upstream, &counters);
    // Joins the group only once the agent answered over HTTP/2: an agent
    // that already holds a tunnel to this hub closes a second one unserved.
    let warmed = endpoint.pool().warm().await;
    drop(counted);
    if let Err(e) = warmed {
        debug!(agent = %id, %peer, error = %e, "agent tunnel closed before serving (a duplicate, or a failure)");
        return;
    }
    if watch.is_draining() || hand_over.has_begun() {
        // The drain began during the handshake: this hub takes no agent.
        endpoint.pool().close();
        return;
    }
    group.insert(endpoint.clone());
    info!(agent = %id, %peer, version, certificate = certified.as_ref().map_or("none", |c| c.id()), "agent connected");
    let pool = endpoint.pool();
    let rehome_agent = async {
        // The agent dials again (another hub, or the process that takes
        // this one's place) and answers once it holds its tunnels there.
        if !rehome(pool, &policy, &key).await {
            debug!(agent = %id, "the agent did not take the re-home request");
        }
    };
    tokio::select! {
        () = pool.gone() => {}
        () = hand_over.begun() => {
            rehome_agent.await;
            // The clients get GOAWAY once every agent has answered.
            drop(hand_over);
            tokio::select! {
                () = pool.gone() => {}
                _guard = watch.clone().signaled() => close_after_grace(pool, &id).await,
            }
        }
        _guard = watch.clone().signaled() => {
            // A drain with no hand-over first (a library user's drain).
            rehome_agent.await;
            close_after_grace(pool, &id).await;
        }
    }
    group.remove(&endpoint);
    info!(agent = %id, %peer, "agent tunnel closed");
}

/// Waits for the agent to drain the tunnel, at most [`REHOME_GRACE`];
/// then closes it once its calls end.
async fn close_after_grace(pool: &crate::upstream::Pool, id: &str) {
    if tokio::time::timeout(REHOME_GRACE, pool.gone())
        .await
        .is_err()
    {
        debug!(agent = %id, "the agent did not re-home in time; closing its tunnel once its calls end");
    }
    pool.close();
    pool.gone().await;
}
