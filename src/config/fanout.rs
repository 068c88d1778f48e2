//! The config of fan-out and mirror routes, and `[fanout]`: what every
//! such call shares.

use serde::Deserialize;

use super::ByteSize;

/// `fanout = { … }` of a route: the call goes to several endpoints of one
/// group (Talos's one-to-many).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutRouteConfig {
    /// The group whose endpoints are the destinations.
    pub group: toml::Spanned<String>,
    /// A metadata key naming the destinations: its values (comma
    /// separated, or the key repeated) are matched against the endpoints'
    /// ids, and the key is stripped before forwarding. Without it, every
    /// endpoint of the group is a destination. With it, the route matches
    /// only calls that carry the key.
    #[serde(default)]
    pub key: Option<String>,
    /// `merge` (unary replies concatenated, in the group's order),
    /// `merge-by-arrival`, or `interleave` (streaming). Without it:
    /// `interleave` if the method matches `[fanout] streaming_methods`,
    /// else `merge`.
    #[serde(default)]
    pub mode: Option<FanoutMode>,
}

/// How a fan-out's replies become one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FanoutMode {
    /// Unary replies concatenated in the route's order.
    Merge,
    /// Unary replies concatenated as they arrived.
    MergeByArrival,
    /// Every message forwarded as it arrives.
    Interleave,
}

/// `mirror = { … }` of a route: the primary answers, the secondaries get
/// copies (Gitaly's Praefect).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRouteConfig {
    /// The group that answers.
    pub primary: toml::Spanned<String>,
    /// The groups that get copies: a name, or a table with policies.
    pub secondaries: Vec<SecondaryConfig>,
}

/// One secondary of a mirror.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SecondaryConfig {
    /// Just the group: `block` and `swallow`.
    Group(String),
    /// The group with its policies.
    Detailed {
        /// The group.
        upstream: String,
        /// `block` (the slowest paces the call) or `drop` (cancelled when
        /// it falls `[fanout] queue` frames behind; the primary is never
        /// slowed).
        #[serde(default)]
        overflow: OverflowConfig,
        /// `swallow` (reported only) or `fail` (an OK call ends INTERNAL
        /// naming the secondary; the primary's trailers wait for it).
        #[serde(default)]
        on_error: OnErrorConfig,
    },
}

/// A secondary's overflow policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverflowConfig {
    /// Wait for room.
    #[default]
    Block,
    /// Cancel the secondary.
    Drop,
}

/// A secondary's error policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnErrorConfig {
    /// Report it only.
    #[default]
    Swallow,
    /// Fail the call.
    Fail,
}

impl SecondaryConfig {
    /// The group.
    pub fn upstream(&self) -> &str {
        match self {
            Self::Group(g) | Self::Detailed { upstream: g, .. } => g,
        }
    }
}

/// `[fanout]`: what every fan-out and mirror call shares.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Frames (request side) and messages (interleaved replies) queued
    /// per destination: 16, Praefect's.
    pub queue: usize,
    /// The budget of a merged reply, every destination together
    /// (RESOURCE_EXHAUSTED beyond): 4 MiB, gRPC's default message limit.
    pub max_reply_bytes: ByteSize,
    /// The largest message of an interleaved destination: 4 MiB.
    pub max_message_bytes: ByteSize,
    /// The field number of the metadata appended to each reply entry
    /// (Talos's `common.Metadata metadata = 1`).
    pub metadata_field: u32,
    /// A reply not in the `repeated X messages = 1` layout: `fail` (the
    /// call fails INTERNAL naming the destination) or `pass` (it is added
    /// unenriched and counted).
    pub malformed: MalformedConfig,
    /// When the call fails: `all` (every destination failed) or `any`.
    pub fail_when: FailWhen,
    /// Methods (globs) whose fan-out interleaves when the route does not
    /// say: whether a method streams is not visible on the wire.
    pub streaming_methods: Vec<String>,
    /// How long mirror secondaries may run on once the primary has ended
    /// (and hold an `on_error = "fail"` call's end); then they are
    /// cancelled and reported `cancelled`: 30 s.
    #[serde(with = "super::value::duration")]
    pub secondary_grace: std::time::Duration,
}

/// What a malformed reply does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MalformedConfig {
    /// Fail.
    #[default]
    Fail,
    /// Pass through unenriched.
    Pass,
}

/// When a fan-out call fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailWhen {
    /// Every destination failed.
    #[default]
    All,
    /// Any destination failed.
    Any,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            queue: sluice_layers::fanout::DEFAULT_QUEUE,
            max_reply_bytes: ByteSize(sluice_layers::fanout::DEFAULT_MAX_REPLY_BYTES as u32),
            max_message_bytes: ByteSize(sluice_layers::fanout::DEFAULT_MAX_MESSAGE_BYTES as u32),
            metadata_field: 1,
            malformed: MalformedConfig::Fail,
            fail_when: FailWhen::All,
            streaming_methods: Vec::new(),
            secondary_grace: sluice_layers::fanout::DEFAULT_SECONDARY_GRACE,
        }
    }
}
