//! What keeps calls alive through other services' failures: a route's
//! `retry`, `hedge`, `fault`, `rate_limit`, `max_in_flight` and
//! `max_stream_age`; a group's `outlier_detection` and `retry_throttling`;
//! and `[retry]`, the bound on what retries may hold.

use std::time::Duration;

use serde::{Deserialize, Deserializer, de};
use sluice_layers::grpc::status::Code;

use super::{ByteSize, value};

/// `retry = { … }` of a route: gRFC A6's retry policy. A call whose
/// attempt ends with one of `retryable_codes` before any response headers
/// reached the client is sent again, to another endpoint when the group
/// has one, after a random backoff in `[0, min(initial_backoff ×
/// backoff_multiplier^(n−1), max_backoff))`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included: 2 to 5 (A6 caps it at 5).
    #[serde(default = "default_max_attempts", deserialize_with = "attempts")]
    pub max_attempts: u32,
    /// The first backoff's upper bound.
    #[serde(default = "default_initial_backoff", with = "value::duration")]
    pub initial_backoff: Duration,
    /// No backoff is longer.
    #[serde(default = "default_max_backoff", with = "value::duration")]
    pub max_backoff: Duration,
    /// What each backoff's bound is multiplied by.
    #[serde(default = "default_multiplier", deserialize_with = "multiplier")]
    pub backoff_multiplier: f64,
    /// The statuses that make a call worth another attempt.
    #[serde(default = "default_retryable", deserialize_with = "codes")]
    pub retryable_codes: Vec<Code>,
}

/// `hedge = { … }` of a route: gRFC A6's hedging policy. The first attempt
/// goes at once, one more every `delay` while none has answered, up to
/// `max_attempts`, each to an endpoint not yet tried when the group has
/// one; the first response headers win and the others are cancelled.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgeConfig {
    /// Attempts in all, the first included: 2 to 5.
    #[serde(default = "default_max_attempts", deserialize_with = "attempts")]
    pub max_attempts: u32,
    /// Time between attempts.
    #[serde(default = "default_hedge_delay", with = "value::duration_or_zero")]
    pub delay: Duration,
    /// Statuses after which the other attempts go on (any other status
    /// ends the call at once).
    #[serde(default, deserialize_with = "codes")]
    pub non_fatal_codes: Vec<Code>,
}

/// `fault = { … }` of a route: gRFC A33's fault injection. A share of the
/// calls waits `delay` first; a share is answered `abort_code` without
/// reaching the upstream.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// How long a delayed call waits before it goes on.
    #[serde(default, deserialize_with = "optional_duration_or_zero")]
    pub delay: Option<Duration>,
    /// Percent of calls delayed (0 to 100).
    #[serde(default = "hundred", deserialize_with = "percent")]
    pub delay_percent: f64,
    /// The status an aborted call gets.
    #[serde(default, deserialize_with = "optional_code")]
    pub abort_code: Option<Code>,
    /// Percent of calls aborted (0 to 100).
    #[serde(default = "hundred", deserialize_with = "percent")]
    pub abort_percent: f64,
    /// Whether a call may ask for its own fault with the
    /// `x-envoy-fault-*` metadata (Envoy's fault filter headers): for
    /// test environments only.
    #[serde(default)]
    pub headers: bool,
}

/// `rate_limit = { … }` of a route: a token bucket of `burst` calls,
/// refilled at `rate` per second.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Calls per second, on average.
    #[serde(deserialize_with = "positive_rate")]
    pub rate: f64,
    /// Calls at once after a quiet spell (the bucket's size); `rate`
    /// rounded up unless given.
    #[serde(default, deserialize_with = "value::positive::optional")]
    pub burst: Option<usize>,
    /// One bucket per value of this metadata key, or per client identity
    /// (`"identity"`); one bucket for every client of the route unless
    /// given.
    #[serde(default)]
    pub per: Option<String>,
    /// Buckets kept at most when `per` is given; the least recently used
    /// goes first.
    #[serde(
        default = "default_max_keys",
        deserialize_with = "value::positive::deserialize"
    )]
    pub max_keys: usize,
}

/// `outlier_detection = { … }` of a group: gRFC A50. Every `interval`,
/// endpoints whose calls fail far more than their peers' are ejected:
/// skipped by every strategy for `base_ejection_time` × the times they
/// were ejected (at most `max_ejection_time`), never more than
/// `max_ejection_percent` of the group at once.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Time between sweeps.
    #[serde(default = "default_od_interval", with = "value::duration")]
    pub interval: Duration,
    /// How long a first ejection lasts.
    #[serde(default = "default_base_ejection", with = "value::duration")]
    pub base_ejection_time: Duration,
    /// How long an ejection lasts at most.
    #[serde(default = "default_max_ejection", with = "value::duration")]
    pub max_ejection_time: Duration,
    /// Percent of the group that may be ejected at once.
    #[serde(
        default = "default_max_ejection_percent",
        deserialize_with = "percent_u32"
    )]
    pub max_ejection_percent: u32,
    /// Ejects endpoints whose success rate is far below the group's mean.
    #[serde(default)]
    pub success_rate: Option<SuccessRateConfig>,
    /// Ejects endpoints whose calls fail more than a threshold.
    #[serde(default)]
    pub failure_percentage: Option<FailurePercentageConfig>,
    /// Ejects an endpoint after this many failures in a row, at once
    /// (Envoy's `consecutive_gateway_failure`).
    #[serde(default, deserialize_with = "optional_positive_u32")]
    pub consecutive_failures: Option<u32>,
}

