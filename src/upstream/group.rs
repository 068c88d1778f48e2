//! Upstream groups: named sets of endpoints, one connection pool each, and
//! the choice of endpoint per call.
//!
//! A group's strategies are tried in order, falling through to the next
//! only when one finds no endpoint (konnectivity's chain): `dest-host` (the
//! endpoint whose identifiers match the call's destination host),
//! `default-route` (endpoints marked so), `random`, and `least-loaded`, the
//! default: power-of-two-choices over peak-EWMA latency, as linkerd and
//! `tower::balance` do (two endpoints at random, the lower
//! `latency × (calls in flight + 1)` wins). Within any strategy, endpoints
//! that are usable (last dial succeeded, health check passing) and not
//! draining (no GOAWAY lately) are preferred, then usable ones, then any.
//!
//! Endpoints given by name are resolved again every `resolve_interval`:
//! each address is an endpoint of its own; an address that appears gets a
//! new pool, one that leaves has its pool closed once idle.

use std::{
    cell::Cell,
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{HeaderName, request::Parts};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Connector, Pool};
use crate::{
    config::{
        Config, DEFAULT_DEST_HOST_KEY, DEFAULT_GROUP, EndpointConfig, GroupConfig,
        HealthCheckConfig, HostPort, Strategy, UpstreamConfig,
    },
    stats::Counters,
    tls::{TlsError, client::ClientTls, reload::Reload},
};

/// Latency assumed for an endpoint with no observation yet: 30 ms,
/// linkerd's default RTT.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade: 10 s, linkerd's decay.
const DECAY: Duration = Duration::from_secs(10);

/// Every group, by name.
#[derive(Debug)]
pub(crate) struct Groups {
    by_name: HashMap<Arc<str>, Arc<Group>>,
    /// Health-check and resolver tasks, stopped by [`Groups::close`].
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The groups' TLS material.
    materials: Vec<Arc<dyn Reload>>,
}

/// The endpoints of one group. The list is swapped whole when names
/// resolve differently; a call works on the snapshot it picked from.
#[derive(Debug)]
pub(crate) struct Group {
    endpoints: RwLock<Arc<[Arc<Endpoint>]>>,
    strategies: Box<[Strategy]>,
    dest_host_key: HeaderName,
    /// Woken when an endpoint joins or leaves.
    changed: tokio::sync::Notify,
    /// How long a call no strategy finds an endpoint for waits for one to
    /// join (a hub's agents: `tunnel.hub.agent_wait`); zero elsewhere.
    wait: Duration,
}

/// One endpoint: its pool, its latency estimate, and what strategies match
/// it by.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// The address it was configured or resolved as.
    address: HostPort,
    pool: Pool,
    rtt: Mutex<PeakEwma>,
    /// The last health check's verdict (true without health checking).
    healthy: AtomicBool,
    /// Lowercased names `dest-host` matches: the host, the name it was
    /// resolved from, and the configured ids.
    ids: Box<[String]>,
    /// The first id the config gave it, as written.
    configured_id: Option<String>,
    /// Its address as text (`host:port`), which a fan-out may name it by
    /// (an agent: its id).
    label: String,
    default_route: bool,
}

#[derive(Debug)]
struct PeakEwma {
    nanos: f64,
    at: Instant,
}

/// What every endpoint of a group is dialled with.
#[derive(Clone, Debug)]
struct Settings {
    upstream: UpstreamConfig,
    tls: Option<Arc<ClientTls>>,
}

impl Settings {
    /// `upstream`, with TLS material read for `key` (the config key) if
    /// it asks for TLS.
    fn new(key: &str, upstream: UpstreamConfig) -> Result<Self, TlsError> {
        let tls = match &upstream.tls {
            Some(t) => Some(Arc::new(ClientTls::new(format!("{key}.tls"), t)?)),
            None => None,
        };
        Ok(Self { upstream, tls })
    }
}

