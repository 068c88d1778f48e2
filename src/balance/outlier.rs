//! Outlier detection (gRFC A50, plus Envoy's consecutive failures) and
//! retry throttling (gRFC A6): what a group learns from how its calls end.
//!
//! A call *fails* for both when it ends UNAVAILABLE (whoever said it),
//! DEADLINE_EXCEEDED from the upstream, or with no status at all (the
//! upstream reset it or its connection was lost); any other status is an
//! application's answer and counts as a success.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use sluice_layers::grpc::status::Code;
use tokio::time::Instant;

use super::{Endpoint, Group, group::random_below};
use crate::{config::OutlierConfig, forward::Outcome};

/// Whether a call that ended with `code` failed, for ejection and
/// throttling.
pub(crate) fn failed(code: Option<Code>) -> bool {
    matches!(
        code,
        None | Some(Code::Unavailable | Code::DeadlineExceeded)
    )
}

/// What outlier detection keeps per endpoint.
#[derive(Debug, Default)]
pub(crate) struct Record {
    successes: AtomicU32,
    failures: AtomicU32,
    consecutive: AtomicU32,
    ejected: AtomicBool,
    /// When it was last ejected, in ms since the detector's start.
    ejected_at: AtomicU64,
    /// How many times in a row it was ejected (A50's multiplier).
    multiplier: AtomicU32,
}

impl Record {
    /// Whether strategies skip it.
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }
}

/// A group's outlier detector: its settings, and the clock ejection
/// times are counted on.
#[derive(Debug)]
pub(crate) struct Detector {
    config: OutlierConfig,
}

/// The clock ejection times are counted on: one for the process, as an
/// endpoint (and its record) outlives the group a reload or an xDS update
/// replaces.
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Record {
    /// Returns an endpoint to service: its group no longer detects
    /// outliers.
    pub(crate) fn forgive(&self) {
        self.ejected.store(false, Ordering::Relaxed);
        self.multiplier.store(0, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
    }
}

impl Detector {
    pub(crate) fn new(config: OutlierConfig) -> Self {
        Self { config }
    }

    /// Counts a call to `endpoint` of `group`; with `consecutive_failures`
    /// set, ejects it at once after that many failures in a row.
    pub(crate) fn record(&self, group: &Group, endpoint: &Endpoint, code: Option<Code>) {
        let r = &endpoint.outlier;
        if !failed(code) {
            r.successes.fetch_add(1, Ordering::Relaxed);
            r.consecutive.store(0, Ordering::Relaxed);
            return;
        }
        r.failures.fetch_add(1, Ordering::Relaxed);
        let in_a_row = r.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(limit) = self.config.consecutive_failures
            && in_a_row >= limit
            && !r.is_ejected()
        {
            let endpoints = group.endpoints();
            if self.may_eject(&endpoints) {
                self.eject(endpoint, group);
            }
            r.consecutive.store(0, Ordering::Relaxed);
        }
    }

    /// Fewer than `max_ejection_percent` of the group are ejected now.
    fn may_eject(&self, endpoints: &[Arc<Endpoint>]) -> bool {
        let ejected = endpoints.iter().filter(|e| e.outlier.is_ejected()).count();
        ejected * 100 < self.config.max_ejection_percent as usize * endpoints.len()
    }

    fn eject(&self, endpoint: &Endpoint, group: &Group) {
        let r = &endpoint.outlier;
        r.ejected_at.store(now_ms(), Ordering::Relaxed);
        r.multiplier.fetch_add(1, Ordering::Relaxed);
        r.ejected.store(true, Ordering::Relaxed);
        tracing::info!(
            group = %group.name(),
            endpoint = %endpoint.label(),
            "endpoint ejected (outlier detection)"
        );
    }

    /// One interval's sweep, in A50's order: success-rate ejection,
    /// failure-percentage ejection, then the return of the endpoints whose
    /// ejection time has passed.
    pub(crate) fn sweep(&self, group: &Group) {
        let endpoints = group.endpoints();
        let counts: Vec<(u32, u32)> = endpoints
            .iter()
            .map(|e| {
                (
                    e.outlier.successes.swap(0, Ordering::Relaxed),
                    e.outlier.failures.swap(0, Ordering::Relaxed),
                )
            })
            .collect();
        if let Some(sr) = &self.config.success_rate {
            let judged: Vec<(usize, f64)> = counts
                .iter()
                .enumerate()
                .filter(|(_, (s, f))| s + f >= sr.request_volume)
                .map(|(i, (s, f))| (i, f64::from(*s) / f64::from(s + f)))
                .collect();
            if judged.len() >= sr.minimum_hosts as usize && !judged.is_empty() {
                let n = judged.len() as f64;
                let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / n;
                let var = judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
                let floor = mean - var.sqrt() * (f64::from(sr.stdev_factor) / 1000.0);
                for (i, rate) in judged {
                    if rate < floor
                        && self.may_eject(&endpoints)
                        && random_below(100) < sr.enforcement_percentage as usize
                    {
                        self.eject(&endpoints[i], group);
                    }
                }
            }
        }
        if let Some(fp) = &self.config.failure_percentage {
            let judged: Vec<usize> = (0..endpoints.len())
                .filter(|i| counts[*i].0 + counts[*i].1 >= fp.request_volume)
                .collect();
            if judged.len() >= fp.minimum_hosts as usize {
                for i in judged {
                    let (s, f) = counts[i];
                    let percent = 100.0 * f64::from(f) / f64::from(s + f);
                    if percent > f64::from(fp.threshold)
                        && !endpoints[i].outlier.is_ejected()
                        && self.may_eject(&endpoints)
                        && random_below(100) < fp.enforcement_percentage as usize
                    {
                        self.eject(&endpoints[i], group);
                    }
                }
            }
        }
        let now = now_ms();
        let base = self.config.base_ejection_time;
        let max = self.config.max_ejection_time.max(base);
        for e in endpoints.iter() {
            let r = &e.outlier;
            let multiplier = r.multiplier.load(Ordering::Relaxed);
            if r.is_ejected() {
                let lasts = base.saturating_mul(multiplier).min(max);
                let since = now.saturating_sub(r.ejected_at.load(Ordering::Relaxed));
                if Duration::from_millis(since) >= lasts {
                    r.ejected.store(false, Ordering::Relaxed);
                    r.consecutive.store(0, Ordering::Relaxed);
                    tracing::info!(group = %group.name(), endpoint = %e.label(), "ejected endpoint returns");
                }
            } else if multiplier > 0 {
                r.multiplier.store(multiplier - 1, Ordering::Relaxed);
            }
        }
    }

    /// Sweeps `group` every interval (the group's task: aborted when the
    /// group is replaced).
    pub(crate) async fn run(group: Arc<Group>) {
        let Some(interval) = group.outlier().map(|d| d.config.interval) else {
            return;
        };
        let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(d) = group.outlier() {
                d.sweep(&group);
            }
        }
    }
}