/// A50's success-rate ejection.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateConfig {
    /// An endpoint is an outlier below mean − stdev × `stdev_factor`/1000.
    #[serde(default = "default_stdev_factor")]
    pub stdev_factor: u32,
    /// Percent of outliers actually ejected.
    #[serde(default = "hundred_u32", deserialize_with = "percent_u32")]
    pub enforcement_percentage: u32,
    /// Endpoints with enough calls needed for the rule to apply.
    #[serde(default = "five")]
    pub minimum_hosts: u32,
    /// Calls in an interval an endpoint needs to be judged.
    #[serde(default = "hundred_u32")]
    pub request_volume: u32,
}

/// A50's failure-percentage ejection.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailurePercentageConfig {
    /// An endpoint whose failures exceed this percent is an outlier.
    #[serde(
        default = "default_failure_threshold",
        deserialize_with = "percent_u32"
    )]
    pub threshold: u32,
    /// Percent of outliers actually ejected.
    #[serde(default = "hundred_u32", deserialize_with = "percent_u32")]
    pub enforcement_percentage: u32,
    /// Endpoints with enough calls needed for the rule to apply.
    #[serde(default = "five")]
    pub minimum_hosts: u32,
    /// Calls in an interval an endpoint needs to be judged.
    #[serde(default = "fifty")]
    pub request_volume: u32,
}

/// `retry_throttling = { … }` of a group: gRFC A6's token bucket. Every
/// failed attempt takes a token, every success gives back `token_ratio`;
/// below half of `max_tokens`, no call is retried or hedged.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// The bucket's size (1 to 1000).
    pub max_tokens: u32,
    /// What a success gives back (more than 0).
    #[serde(deserialize_with = "positive_rate")]
    pub token_ratio: f64,
}

/// `[retry]`: what retries and hedges may make sluice hold. A call's
/// request messages are kept until the call is committed, up to
/// `buffer_per_call`; all calls together keep at most `buffer_total`.
/// Past either, the call is committed and goes on without retry.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBufferConfig {
    /// Request bytes kept per call.
    pub buffer_per_call: ByteSize,
    /// Request bytes kept by all calls at once.
    pub buffer_total: ByteSize,
}

/// Request bytes a call may keep for another attempt: 256 KiB (gRPC's
/// per-RPC default).
pub const DEFAULT_RETRY_BUFFER_PER_CALL: u32 = 256 << 10;
/// Request bytes all calls may keep for another attempt: 16 MiB (gRPC's
/// per-channel default).
pub const DEFAULT_RETRY_BUFFER_TOTAL: u32 = 16 << 20;

impl Default for RetryBufferConfig {
    fn default() -> Self {
        Self {
            buffer_per_call: ByteSize(DEFAULT_RETRY_BUFFER_PER_CALL),
            buffer_total: ByteSize(DEFAULT_RETRY_BUFFER_TOTAL),
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_retryable() -> Vec<Code> {
    vec![Code::Unavailable]
}
fn default_hedge_delay() -> Duration {
    Duration::ZERO
}
fn hundred() -> f64 {
    100.0
}
fn hundred_u32() -> u32 {
    100
}
fn five() -> u32 {
    5
}
fn fifty() -> u32 {
    50
}
fn default_max_keys() -> usize {
    10_000
}
fn default_od_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> u32 {
    10
}
fn default_stdev_factor() -> u32 {
    1900
}
fn default_failure_threshold() -> u32 {
    85
}

fn attempts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !(2..=5).contains(&n) {
        return Err(de::Error::custom(format!(
            "must be 2 to 5 (attempts in all, the first included), got {n}"
        )));
    }
    Ok(n)
}

fn multiplier<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let n = f64::deserialize(d)?;
    if !(n.is_finite() && n >= 1.0) {
        return Err(de::Error::custom(format!("must be 1 or more, got {n}")));
    }
    Ok(n)
}

fn positive_rate<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let n = f64::deserialize(d)?;
    if !(n.is_finite() && n > 0.0) {
        return Err(de::Error::custom(format!("must be more than 0, got {n}")));
    }
    Ok(n)
}

fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let n = f64::deserialize(d)?;
    if !(0.0..=100.0).contains(&n) {
        return Err(de::Error::custom(format!("must be 0 to 100, got {n}")));
    }
    Ok(n)
}

fn percent_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n > 100 {
        return Err(de::Error::custom(format!("must be 0 to 100, got {n}")));
    }
    Ok(n)
}

fn optional_positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("must be at least 1"));
    }
    Ok(Some(n))
}

fn codes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Code>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|name| {
            Code::from_name(name)
                .ok_or_else(|| de::Error::custom(format!("unknown gRPC status code {name:?}")))
        })
        .collect()
}

fn optional_code<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Code>, D::Error> {
    value::grpc_code(d).map(Some)
}

fn optional_duration_or_zero<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    value::duration_or_zero::deserialize(d).map(Some)
}