/// Builds the endpoint for `e`, at `resolved` when a name was resolved.
fn endpoint(
    settings: &Settings,
    counters: &Arc<Counters>,
    e: &EndpointConfig,
    resolved: Option<SocketAddr>,
) -> Endpoint {
    let address = match resolved {
        Some(addr) => HostPort::from(addr),
        None => e.address().clone(),
    };
    let mut upstream = settings.upstream.clone();
    upstream.address = address.clone();
    let connector = settings
        .tls
        .as_ref()
        .map_or_else(Connector::default, |tls| {
            Connector::tls(tls.clone(), e.address().host())
        });
    let mut ids = vec![e.address().host().to_ascii_lowercase()];
    if resolved.is_some() {
        ids.push(address.host().to_ascii_lowercase());
    }
    let mut default_route = false;
    let mut configured_id = None;
    if let EndpointConfig::Detailed {
        ids: more,
        default_route: dr,
        ..
    } = e
    {
        ids.extend(more.iter().map(|i| i.to_ascii_lowercase()));
        configured_id = more.first().cloned();
        default_route = *dr;
    }
    let label = address.to_string();
    Endpoint {
        address,
        pool: Pool::new(upstream, connector, counters.clone()),
        rtt: Mutex::new(PeakEwma {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: Instant::now(),
        }),
        healthy: AtomicBool::new(true),
        ids: ids.into_boxed_slice(),
        configured_id,
        label,
        default_route,
    }
}

/// How long a tunnel's connection may idle before the pool lets it go: a
/// year. The agent dialled it; closing it idle would only make the agent
/// dial again.
const TUNNEL_IDLE: Duration = Duration::from_secs(365 * 24 * 3600);

/// What the hub knows of an agent that dialled in.
#[derive(Debug)]
pub(crate) struct AgentEndpoint<'a> {
    /// Its id.
    pub(crate) id: &'a str,
    /// Every name `dest-host` finds it by (its id first).
    pub(crate) ids: Vec<String>,
    pub(crate) default_route: bool,
    /// Where its tunnel comes from.
    pub(crate) peer: SocketAddr,
}

impl Group {
    /// An endpoint for an agent's tunnel `stream`, not yet in the group
    /// ([`Group::insert`] adds it once its connection works).
    pub(crate) fn agent_endpoint(
        &self,
        agent: &AgentEndpoint<'_>,
        stream: crate::net::Stream,
        upstream: &UpstreamConfig,
        counters: &Arc<Counters>,
    ) -> Arc<Endpoint> {
        let mut upstream = upstream.clone();
        upstream.address = HostPort::from(agent.peer);
        upstream.max_connections = 1;
        upstream.idle_timeout = TUNNEL_IDLE;
        // Pinged idle or not (see Pool): a silent agent is gone within
        // interval + timeout.
        upstream.keepalive_interval = crate::config::DEFAULT_KEEPALIVE_INTERVAL;
        upstream.tls = None;
        Arc::new(Endpoint {
            address: upstream.address.clone(),
            pool: Pool::new(upstream, Connector::tunnel(stream), counters.clone()),
            rtt: Mutex::new(PeakEwma {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
            }),
            healthy: AtomicBool::new(true),
            ids: agent.ids.iter().map(|i| i.to_ascii_lowercase()).collect(),
            configured_id: Some(agent.id.to_owned()),
            label: agent.id.to_owned(),
            default_route: agent.default_route,
        })
    }

    /// Adds `endpoint` to the group.
    pub(crate) fn insert(&self, endpoint: Arc<Endpoint>) {
        let mut endpoints = self.endpoints.write().expect("endpoints lock");
        let mut list = endpoints.to_vec();
        list.push(endpoint);
        *endpoints = list.into();
        drop(endpoints);
        self.changed.notify_waiters();
    }

    /// Closes every endpoint's connections once their calls are done.
    pub(crate) fn close(&self) {
        for endpoint in self.snapshot().iter() {
            endpoint.pool.close();
        }
    }

    /// Takes `endpoint` out of the group; calls already on it go on.
    pub(crate) fn remove(&self, endpoint: &Arc<Endpoint>) {
        let mut endpoints = self.endpoints.write().expect("endpoints lock");
        let list: Vec<_> = endpoints
            .iter()
            .filter(|e| !Arc::ptr_eq(e, endpoint))
            .cloned()
            .collect();
        *endpoints = list.into();
        drop(endpoints);
        self.changed.notify_waiters();
    }

