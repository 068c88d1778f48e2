//! A route's per-call policies, compiled once per config: what the
//! balancer does before it picks (rate limit, concurrency limit, fault
//! injection) and how it sends a call again (retry, hedge).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use http::{HeaderMap, HeaderName};
use sluice_layers::{grpc::status::Code, identity::PeerIdentity};
use tokio::time::Instant;

use super::{BalanceError, group::random_below};
use crate::{
    config::{FaultConfig, HedgeConfig, RateLimitConfig, RetryConfig, RouteConfig},
    upstream::Slot,
};

/// The policies of one route, attached to its destination
/// ([`Destination::with_policy`](sluice_layers::direct::Destination::with_policy)).
#[derive(Debug)]
pub(crate) struct RoutePolicy {
    /// What messages call the route by: its name, else its place.
    label: String,
    pub(crate) retry: Option<RetryConfig>,
    pub(crate) hedge: Option<HedgeConfig>,
    fault: Option<FaultConfig>,
    rate: Option<RateLimiter>,
    in_flight: Option<(Arc<AtomicUsize>, usize)>,
    pub(crate) max_stream_age: Option<Duration>,
}

impl RoutePolicy {
    /// The policies of route `index`, if it sets any.
    pub(crate) fn new(index: usize, r: &RouteConfig) -> Option<Arc<Self>> {
        if !r.has_policy() {
            return None;
        }
        Some(Arc::new(Self {
            label: r.name.clone().unwrap_or_else(|| format!("routes[{index}]")),
            retry: r.retry.clone(),
            hedge: r.hedge.clone(),
            fault: r.fault.clone(),
            rate: r.rate_limit.as_ref().map(RateLimiter::new),
            in_flight: r.max_in_flight.map(|max| (Arc::default(), max)),
            max_stream_age: r.max_stream_age,
        }))
    }

    /// A policy that only retries (an xDS route's, gRFC A44).
    pub(crate) fn retry_only(label: &str, retry: RetryConfig) -> Arc<Self> {
        Arc::new(Self {
            label: label.to_owned(),
            retry: Some(retry),
            hedge: None,
            fault: None,
            rate: None,
            in_flight: None,
            max_stream_age: None,
        })
    }

    /// Whether the call may go on: under the route's rate and
    /// concurrency limits, and not picked for an injected abort (after
    /// an injected delay). The place it holds in the route's
    /// `max_in_flight`, if any, is given back when dropped.
    pub(crate) async fn admit(
        &self,
        headers: &HeaderMap,
        identity: Option<&PeerIdentity>,
    ) -> Result<Option<Slot>, BalanceError> {
        let limited = |what: String| BalanceError::Limited {
            code: Code::ResourceExhausted,
            message: format!("{}: {what}", self.label),
            reason: crate::telemetry::metrics::RefusalReason::rate_limit,
        };
        if let Some(rate) = &self.rate
            && !rate.admit(headers, identity)
        {
            return Err(limited(format!(
                "over its rate limit of {} calls/s",
                rate.config.rate
            )));
        }
        let slot = match &self.in_flight {
            Some((count, max)) => {
                Some(
                    Slot::take(count, *max).ok_or_else(|| BalanceError::Limited {
                        code: Code::ResourceExhausted,
                        message: format!(
                            "{}: {max} calls in flight already (max_in_flight)",
                            self.label
                        ),
                        reason: crate::telemetry::metrics::RefusalReason::max_in_flight,
                    })?,
                )
            }
            None => None,
        };
        if let Some(fault) = &self.fault {
            let (delay, abort) = fault.decide(headers);
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(code) = abort {
                return Err(BalanceError::Limited {
                    code,
                    message: format!("{}: fault injected", self.label),
                    reason: crate::telemetry::metrics::RefusalReason::fault,
                });
            }
        }
        Ok(slot)
    }
}

/// Whether to act on a share of `percent` percent, at random.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (random_below(1_000_000) as f64) < percent * 10_000.0
}

