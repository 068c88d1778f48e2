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
//! whose last dial failed are avoided while another candidate is usable.

use std::{
    cell::Cell,
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use http::{HeaderName, request::Parts};

use super::Pool;
use crate::{
    config::{Config, DEFAULT_DEST_HOST_KEY, DEFAULT_GROUP, EndpointConfig, Strategy},
    stats::Counters,
};

/// Latency assumed for an endpoint with no observation yet: 30 ms,
/// linkerd's default RTT.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade: 10 s, linkerd's decay.
const DECAY: Duration = Duration::from_secs(10);

/// Every group, by name.
#[derive(Debug)]
pub(crate) struct Groups {
    by_name: HashMap<Arc<str>, Group>,
    /// Health-check tasks, stopped by [`Groups::close`].
    checkers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The endpoints of one group.
#[derive(Debug)]
pub(crate) struct Group {
    endpoints: Box<[Endpoint]>,
    strategies: Box<[Strategy]>,
    dest_host_key: HeaderName,
}

/// One endpoint: its pool, its latency estimate, and what strategies match
/// it by.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pool: Pool,
    rtt: Mutex<PeakEwma>,
    /// The last health check's verdict (true without health checking).
    healthy: Arc<AtomicBool>,
    /// Lowercased names `dest-host` matches: the address's host and `ids`.
    ids: Box<[String]>,
    default_route: bool,
}

#[derive(Debug)]
struct PeakEwma {
    nanos: f64,
    at: Instant,
}

// === impl Groups ===

impl Groups {
    pub(crate) fn from_config(config: &Config, counters: &Arc<Counters>) -> Self {
        let mut by_name = HashMap::new();
        let endpoint = |e: &EndpointConfig| {
            let mut upstream = config.upstream.clone();
            upstream.address = e.address().clone();
            let mut ids = vec![e.address().host().to_ascii_lowercase()];
            let mut default_route = false;
            if let EndpointConfig::Detailed {
                ids: more,
                default_route: dr,
                ..
            } = e
            {
                ids.extend(more.iter().map(|i| i.to_ascii_lowercase()));
                default_route = *dr;
            }
            Endpoint::new(Pool::new(upstream, counters.clone()), ids, default_route)
        };
        let default = EndpointConfig::Address(config.upstream.address.clone());
        by_name.insert(
            Arc::from(DEFAULT_GROUP),
            Group {
                endpoints: Box::new([endpoint(&default)]),
                strategies: Box::new([Strategy::LeastLoaded]),
                dest_host_key: HeaderName::from_static(DEFAULT_DEST_HOST_KEY),
            },
        );
        for (name, group) in &config.upstreams {
            by_name.insert(
                Arc::from(name.as_str()),
                Group {
                    endpoints: group.endpoints.iter().map(endpoint).collect(),
                    strategies: group.strategy.clone().into_boxed_slice(),
                    dest_host_key: HeaderName::try_from(group.dest_host_key.to_ascii_lowercase())
                        .unwrap_or_else(|_| HeaderName::from_static(DEFAULT_DEST_HOST_KEY)),
                },
            );
        }
        let checkers = config
            .upstreams
            .iter()
            .filter_map(|(name, g)| Some((by_name.get(name.as_str())?, g.health_check.clone()?)))
            .flat_map(|(group, hc)| {
                group.endpoints.iter().map(move |e| {
                    let (pool, healthy, hc) = (e.pool.clone(), e.healthy.clone(), hc.clone());
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(hc.interval);
                        loop {
                            tick.tick().await;
                            let serving =
                                super::health::check(&pool, &hc.service, hc.timeout).await;
                            if healthy.swap(serving, Ordering::Relaxed) != serving {
                                tracing::info!(serving, "upstream endpoint health changed");
                            }
                        }
                    })
                })
            })
            .collect();
        Self {
            by_name,
            checkers: Mutex::new(checkers),
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Group> {
        self.by_name.get(name)
    }

    /// The first endpoint of the default group (`[upstream]`).
    pub(crate) fn default_pool(&self) -> &Pool {
        &self.by_name[DEFAULT_GROUP].endpoints[0].pool
    }

    /// Closes every endpoint's connections once idle.
    pub(crate) fn close(&self) {
        for checker in self.checkers.lock().expect("checkers lock").drain(..) {
            checker.abort();
        }
        for group in self.by_name.values() {
            for endpoint in &group.endpoints {
                endpoint.pool.close();
            }
        }
    }
}

// === impl Group ===

impl Group {
    /// The endpoint for a call with head `parts`, or `None` when no
    /// strategy finds one. `skip` excludes an endpoint already tried.
    pub(crate) fn pick(&self, parts: &Parts, skip: Option<&Endpoint>) -> Option<&Endpoint> {
        let usable = |e: &&Endpoint| skip.is_none_or(|s| !std::ptr::eq(s, *e));
        for strategy in &self.strategies {
            let candidates: Vec<&Endpoint> = match strategy {
                Strategy::DestHost => {
                    let Some(host) = dest_host(parts, &self.dest_host_key) else {
                        continue;
                    };
                    self.endpoints
                        .iter()
                        .filter(usable)
                        .filter(|e| e.ids.contains(&host))
                        .collect()
                }
                Strategy::DefaultRoute => self
                    .endpoints
                    .iter()
                    .filter(usable)
                    .filter(|e| e.default_route)
                    .collect(),
                Strategy::Random | Strategy::LeastLoaded => {
                    self.endpoints.iter().filter(usable).collect()
                }
            };
            if candidates.is_empty() {
                continue;
            }
            // Prefer endpoints that are usable and not draining, then
            // usable ones, then any.
            let usable: Vec<&Endpoint> = candidates
                .iter()
                .copied()
                .filter(|e| !e.unusable())
                .collect();
            let serving: Vec<&Endpoint> = usable
                .iter()
                .copied()
                .filter(|e| !e.pool.is_draining())
                .collect();
            let pool = [serving, usable, candidates]
                .into_iter()
                .find(|c| !c.is_empty())
                .expect("candidates is not empty");
            return Some(match strategy {
                Strategy::Random => pool[random_below(pool.len())],
                _ => p2c(&pool),
            });
        }
        None
    }

    pub(crate) fn len(&self) -> usize {
        self.endpoints.len()
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

fn p2c<'a>(endpoints: &[&'a Endpoint]) -> &'a Endpoint {
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
    fn new(pool: Pool, ids: Vec<String>, default_route: bool) -> Self {
        Self {
            pool,
            rtt: Mutex::new(PeakEwma {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
            }),
            ids: ids.into_boxed_slice(),
            default_route,
            healthy: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether the endpoint should be avoided: its last dial failed, or it
    /// failed its last health check.
    fn unusable(&self) -> bool {
        self.pool.is_failing() || !self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
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
}
