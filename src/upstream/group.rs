//! Upstream groups: named sets of endpoints, one connection pool each, and
//! the choice of endpoint per call.
//!
//! The choice is power-of-two-choices over peak-EWMA latency, as linkerd
//! and `tower::balance` do: two endpoints at random, the one with the lower
//! `latency × (calls in flight + 1)` wins. An endpoint whose last dial
//! failed is avoided while another is usable.

use std::{
    cell::Cell,
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::Pool;
use crate::{
    config::{Config, DEFAULT_GROUP},
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
}

/// The endpoints of one group.
#[derive(Debug)]
pub(crate) struct Group {
    endpoints: Box<[Endpoint]>,
}

/// One endpoint: its pool and its latency estimate.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pool: Pool,
    rtt: Mutex<PeakEwma>,
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
        let pool = |address| {
            let mut upstream = config.upstream.clone();
            upstream.address = address;
            Pool::new(upstream, counters.clone())
        };
        by_name.insert(
            Arc::from(DEFAULT_GROUP),
            Group::new(vec![pool(config.upstream.address.clone())]),
        );
        for (name, group) in &config.upstreams {
            let endpoints = group.endpoints.iter().cloned().map(pool).collect();
            by_name.insert(Arc::from(name.as_str()), Group::new(endpoints));
        }
        Self { by_name }
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
        for group in self.by_name.values() {
            for endpoint in &group.endpoints {
                endpoint.pool.close();
            }
        }
    }
}

// === impl Group ===

impl Group {
    fn new(pools: Vec<Pool>) -> Self {
        let now = Instant::now();
        Self {
            endpoints: pools
                .into_iter()
                .map(|pool| Endpoint {
                    pool,
                    rtt: Mutex::new(PeakEwma {
                        nanos: DEFAULT_RTT.as_nanos() as f64,
                        at: now,
                    }),
                })
                .collect(),
        }
    }

    /// The endpoint for the next call.
    pub(crate) fn pick(&self) -> &Endpoint {
        let n = self.endpoints.len();
        if n == 1 {
            return &self.endpoints[0];
        }
        let a = random_below(n);
        let b = (a + 1 + random_below(n - 1)) % n;
        let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
        if ea.cost() <= eb.cost() { ea } else { eb }
    }
}

// === impl Endpoint ===

impl Endpoint {
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
        if self.pool.is_failing() {
            return f64::INFINITY;
        }
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