/// The longest delay a call may ask for with `x-envoy-fault-delay-request`.
pub(crate) const MAX_HEADER_FAULT_DELAY: Duration = Duration::from_secs(10);
/// The longest server pushback a retry or hedge waits: a longer one means
/// no further attempt (the answer goes to the client now), so that an
/// upstream cannot park a call in sluice without a deadline.
pub(crate) const MAX_PUSHBACK: Duration = Duration::from_secs(30);

const FAULT_DELAY: HeaderName = HeaderName::from_static("x-envoy-fault-delay-request");
const FAULT_DELAY_PERCENT: HeaderName =
    HeaderName::from_static("x-envoy-fault-delay-request-percentage");
const FAULT_ABORT: HeaderName = HeaderName::from_static("x-envoy-fault-abort-grpc-request");
const FAULT_ABORT_PERCENT: HeaderName =
    HeaderName::from_static("x-envoy-fault-abort-request-percentage");

impl FaultConfig {
    /// This call's delay and abort: the route's, or, when `headers` is
    /// on, what the call's `x-envoy-fault-*` metadata asks for.
    fn decide(&self, headers: &HeaderMap) -> (Option<Duration>, Option<Code>) {
        let number = |key: &HeaderName| -> Option<f64> {
            headers.get(key)?.to_str().ok()?.trim().parse().ok()
        };
        let mut delay = self.delay;
        let mut delay_percent = self.delay_percent;
        let mut abort = self.abort_code;
        let mut abort_percent = self.abort_percent;
        if self.headers {
            if let Some(ms) = number(&FAULT_DELAY).filter(|ms| ms.is_finite() && *ms >= 0.0) {
                // A client's own delay is capped: it holds a call slot.
                delay = Some(Duration::from_millis(ms as u64).min(MAX_HEADER_FAULT_DELAY));
                delay_percent = 100.0;
            }
            if let Some(code) = number(&FAULT_ABORT)
                .and_then(|c| Code::from_i32(c as i32))
                .filter(|c| *c != Code::Ok)
            {
                abort = Some(code);
                abort_percent = 100.0;
            }
            if let Some(p) = number(&FAULT_DELAY_PERCENT) {
                delay_percent = p.clamp(0.0, 100.0);
            }
            if let Some(p) = number(&FAULT_ABORT_PERCENT) {
                abort_percent = p.clamp(0.0, 100.0);
            }
        }
        (
            delay.filter(|_| chance(delay_percent)),
            abort.filter(|_| chance(abort_percent)),
        )
    }
}