    /// [`Group::pick`], waiting for a matching endpoint to join for up to
    /// the group's wait (none outside a hub's agents group).
    pub(crate) async fn pick_or_wait(&self, parts: &Parts) -> Option<Arc<Endpoint>> {
        if let Some(e) = self.pick(parts, None) {
            return Some(e);
        }
        if self.wait.is_zero() {
            return None;
        }
        let until = Instant::now() + self.wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(e) = self.pick(parts, None) {
                return Some(e);
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return None;
            }
        }
    }

    /// How long a call waits for an endpoint to join.
    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }
}

// === impl Groups ===

impl Groups {
    /// Every group of `config`, with its TLS material read.
    ///
    /// # Errors
    ///
    /// A group's TLS files cannot be used.
    pub(crate) fn from_config(config: &Config, counters: &Arc<Counters>) -> Result<Self, TlsError> {
        let mut by_name = HashMap::new();
        let mut materials: Vec<Arc<dyn Reload>> = Vec::new();
        let default = EndpointConfig::Address(config.upstream.address.clone());
        let settings = Settings::new("upstream", config.upstream.clone())?;
        materials.extend(settings.tls.iter().map(|t| t.material() as Arc<dyn Reload>));
        by_name.insert(
            Arc::from(DEFAULT_GROUP),
            Arc::new(Group {
                endpoints: RwLock::new(Arc::from([Arc::new(endpoint(
                    &settings, counters, &default, None,
                ))])),
                strategies: Box::new([Strategy::LeastLoaded]),
                dest_host_key: HeaderName::from_static(DEFAULT_DEST_HOST_KEY),
                changed: tokio::sync::Notify::new(),
                wait: Duration::ZERO,
            }),
        );
        let mut tasks = Vec::new();
        for (name, group_config) in &config.upstreams {
            let settings = Settings::new(
                &format!("upstreams.{name}"),
                config.group_upstream(group_config),
            )?;
            materials.extend(settings.tls.iter().map(|t| t.material() as Arc<dyn Reload>));
            let endpoints: Vec<Arc<Endpoint>> = group_config
                .endpoints
                .iter()
                .map(|e| Arc::new(endpoint(&settings, counters, e, None)))
                .collect();
            let group = Arc::new(Group {
                endpoints: RwLock::new(endpoints.into()),
                strategies: group_config.strategy.clone().into_boxed_slice(),
                dest_host_key: HeaderName::try_from(
                    group_config.dest_host_key.to_ascii_lowercase(),
                )
                .unwrap_or_else(|_| HeaderName::from_static(DEFAULT_DEST_HOST_KEY)),
                changed: tokio::sync::Notify::new(),
                wait: agent_wait(config, name),
            });
            if group_config.endpoints.iter().any(|e| {
                e.address().unix_path().is_none() && e.address().host().parse::<IpAddr>().is_err()
            }) {
                tasks.push(tokio::spawn(resolve(
                    name.clone(),
                    group.clone(),
                    group_config.clone(),
                    settings.clone(),
                    counters.clone(),
                )));
            }
            if let Some(hc) = &group_config.health_check {
                tasks.push(tokio::spawn(check_health(group.clone(), hc.clone())));
            }
            by_name.insert(Arc::from(name.as_str()), group);
        }
        // The group tunnel agents join exists even with no [upstreams]
        // entry: empty until an agent dials in.
        if let Some(hub) = &config.tunnel.hub
            && !by_name.contains_key(hub.group.as_str())
        {
            by_name.insert(
                Arc::from(hub.group.as_str()),
                Arc::new(Group {
                    endpoints: RwLock::new(Arc::from([])),
                    // A call for an agent that is not there must not reach
                    // another agent's network: by name only.
                    strategies: Box::new([Strategy::DestHost]),
                    dest_host_key: HeaderName::from_static(DEFAULT_DEST_HOST_KEY),
                    changed: tokio::sync::Notify::new(),
                    wait: hub.agent_wait,
                }),
            );
        }
        Ok(Self {
            by_name,
            tasks: Mutex::new(tasks),
            materials,
        })
    }

