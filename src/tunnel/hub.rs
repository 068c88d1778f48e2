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
//! is chosen last. When the hub drains it tells each agent to re-home (a
//! control request on the tunnel, with the key only the hub and the agent
//! know); the agent dials another hub and then drains this tunnel; after
//! [`REHOME_GRACE`] the hub closes what is left as its calls end.

use std::{net::SocketAddr, sync::Arc};

use sluice_layers::drain::Watch;
use tokio::{task::JoinSet, time::Instant};
use tracing::{debug, info, warn};

use super::handshake::{self, HubPolicy};
use crate::{
    config::{HubConfig, UpstreamConfig},
    net::Stream,
    stats::Counters,
    tls::server::ServerTls,
    upstream::{AgentEndpoint, Group},
};

/// Everything the accept loop needs.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Where agents dial: any transport the server can listen on.
    pub(crate) listener: crate::net::Listener,
    pub(crate) config: HubConfig,
    pub(crate) group: Arc<Group>,
    /// Settings the agents' endpoints take (windows, keepalive).
    pub(crate) upstream: UpstreamConfig,
    pub(crate) counters: Arc<Counters>,
    pub(crate) watch: Watch,
    /// TLS before the handshake, when `tunnel.hub.tls` is set.
    pub(crate) tls: Option<Arc<ServerTls>>,
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
        let mut tunnels = JoinSet::new();
        let handshaking = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        loop {
            tokio::select! {
                _ = &mut draining => break,
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
                            counted,
                            io,
                            self.tls.clone(),
                            self.watch.clone(),
                            peer,
                            policy.clone(),
                            self.group.clone(),
                            self.upstream.clone(),
                            self.counters.clone(),
                            deadline,
                        ));
                    }
                    Err(e) => {
                        debug!(error = %e, "accepting an agent failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
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

/// How long a draining hub waits for an agent to open a tunnel elsewhere
/// and drain this one, before it closes the tunnel itself (once its calls
/// end).
const REHOME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells the agent on `pool` that hub `name` drains: a trailers-only
/// request on the tunnel with its control key. Whether it answered OK.
async fn rehome(pool: &crate::upstream::Pool, name: &str, key: &str) -> bool {
    let asked = async {
        let checkout = pool.checkout().await.ok()?;
        let head = http::Request::post(format!("http://tunnel{}", handshake::REHOME_PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(handshake::CONTROL_KEY, key)
            .header("sluice-hub-draining", name)
            .body(())
            .ok()?;
        let (response, _body, _lease) = pool.send(checkout, head, true).ok()?;
        let response = response.await.ok()?;
        Some(
            sluice_layers::grpc::status::code_of(response.headers())
                == Some(sluice_layers::grpc::status::Code::Ok),
        )
    };
    tokio::time::timeout(std::time::Duration::from_secs(1), asked)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// One agent: the handshake, its endpoint in the group while the tunnel
/// lasts.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    counted: Handshaking,
    io: Stream,
    tls: Option<Arc<ServerTls>>,
    watch: Watch,
    peer: SocketAddr,
    policy: Arc<HubPolicy>,
    group: Arc<Group>,
    upstream: UpstreamConfig,
    counters: Arc<Counters>,
    deadline: Instant,
) {
    let mut io = io;
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
    let endpoint = group.agent_endpoint(&agent, io, &upstream, &counters);
    // Joins the group only once the agent answered over HTTP/2: an agent
    // that already holds a tunnel to this hub closes a second one unserved.
    let warmed = endpoint.pool().warm().await;
    drop(counted);
    if let Err(e) = warmed {
        debug!(agent = %id, %peer, error = %e, "agent tunnel closed before serving (a duplicate, or a failure)");
        return;
    }
    if watch.is_draining() {
        // The drain began during the handshake: this hub takes no agent.
        endpoint.pool().close();
        return;
    }
    group.insert(endpoint.clone());
    info!(agent = %id, %peer, version, certificate = certified.as_ref().map_or("none", |c| c.id()), "agent connected");
    let pool = endpoint.pool();
    tokio::select! {
        () = pool.gone() => {}
        _guard = watch.signaled() => {
            // The hub drains: the agent dials another hub, then drains
            // this tunnel itself (make-before-break). Its calls finish.
            if !rehome(pool, &policy.me.name, &key).await {
                debug!(agent = %id, "the agent did not take the re-home request");
            }
            if tokio::time::timeout(REHOME_GRACE, pool.gone()).await.is_err() {
                debug!(agent = %id, "the agent did not re-home in time; closing its tunnel once its calls end");
            }
            pool.close();
            pool.gone().await;
        }
    }
    group.remove(&endpoint);
    info!(agent = %id, %peer, "agent tunnel closed");
}
