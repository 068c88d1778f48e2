//! A group: a named set of endpoints, replaced whole when it changes (DNS,
//! agents joining and leaving), and the choice of one endpoint per call.
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
//! Choosing allocates nothing: candidates are counted, then the chosen
//! ones found again by position.

use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, Request, Uri};
use tokio::time::Instant;

use super::{
    endpoint::Endpoint,
    outlier::{Detector, Throttle},
};
use crate::config::{GroupConfig, Strategy};

/// The endpoints of one group. The list is swapped whole when it changes;
/// a call works on the list it picked from.
#[derive(Debug)]
pub(crate) struct Group {
    name: Arc<str>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    strategies: Box<[Strategy]>,
    dest_host_key: HeaderName,
    /// Woken when an endpoint joins or leaves.
    changed: tokio::sync::Notify,
    /// How long a call no strategy finds an endpoint for waits for one to
    /// join (a hub's agents: `tunnel.hub.agent_wait`); zero elsewhere.
    wait: Duration,
    /// Whether `random` picks by the endpoints' weights (an xDS
    /// cluster's endpoints carry their locality's and their own).
    weighted: bool,
    /// Calls in flight to the group, and the most it takes
    /// (`max_requests`).
    limit: Option<(Arc<AtomicUsize>, usize)>,
    /// Outlier detection (`outlier_detection`), if on.
    outlier: Option<Detector>,
    /// Retry throttling (`retry_throttling`), if on.
    throttle: Option<Throttle>,
}

impl Group {
    pub(super) fn new(
        name: &str,
        endpoints: Vec<Arc<Endpoint>>,
        strategies: Box<[Strategy]>,
        dest_host_key: HeaderName,
        wait: Duration,
    ) -> Self {
        Self {
            name: Arc::from(name),
            endpoints: ArcSwap::from_pointee(endpoints),
            strategies,
            dest_host_key,
            changed: tokio::sync::Notify::new(),
            wait,
            weighted: false,
            limit: None,
            outlier: None,
            throttle: None,
        }
    }

    /// A group whose `random` strategy picks by endpoint weight.
    pub(super) fn weighted(mut self) -> Self {
        self.weighted = true;
        self
    }

    /// A group that takes at most `max` calls in flight (none: no limit).
    pub(super) fn with_max_requests(mut self, max: Option<usize>) -> Self {
        self.limit = max.map(|max| (Arc::default(), max));
        self
    }

    /// A group with the file's `outlier_detection` and `retry_throttling`.
    pub(super) fn with_resilience(mut self, config: Option<&GroupConfig>) -> Self {
        self = self.with_outlier(config.and_then(|c| c.outlier_detection.as_ref()));
        self.throttle = config
            .and_then(|c| c.retry_throttling.as_ref())
            .map(|t| Throttle::new(t.max_tokens, t.token_ratio));
        self
    }

    /// A group with outlier detection (an xDS cluster's, gRFC A50).
    pub(super) fn with_outlier(mut self, config: Option<&crate::config::OutlierConfig>) -> Self {
        self.outlier = config.cloned().map(Detector::new);
        if self.outlier.is_none() {
            // Endpoints carried over from a group that ejected them.
            for e in self.endpoints.load().iter() {
                e.outlier.forgive();
            }
        }
        self
    }

    /// Its outlier detector, if on.
    pub(crate) fn outlier(&self) -> Option<&Detector> {
        self.outlier.as_ref()
    }

    /// Whether a call to it may be retried or hedged now (its retry
    /// throttle has tokens).
    pub(crate) fn may_retry(&self) -> bool {
        self.throttle.as_ref().is_none_or(Throttle::allows)
    }

    /// Whether outlier detection learns from how its calls end.
    pub(crate) fn judges(&self) -> bool {
        self.outlier.is_some()
    }

    /// Counts how a call to `endpoint` ended (`None`: without a status),
    /// for outlier detection.
    pub(crate) fn ended(
        &self,
        endpoint: &Endpoint,
        code: Option<sluice_layers::grpc::status::Code>,
    ) {
        if let Some(d) = &self.outlier {
            d.record(self, endpoint, code);
        }
    }

    /// Counts an attempt of a call with a retry or hedge policy for the
    /// retry throttle (A6): `Some(true)` failed with a status the policy
    /// retries, `Some(false)` succeeded, `None` neither.
    pub(crate) fn attempted(&self, failed: Option<bool>) {
        if let (Some(t), Some(failed)) = (&self.throttle, failed) {
            t.ended(failed);
        }
    }

    /// The group's count of calls in flight and its `max_requests`.
    pub(crate) fn limit(&self) -> Option<(Arc<AtomicUsize>, usize)> {
        self.limit.clone()
    }