    /// Group `name`, shared.
    pub(crate) fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.by_name.get(name).cloned()
    }

    /// The TLS material of every group, for the reloader.
    pub(crate) fn tls_materials(&self) -> &[Arc<dyn Reload>] {
        &self.materials
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Group> {
        self.by_name.get(name).map(|g| &**g)
    }

    /// The first endpoint of the default group (`[upstream]`).
    pub(crate) fn default_pool(&self) -> Pool {
        self.by_name[DEFAULT_GROUP].snapshot()[0].pool.clone()
    }

    /// The addresses of a group's endpoints now.
    pub(crate) fn addresses(&self, name: &str) -> Option<Vec<String>> {
        let group = self.by_name.get(name)?;
        Some(
            group
                .snapshot()
                .iter()
                .map(|e| e.address.to_string())
                .collect(),
        )
    }

    /// Stops health checks and resolution, and closes every endpoint's
    /// connections once idle.
    pub(crate) fn close(&self) {
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        for group in self.by_name.values() {
            group.close();
        }
    }
}

/// How long calls of group `name` wait for an endpoint: a hub's agent
/// wait for its agents' group, zero for every other.
fn agent_wait(config: &Config, name: &str) -> Duration {
    config
        .tunnel
        .hub
        .as_ref()
        .filter(|h| h.group == name)
        .map_or(Duration::ZERO, |h| h.agent_wait)
}

/// Resolves a group's named endpoints every `resolve_interval` and swaps in
/// the new endpoint list: endpoints whose address stays keep their pool
/// (connections and latency); new addresses get a pool; the pools of
/// addresses that left are closed once idle.
async fn resolve(
    name: String,
    group: Arc<Group>,
    group_config: GroupConfig,
    settings: Settings,
    counters: Arc<Counters>,
) {
    let mut tick = tokio::time::interval(group_config.resolve_interval);
    loop {
        tick.tick().await;
        let mut wanted: Vec<(EndpointConfig, Option<SocketAddr>)> = Vec::new();
        for e in &group_config.endpoints {
            let address = e.address();
            if address.unix_path().is_some() || address.host().parse::<IpAddr>().is_ok() {
                wanted.push((e.clone(), None));
                continue;
            }
            match tokio::net::lookup_host((address.host(), address.port())).await {
                Ok(addrs) => wanted.extend(addrs.map(|a| (e.clone(), Some(a)))),
                Err(err) => {
                    // Keep what we had for this name: a DNS hiccup must not
                    // empty the group.
                    warn!(group = %name, %address, error = %err, "cannot resolve an upstream endpoint");
                    let current = group.snapshot();
                    let kept = current
                        .iter()
                        .filter(|ep| ep.ids.contains(&address.host().to_ascii_lowercase()));
                    wanted.extend(kept.map(|ep| (e.clone(), ep.address.to_string().parse().ok())));
                }
            }
        }
        let current = group.snapshot();
        let (next, gone) = reconcile(&current, &wanted, |e, resolved| {
            Arc::new(endpoint(&settings, &counters, e, resolved))
        });
        if next.is_empty() {
            continue;
        }
        let changed = !gone.is_empty() || next.len() != current.len();
        *group.endpoints.write().expect("endpoints lock") = next.into();
        for endpoint in gone {
            debug!(group = %name, address = %endpoint.address, "endpoint left; closing its connections once idle");
            endpoint.pool.close();
        }
        if changed {
            info!(group = %name, endpoints = ?group.snapshot().iter().map(|e| e.address.to_string()).collect::<Vec<_>>(), "upstream group endpoints changed");
        }
    }
}

/// The endpoint list for `wanted` (entries and, for names, the addresses
/// they resolved to), reusing `current` endpoints with the same address;
/// returns it and the endpoints that are no longer wanted.
fn reconcile<F>(
    current: &[Arc<Endpoint>],
    wanted: &[(EndpointConfig, Option<SocketAddr>)],
    mut make: F,
) -> (Vec<Arc<Endpoint>>, Vec<Arc<Endpoint>>)
where
    F: FnMut(&EndpointConfig, Option<SocketAddr>) -> Arc<Endpoint>,
{
    let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(wanted.len());
    for (e, resolved) in wanted {
        let address = resolved.map_or_else(
            || e.address().to_string(),
            |a| HostPort::from(a).to_string(),
        );
        if next.iter().any(|n| n.address.to_string() == address) {
            continue;
        }
        match current.iter().find(|c| c.address.to_string() == address) {
            Some(same) => next.push(same.clone()),
            None => next.push(make(e, *resolved)),
        }
    }
    let gone = current
        .iter()
        .filter(|c| !next.iter().any(|n| Arc::ptr_eq(n, c)))
        .cloned()
        .collect();
    (next, gone)
}

