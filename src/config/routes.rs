//! `[[routes]]` and `[routing]`: which calls go where.

use std::time::Duration;

use serde::Deserialize;

use super::{
    ByteSize, EnrichConfig, FanoutRouteConfig, FaultConfig, HedgeConfig, IdentityConfig,
    MirrorRouteConfig, RateLimitConfig, RetryConfig, value,
};

/// `[[routes]]`: a match and what to do with the calls it matches. Every
/// condition given must hold; a route with none matches every call.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and `sluice check`.
    #[serde(default)]
    pub name: Option<String>,
    /// `/package.Service/Method`, with `*` matching any run of characters
    /// (`/pkg.Svc/*`, `/pkg.*`).
    #[serde(default)]
    pub method: Option<String>,
    /// `:authority`, exactly.
    #[serde(default)]
    pub authority: Option<String>,
    /// Metadata conditions by key.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, TextMatch>,
    /// A condition on a field of the first request message.
    #[serde(default)]
    pub field: Option<FieldMatch>,
    /// The group to forward to (`default` is `[upstream]`).
    #[serde(default)]
    pub upstream: Option<toml::Spanned<String>>,
    /// Refuse instead of forwarding.
    #[serde(default)]
    pub refuse: Option<RefuseConfig>,
    /// Send the call to several endpoints of a group and merge the answers.
    #[serde(default)]
    pub fanout: Option<FanoutRouteConfig>,
    /// Send the call to a primary group, with copies to secondaries.
    #[serde(default)]
    pub mirror: Option<MirrorRouteConfig>,
    /// Metadata this route changes on the calls it forwards: `remove`,
    /// `set` and `append` (the rest of `[enrich]` is global only).
    #[serde(default)]
    pub enrich: Option<EnrichConfig>,
    /// Caps the deadline of the calls this route forwards (the client's
    /// `grpc-timeout`, if shorter, still wins). No cap by default: long
    /// streams must not be cut by a surprise default.
    #[serde(default, deserialize_with = "value::optional_duration")]
    pub timeout: Option<Duration>,
    /// Which verified clients may make these calls; anyone when unset.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// Sends a call that failed with a retryable status again (gRFC A6).
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Sends a call to more endpoints while the first is slow (gRFC A6).
    #[serde(default)]
    pub hedge: Option<HedgeConfig>,
    /// Delays or fails a share of the calls on purpose (gRFC A33).
    #[serde(default)]
    pub fault: Option<FaultConfig>,
    /// Calls per second this route takes; RESOURCE_EXHAUSTED over it.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Calls in flight on this route at most; RESOURCE_EXHAUSTED over it.
    #[serde(default, deserialize_with = "value::positive::optional")]
    pub max_in_flight: Option<usize>,
    /// How long a call of this route may last (with up to 10 % more, at
    /// random); then it ends with UNAVAILABLE, which clients retry.
    #[serde(default, deserialize_with = "value::optional_duration")]
    pub max_stream_age: Option<Duration>,
}

impl RouteConfig {
    /// Whether the route sets any per-call policy of its own.
    pub fn has_policy(&self) -> bool {
        self.retry.is_some()
            || self.hedge.is_some()
            || self.fault.is_some()
            || self.rate_limit.is_some()
            || self.max_in_flight.is_some()
            || self.max_stream_age.is_some()
    }
}

/// A condition on a text value.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TextMatch {
    /// The value equals this.
    Equals(String),
    /// The value starts with this.
    Prefix(String),
    /// The key is present (any value).
    Present(bool),
    /// The value matches this regular expression (anchor it with `^…$` for
    /// a whole-value match).
    Regex(#[serde(deserialize_with = "value::regex")] regex::Regex),
}

/// Two conditions are equal when they say the same (a regex by its text),
/// which is what a reload compares.
impl PartialEq for TextMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Equals(a), Self::Equals(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (Self::Present(a), Self::Present(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// A condition on a field of the first request message, by protobuf field
/// path (`1.2` = field 2 of the message in field 1), without a descriptor.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMatch {
    /// The field path.
    #[serde(deserialize_with = "value::field_path")]
    pub path: sluice_layers::grpc::wire::FieldPath,
    /// String value equals.
    #[serde(default)]
    pub equals: Option<String>,
    /// String value starts with.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Integer value equals.
    #[serde(default)]
    pub int: Option<u64>,
    /// The field is present.
    #[serde(default)]
    pub present: Option<bool>,
    /// What a compressed first message gets, its bytes being unreadable:
    /// `no-match` (the default) or `match` (for a refuse route, so that
    /// compressing the message cannot bypass it).
    #[serde(default)]
    pub compressed: CompressedMatch,
}

/// What a field condition makes of a compressed first message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressedMatch {
    /// The condition does not hold.
    #[default]
    NoMatch,
    /// The condition holds.
    Match,
}

/// A refusal: the status the client gets.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefuseConfig {
    /// A gRPC status code name, e.g. `PERMISSION_DENIED`.
    #[serde(deserialize_with = "value::grpc_code")]
    pub code: sluice_layers::grpc::status::Code,
    /// The status message.
    #[serde(default)]
    pub message: String,
}

/// `[routing]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// When no route matches: `upstream` (the default group) or
    /// `unimplemented` (refuse with UNIMPLEMENTED).
    pub fallback: Fallback,
    /// Bytes of request messages routing may hold to match on a field,
    /// per call.
    pub peek_max_bytes: ByteSize,
    /// The same, for all the calls of one downstream connection at once:
    /// peeked memory is at most `server.max_connections` × this.
    pub peek_max_bytes_per_connection: ByteSize,
    /// How long a call routing must peek may take to send its first
    /// message (its `grpc-timeout`, if shorter, wins); then it gets
    /// DEADLINE_EXCEEDED.
    #[serde(with = "value::duration")]
    pub peek_timeout: Duration,
    /// Taken off the `grpc-timeout` forwarded upstream, so the upstream
    /// gives up (and answers) before sluice's own timer fires.
    #[serde(with = "value::duration_or_zero")]
    pub deadline_offset: Duration,
}

/// What happens to calls no route matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Forward to the default group.
    #[default]
    Upstream,
    /// Refuse with UNIMPLEMENTED.
    Unimplemented,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            fallback: Fallback::Upstream,
            peek_max_bytes: ByteSize(
                u32::try_from(sluice_layers::peek::DEFAULT_MAX_BYTES).expect("64 KiB fits"),
            ),
            peek_max_bytes_per_connection: ByteSize(
                u32::try_from(sluice_layers::peek::DEFAULT_MAX_BYTES_PER_CONNECTION)
                    .expect("1 MiB fits"),
            ),
            peek_timeout: sluice_layers::peek::DEFAULT_MAX_WAIT,
            deadline_offset: Duration::ZERO,
        }
    }
}