impl Detector {
    /// Sweeps `group` every interval for as long as it exists (a group
    /// made outside the config's tasks: an xDS cluster's).
    pub(crate) fn watch(group: &Arc<Group>) {
        let Some(interval) = group.outlier().map(|d| d.config.interval) else {
            return;
        };
        let group = Arc::downgrade(group);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(group) = group.upgrade() else {
                    return;
                };
                if let Some(d) = group.outlier() {
                    d.sweep(&group);
                }
            }
        });
    }
}

/// How a committed call to an endpoint ends, told to its group's
/// detector and throttle.
#[derive(Debug)]
pub(crate) struct Judge {
    pub(crate) group: Arc<Group>,
    pub(crate) endpoint: Arc<Endpoint>,
}

impl Outcome for Judge {
    fn ended(&self, code: Option<Code>) {
        self.group.ended(&self.endpoint, code);
    }
}

/// A6's retry throttle: a bucket of tokens (in thousandths), less one per
/// failed call, more `token_ratio` per success; calls are retried only
/// while it holds more than half.
#[derive(Debug)]
pub(crate) struct Throttle {
    milli: AtomicU64,
    max: u64,
    ratio: u64,
}

impl Throttle {
    pub(crate) fn new(max_tokens: u32, token_ratio: f64) -> Self {
        let max = u64::from(max_tokens) * 1000;
        Self {
            milli: AtomicU64::new(max),
            max,
            ratio: (token_ratio * 1000.0) as u64,
        }
    }

    pub(crate) fn ended(&self, failed: bool) {
        let _ = self
            .milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(if failed {
                    t.saturating_sub(1000)
                } else {
                    (t + self.ratio).min(self.max)
                })
            });
    }

    /// Whether a call may be retried or hedged now.
    pub(crate) fn allows(&self) -> bool {
        self.milli.load(Ordering::Relaxed) * 2 > self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_stops_retries_below_half_and_recovers() {
        let t = Throttle::new(10, 0.5);
        assert!(t.allows());
        for _ in 0..5 {
            t.ended(true);
        }
        assert!(!t.allows(), "5 of 10 tokens left is not more than half");
        t.ended(false);
        assert!(t.allows());
    }
}