/// Asks every endpoint of the group `grpc.health.v1.Health/Check` each
/// interval and records the verdict.
async fn check_health(group: Arc<Group>, hc: HealthCheckConfig) {
    let mut tick = tokio::time::interval(hc.interval);
    loop {
        tick.tick().await;
        for endpoint in group.snapshot().iter() {
            let serving = super::health::check(&endpoint.pool, &hc.service, hc.timeout).await;
            if endpoint.healthy.swap(serving, Ordering::Relaxed) != serving {
                info!(address = %endpoint.address, serving, "upstream endpoint health changed");
            }
        }
    }
}

// === impl Group ===

impl Group {
    fn snapshot(&self) -> Arc<[Arc<Endpoint>]> {
        self.endpoints.read().expect("endpoints lock").clone()
    }

    /// The endpoint for a call with head `parts`, or `None` when no
    /// strategy finds one. `skip` excludes an endpoint already tried.
    pub(crate) fn pick(
        &self,
        parts: &Parts,
        skip: Option<&Arc<Endpoint>>,
    ) -> Option<Arc<Endpoint>> {
        let snapshot = self.snapshot();
        if let [only] = &*snapshot {
            // One endpoint (the default group, most groups): the strategies
            // only decide whether it may be used; no lists, no balancing.
            if skip.is_some_and(|s| Arc::ptr_eq(s, only)) {
                return None;
            }
            let found = self.strategies.iter().any(|strategy| match strategy {
                Strategy::DestHost => dest_host(parts, &self.dest_host_key)
                    .is_some_and(|host| only.ids.contains(&host)),
                Strategy::DefaultRoute => only.default_route,
                Strategy::Random | Strategy::LeastLoaded => true,
            });
            return found.then(|| only.clone());
        }
        let usable_slot = |e: &&Arc<Endpoint>| skip.is_none_or(|s| !Arc::ptr_eq(s, e));
        for strategy in &self.strategies {
            let candidates: Vec<&Arc<Endpoint>> = match strategy {
                Strategy::DestHost => {
                    let Some(host) = dest_host(parts, &self.dest_host_key) else {
                        continue;
                    };
                    snapshot
                        .iter()
                        .filter(usable_slot)
                        .filter(|e| e.ids.contains(&host))
                        .collect()
                }
                Strategy::DefaultRoute => snapshot
                    .iter()
                    .filter(usable_slot)
                    .filter(|e| e.default_route)
                    .collect(),
                Strategy::Random | Strategy::LeastLoaded => {
                    snapshot.iter().filter(usable_slot).collect()
                }
            };
            if candidates.is_empty() {
                continue;
            }
            let usable: Vec<&Arc<Endpoint>> = candidates
                .iter()
                .copied()
                .filter(|e| !e.unusable())
                .collect();
            let serving: Vec<&Arc<Endpoint>> = usable
                .iter()
                .copied()
                .filter(|e| !e.pool.is_draining())
                .collect();
            let pool = [serving, usable, candidates]
                .into_iter()
                .find(|c| !c.is_empty())
                .expect("candidates is not empty");
            let chosen = match strategy {
                Strategy::Random => pool[random_below(pool.len())],
                _ => p2c(&pool),
            };
            return Some(chosen.clone());
        }
        None
    }

    pub(crate) fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// The endpoint with identifier `id` (its address, its host, or one of
    /// its configured ids; case-insensitive).
    pub(crate) fn find(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.snapshot()
            .iter()
            .find(|e| e.label == id || e.ids.iter().any(|i| i.eq_ignore_ascii_case(id)))
            .cloned()
    }

    /// The names a fan-out over the whole group reports its endpoints by:
    /// the first configured id, else the address.
    pub(crate) fn endpoint_names(&self) -> Vec<String> {
        self.snapshot().iter().map(|e| e.name()).collect()
    }
}