/// A route's rate limit: one token bucket, or one per value of a key,
/// at most `max_keys` of them.
#[derive(Debug)]
struct RateLimiter {
    config: RateLimitConfig,
    burst: f64,
    shared: Mutex<Bucket>,
    /// Buckets per key in two generations: a key is looked up in the
    /// recent one, then the old one (and moved); when the recent one is
    /// full, the old one goes and the recent one becomes old. So at most
    /// `max_keys` buckets exist, and the ones dropped are the least
    /// recently used.
    /// Keyed by a hash of the value (keyed SipHash, random per process),
    /// so that a bucket costs the same whatever the length of the value a
    /// client sends: at most `max_keys` × (8 + 24) bytes and the maps'
    /// overhead.
    keyed: Mutex<[HashMap<u64, Bucket>; 2]>,
    hasher: std::hash::RandomState,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64) -> Self {
        Self {
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RateLimiter {
    fn new(config: &RateLimitConfig) -> Self {
        let burst = config
            .burst
            .map_or(config.rate.ceil().max(1.0), |b| b as f64);
        Self {
            config: config.clone(),
            burst,
            shared: Mutex::new(Bucket::full(burst)),
            keyed: Mutex::default(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn admit(&self, headers: &HeaderMap, identity: Option<&PeerIdentity>) -> bool {
        let (rate, burst) = (self.config.rate, self.burst);
        let Some(per) = &self.config.per else {
            return self.shared.lock().expect("bucket").take(rate, burst);
        };
        // A call without the key shares the bucket of the empty value.
        let key = if per == "identity" {
            identity.map_or("", PeerIdentity::id)
        } else {
            headers
                .get(per.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let key = std::hash::BuildHasher::hash_one(&self.hasher, key);
        let mut maps = self.keyed.lock().expect("buckets");
        let [recent, old] = &mut *maps;
        if let Some(bucket) = recent.get_mut(&key) {
            return bucket.take(rate, burst);
        }
        let mut bucket = old.remove(&key).unwrap_or_else(|| Bucket::full(burst));
        let admitted = bucket.take(rate, burst);
        if recent.len() >= self.config.max_keys.div_ceil(2) {
            *old = std::mem::take(recent);
        }
        recent.insert(key, bucket);
        admitted
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        let maps = self.keyed.lock().expect("buckets");
        maps[0].len() + maps[1].len()
    }
}

/// A6's backoff before retry `n` (1 for the first retry): a random time
/// below `min(initial × multiplier^(n−1), max)`.
pub(crate) fn backoff(retry: &RetryConfig, n: u32) -> Duration {
    let bound = retry.initial_backoff.as_secs_f64()
        * retry
            .backoff_multiplier
            .powi(i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX));
    let bound = bound.min(retry.max_backoff.as_secs_f64());
    Duration::from_secs_f64(bound * random_below(1_000_000) as f64 / 1_000_000.0)
}

/// What the server's `grpc-retry-pushback-ms` says: `None` without one,
/// `Some(None)` for "do not retry" (negative, malformed, or longer than
/// [`MAX_PUSHBACK`]), else the wait it asks for.
pub(crate) fn pushback(headers: &HeaderMap) -> Option<Option<Duration>> {
    let value = headers.get("grpc-retry-pushback-ms")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .filter(|wait| *wait <= MAX_PUSHBACK),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(text: &str) -> RateLimiter {
        let config: RateLimitConfig = toml::from_str(text).expect("rate limit");
        RateLimiter::new(&config)
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_takes_its_burst_then_its_rate() {
        let l = limiter("rate = 10.0\nburst = 3");
        let h = HeaderMap::new();
        let admitted = (0..5).filter(|_| l.admit(&h, None)).count();
        assert_eq!(admitted, 3);
        tokio::time::advance(Duration::from_millis(200)).await;
        let admitted = (0..5).filter(|_| l.admit(&h, None)).count();
        assert_eq!(admitted, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_per_key_are_apart_and_bounded() {
        let l = limiter("rate = 1.0\nburst = 1\nper = \"x-tenant\"\nmax_keys = 10");
        let call = |tenant: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", tenant.parse().expect("value"));
            h
        };
        assert!(l.admit(&call("a"), None));
        assert!(!l.admit(&call("a"), None));
        assert!(l.admit(&call("b"), None));
        for i in 0..1000 {
            l.admit(&call(&format!("t{i}")), None);
        }
        assert!(l.keys() <= 10, "{} buckets", l.keys());
    }

    #[test]
    fn pushback_is_a_wait_or_a_stop() {
        let mut h = HeaderMap::new();
        assert_eq!(pushback(&h), None);
        h.insert("grpc-retry-pushback-ms", "250".parse().expect("value"));
        assert_eq!(pushback(&h), Some(Some(Duration::from_millis(250))));
        for bad in ["-1", "soon", "", "30001"] {
            h.insert("grpc-retry-pushback-ms", bad.parse().expect("value"));
            assert_eq!(pushback(&h), Some(None), "{bad:?}");
        }
    }

    #[test]
    fn backoff_stays_below_its_bound() {
        let r: RetryConfig =
            toml::from_str("initial_backoff = \"100ms\"\nmax_backoff = \"300ms\"").expect("retry");
        for n in 1..6 {
            let bound = Duration::from_millis((100 * 2u64.pow(n - 1)).min(300));
            for _ in 0..100 {
                assert!(backoff(&r, n) < bound);
            }
        }
    }
}