    /// Its name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The endpoints now.
    pub(crate) fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Replaces the endpoint list (a resolution, an agent that came or
    /// went); calls already on an endpoint go on.
    pub(super) fn replace(&self, endpoints: Vec<Arc<Endpoint>>) {
        self.endpoints.store(Arc::new(endpoints));
        self.changed.notify_waiters();
    }

    /// Adds `endpoint` to the group.
    pub(crate) fn insert(&self, endpoint: Arc<Endpoint>) {
        self.endpoints.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(endpoint.clone());
            list
        });
        self.changed.notify_waiters();
    }

    /// Takes `endpoint` out of the group; calls already on it go on.
    pub(crate) fn remove(&self, endpoint: &Arc<Endpoint>) {
        self.endpoints.rcu(|list| {
            list.iter()
                .filter(|e| !Arc::ptr_eq(e, endpoint))
                .cloned()
                .collect::<Vec<_>>()
        });
        self.changed.notify_waiters();
    }

    /// Closes every endpoint's connections once their calls are done.
    pub(crate) fn close(&self) {
        for endpoint in self.endpoints.load().iter() {
            endpoint.pool().close();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    /// The endpoint with identifier `id` (its address, its host, or one of
    /// its configured ids; case-insensitive).
    pub(crate) fn find(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.endpoints.load().iter().find(|e| e.is(id)).cloned()
    }

    /// The names a fan-out over the whole group reports its endpoints by:
    /// the first configured id, else the address.
    pub(crate) fn endpoint_names(&self) -> Vec<String> {
        self.endpoints.load().iter().map(|e| e.name()).collect()
    }

    /// [`Group::pick`], waiting for a matching endpoint to join for up to
    /// the group's wait (none outside a hub's agents group).
    pub(crate) async fn pick_or_wait(&self, head: Head<'_>) -> Option<Arc<Endpoint>> {
        if let Some(e) = self.pick(head, None) {
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
            if let Some(e) = self.pick(head, None) {
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

    /// The endpoint for a call with head `head`, or `None` when no
    /// strategy finds one. `skip` excludes an endpoint already tried.
    pub(crate) fn pick(
        &self,
        head: Head<'_>,
        skip: Option<&Arc<Endpoint>>,
    ) -> Option<Arc<Endpoint>> {
        self.pick_avoiding(head, |e| skip.is_some_and(|s| Arc::ptr_eq(s, e)))
    }

    /// [`Group::pick`], skipping every endpoint `tried` says was tried,
    /// unless every one that matches was (then any of them).
    pub(crate) fn pick_untried(
        &self,
        head: Head<'_>,
        tried: &[Arc<Endpoint>],
    ) -> Option<Arc<Endpoint>> {
        self.pick_avoiding(head, |e| tried.iter().any(|t| Arc::ptr_eq(t, e)))
            .or_else(|| self.pick(head, None))
    }

    /// [`Group::pick`] without the endpoints `skip` says.
    fn pick_avoiding(
        &self,
        head: Head<'_>,
        skip: impl Fn(&Arc<Endpoint>) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        let not_skipped = |e: &Arc<Endpoint>| !skip(e);
        let host = || dest_host(head, &self.dest_host_key);
        if let [only] = &endpoints[..] {
            // One endpoint (the default group, most groups): the strategies
            // only decide whether it may be used; no balancing.
            if !not_skipped(only) {
                return None;
            }
            let found = self.strategies.iter().any(|strategy| match strategy {
                Strategy::DestHost => host().is_some_and(|h| only.answers_to(h)),
                Strategy::DefaultRoute => only.default_route,
                Strategy::Random | Strategy::LeastLoaded => true,
            });
            return found.then(|| only.clone());
        }
        for strategy in &self.strategies {
            let chosen = match strategy {
                Strategy::DestHost => {
                    let Some(host) = host() else {
                        continue;
                    };
                    choose(&endpoints, false, |e| not_skipped(e) && e.answers_to(host))
                }
                Strategy::DefaultRoute => {
                    choose(&endpoints, false, |e| not_skipped(e) && e.default_route)
                }
                Strategy::Random if self.weighted => choose_weighted(&endpoints, not_skipped),
                Strategy::Random => choose(&endpoints, true, not_skipped),
                Strategy::LeastLoaded => choose(&endpoints, false, not_skipped),
            };
            if let Some(e) = chosen {
                return Some(e.clone());
            }
        }
        None
    }
}

impl Endpoint {
    /// Whether `dest-host` finds it by `host` (as the call wrote it).
    fn answers_to(&self, host: &str) -> bool {
        self.ids.iter().any(|i| i.eq_ignore_ascii_case(host))
    }
}

/// Among the endpoints that `matches`, the serving ones (usable, not
/// draining, not ejected) first, else the usable ones not ejected, else
/// any not ejected, else any: one at random, or the cheaper of two at
/// random (P2C).
fn choose(
    endpoints: &[Arc<Endpoint>],
    random: bool,
    matches: impl Fn(&Arc<Endpoint>) -> bool,
) -> Option<&Arc<Endpoint>> {
    let kept = |e: &Arc<Endpoint>| !e.outlier.is_ejected();
    let serving = |e: &Arc<Endpoint>| kept(e) && !e.unusable() && !e.pool().is_draining();
    let usable = |e: &Arc<Endpoint>| kept(e) && !e.unusable();
    let any = |_: &Arc<Endpoint>| true;
    let tiers: [&dyn Fn(&Arc<Endpoint>) -> bool; 4] = [&serving, &usable, &kept, &any];
    for tier in tiers {
        let ok = |e: &&Arc<Endpoint>| matches(e) && tier(e);
        let n = endpoints.iter().filter(ok).count();
        if n == 0 {
            continue;
        }
        let nth = |k: usize| endpoints.iter().filter(ok).nth(k);
        if random || n == 1 {
            return nth(random_below(n));
        }
        let a = random_below(n);
        let b = (a + 1 + random_below(n - 1)) % n;
        let (ea, eb) = (nth(a)?, nth(b)?);
        return Some(if ea.cost() <= eb.cost() { ea } else { eb });
    }
    None
}

/// Among the endpoints that `matches`, the usable ones (else any): one at
/// random in proportion to its weight.
fn choose_weighted(
    endpoints: &[Arc<Endpoint>],
    matches: impl Fn(&Arc<Endpoint>) -> bool,
) -> Option<&Arc<Endpoint>> {
    let usable = |e: &Arc<Endpoint>| !e.unusable() && !e.outlier.is_ejected();
    let any = |_: &Arc<Endpoint>| true;
    let tiers: [&dyn Fn(&Arc<Endpoint>) -> bool; 2] = [&usable, &any];
    for tier in tiers {
        let ok = |e: &&Arc<Endpoint>| matches(e) && tier(e);
        let total: u64 = endpoints
            .iter()
            .filter(ok)
            .map(|e| u64::from(e.weight))
            .sum();
        if total == 0 {
            continue;
        }
        let mut at = random_below(usize::try_from(total).unwrap_or(usize::MAX)) as u64;
        for e in endpoints.iter().filter(ok) {
            if at < u64::from(e.weight) {
                return Some(e);
            }
            at -= u64::from(e.weight);
        }
    }
    None
}

/// What the strategies read of a call: its headers and its URI, borrowed
/// from the request, which stays whole (taking it apart and back costs a
/// move of its head and body per call).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Head<'a> {
    headers: &'a HeaderMap,
    uri: &'a Uri,
}

impl<'a> Head<'a> {
    pub(crate) fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            headers: req.headers(),
            uri: req.uri(),
        }
    }

    /// The head of a request taken apart.
    pub(crate) fn of_parts(parts: &'a http::request::Parts) -> Self {
        Self {
            headers: &parts.headers,
            uri: &parts.uri,
        }
    }
}

/// The destination host of a call: the group's metadata key, else the
/// `:authority` host, without a port or IPv6 brackets (compared without
/// regard to case).
fn dest_host<'a>(head: Head<'a>, key: &HeaderName) -> Option<&'a str> {
    let raw = match head.headers.get(key).and_then(|v| v.to_str().ok()) {
        Some(v) => v,
        None => head.uri.authority()?.host(),
    };
    let host = raw.trim().trim_start_matches('[');
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    };
    Some(host.trim_end_matches(']'))
}

/// A cheap per-thread random number below `n` (xorshift, seeded from the
/// std hasher's random keys): balancing needs spread, not secrecy.
pub(crate) fn random_below(n: usize) -> usize {
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

    #[test]
    fn the_destination_host_is_the_key_else_the_authority_without_its_port() {
        let key = HeaderName::from_static("x-dest-host");
        let head = |uri: &str, dest: Option<&str>| {
            let mut req = http::Request::post(uri);
            if let Some(d) = dest {
                req = req.header("x-dest-host", d);
            }
            req.body(()).expect("request")
        };
        let p = head("http://app.internal:50051/a.B/C", None);
        assert_eq!(dest_host(Head::of(&p), &key), Some("app.internal"));
        let p = head("http://app.internal/a.B/C", Some(" Node-1:8080 "));
        assert_eq!(dest_host(Head::of(&p), &key), Some("Node-1"));
        let p = head("http://[::1]:443/a.B/C", None);
        assert_eq!(dest_host(Head::of(&p), &key), Some("::1"));
    }
}