/// The destination host of a call: the group's metadata key, else the
/// `:authority` host, lowercased, without a port.
fn dest_host(parts: &Parts, key: &HeaderName) -> Option<String> {
    let raw = match parts.headers.get(key).and_then(|v| v.to_str().ok()) {
        Some(v) => v.to_owned(),
        None => parts.uri.authority()?.host().to_owned(),
    };
    let host = raw.trim().trim_start_matches('[');
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    };
    Some(host.trim_end_matches(']').to_ascii_lowercase())
}

fn p2c<'a>(endpoints: &[&'a Arc<Endpoint>]) -> &'a Arc<Endpoint> {
    let n = endpoints.len();
    if n == 1 {
        return endpoints[0];
    }
    let a = random_below(n);
    let b = (a + 1 + random_below(n - 1)) % n;
    let (ea, eb) = (endpoints[a], endpoints[b]);
    if ea.cost() <= eb.cost() { ea } else { eb }
}

// === impl Endpoint ===

impl Endpoint {
    /// The address it was configured or resolved as.
    pub(crate) fn address(&self) -> &HostPort {
        &self.address
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What a fan-out calls it: its first configured id, else its address.
    fn name(&self) -> String {
        self.configured_id
            .clone()
            .unwrap_or_else(|| self.label.clone())
    }

    /// Whether the endpoint should be avoided: its last dial failed, or it
    /// failed its last health check.
    fn unusable(&self) -> bool {
        self.pool.is_failing() || !self.healthy.load(Ordering::Relaxed)
    }

    /// Records how long the upstream took to answer (response headers).
    pub(crate) fn observe(&self, rtt: Duration) {
        let sample = rtt.as_nanos() as f64;
        let now = Instant::now();
        let mut ewma = self.rtt.lock().expect("rtt lock");
        if sample > ewma.nanos {
            // Peak: a slow answer counts at once.
            ewma.nanos = sample;
        } else {
            let elapsed = now.saturating_duration_since(ewma.at).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            ewma.nanos = ewma.nanos * keep + sample * (1.0 - keep);
        }
        ewma.at = now;
    }

    fn cost(&self) -> f64 {
        let rtt = self.rtt.lock().expect("rtt lock").nanos;
        rtt * (self.pool.in_flight() as f64 + 1.0)
    }
}

/// A cheap per-thread random number below `n` (xorshift, seeded from the
/// std hasher's random keys): balancing needs spread, not secrecy.
fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_below_stays_in_range_and_spreads() {
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[random_below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[tokio::test]
    async fn reconcile_keeps_staying_endpoints_adds_new_ones_and_lets_gone_ones_go() {
        let config = Settings::new("upstream", UpstreamConfig::default()).expect("plaintext");
        let counters = Arc::new(Counters::default());
        let name: EndpointConfig =
            EndpointConfig::Address("svc.local:80".parse().expect("hostport"));
        let at = |ip: &str| -> SocketAddr { format!("{ip}:80").parse().expect("addr") };
        let make = |e: &EndpointConfig, r: Option<SocketAddr>| {
            Arc::new(endpoint(&config, &counters, e, r))
        };
        let (first, gone) = reconcile(
            &[],
            &[
                (name.clone(), Some(at("10.0.0.1"))),
                (name.clone(), Some(at("10.0.0.2"))),
            ],
            make,
        );
        assert_eq!(first.len(), 2);
        assert!(gone.is_empty());
        // 10.0.0.1 stays, 10.0.0.2 leaves, 10.0.0.3 arrives.
        let (next, gone) = reconcile(
            &first,
            &[
                (name.clone(), Some(at("10.0.0.1"))),
                (name, Some(at("10.0.0.3"))),
            ],
            make,
        );
        assert!(
            Arc::ptr_eq(&next[0], &first[0]),
            "a staying endpoint keeps its pool"
        );
        assert_eq!(next[1].address.to_string(), "10.0.0.3:80");
        assert_eq!(gone.len(), 1);
        assert!(Arc::ptr_eq(&gone[0], &first[1]));
        // Resolved endpoints still answer to the name they came from.
        assert!(next[1].ids.contains(&"svc.local".to_owned()));
        assert!(next[1].ids.contains(&"10.0.0.3".to_owned()));
    }
}
