//! `[tunnel.hub]` and `[tunnel.agent]`: reverse tunnels. A sluice may be
//! either, both, or (the sidecar default) neither.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{ConfigError, HostPort, ServerTlsConfig, UpstreamTlsConfig, value};

/// The group accepted agents join by default.
pub const DEFAULT_AGENT_GROUP: &str = "agents";
/// How long a tunnel handshake may take: 10 s, as the HTTP/2 handshake.
pub const DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent remembers a hub it has not heard of: 3 min
/// (Teleport's proxy expiry).
pub const DEFAULT_HUB_EXPIRY: Duration = Duration::from_secs(180);
/// The first wait after a failed dial, doubling with jitter up to
/// [`DEFAULT_BACKOFF_MAX`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between dials: 15 s (Talos's gRPC MaxDelay).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(15);

/// `[tunnel]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Accept agents.
    pub hub: Option<HubConfig>,
    /// Dial hubs.
    pub agent: Option<AgentConfig>,
}

/// A hub as `hubs = [...]` of `[tunnel.hub]` names it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubPeerConfig {
    /// Its name.
    pub name: String,
    /// Its group.
    #[serde(default = "default_hub_group")]
    pub group: String,
    /// Its generation.
    #[serde(default = "default_generation")]
    pub generation: u64,
}

/// `[tunnel.hub]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Where agents dial (HTTP/1.1 Upgrade, then HTTP/2 with the hub as
    /// client).
    pub listen: SocketAddr,
    /// This hub's name, which agents claim tunnels by.
    pub name: String,
    /// The hubs' group; agents keep tunnels only to the newest generation
    /// of each group.
    #[serde(default = "default_hub_group")]
    pub hub_group: String,
    /// This hub's generation (raise it for a rollout).
    #[serde(default = "default_generation")]
    pub generation: u64,
    /// The other hubs agents should hold tunnels to (gossip).
    #[serde(default)]
    pub peers: Vec<HubPeerConfig>,
    /// The upstream group accepted agents join.
    #[serde(default = "default_agent_group")]
    pub group: String,
    /// Tokens an agent may present; empty: none needed.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Accept agents with neither a token nor a client certificate (a
    /// hub whose port only trusted agents can reach). Off: a hub must
    /// ask for one or the other.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Tunnels (and handshakes under way) at most; a connection beyond it
    /// is closed at once. Each costs ~22 KiB once connected (see
    /// `benches/tunnel.rs`), so the default bounds agents at ~220 MiB.
    #[serde(default = "default_max_agents")]
    pub max_agents: usize,
    /// Time an agent has for the whole handshake (TLS included).
    #[serde(default = "default_handshake_timeout", with = "value::duration")]
    pub handshake_timeout: Duration,
    /// TLS for agents' tunnels (`cert`, `key`, and `client_auth` to ask
    /// for agents' certificates: a missing or bad one is refused before
    /// the Upgrade is read). Its `listen` does not apply.
    #[serde(default)]
    pub tls: Option<ServerTlsConfig>,
    /// How long a call for an agent that is not connected waits for it
    /// (bounded by the call's own deadline) before it fails UNAVAILABLE:
    /// an agent re-homing from a hub that restarts, or redialling after a
    /// network blip, is back within it. `"0s"`: fail at once.
    #[serde(default = "default_agent_wait", with = "value::duration_or_zero")]
    pub agent_wait: Duration,
}

/// How long a call waits for its agent by default: 3 s, an agent's
/// redial at the shortest backoff plus a handshake, with room; short
/// enough that a call for an agent that does not exist fails in seconds.
pub const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(3);

fn default_agent_wait() -> Duration {
    DEFAULT_AGENT_WAIT
}

/// `identifiers = { … }` of `[tunnel.agent]` (konnectivity's).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentifiersConfig {
    /// Host names `dest-host` finds this agent by.
    pub host: Vec<String>,
    /// IPv4 addresses likewise.
    pub ipv4: Vec<String>,
    /// IPv6 addresses likewise.
    pub ipv6: Vec<String>,
    /// Whether `default-route` may choose this agent.
    pub default_route: bool,
}

/// `[tunnel.agent]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Hub addresses to dial (often one load-balanced address).
    pub hubs: Vec<HostPort>,
    /// This agent's id, which hubs route by.
    pub id: String,
    /// More names to be found by.
    #[serde(default)]
    pub identifiers: IdentifiersConfig,
    /// The token hubs ask for.
    #[serde(default)]
    pub token: Option<String>,
    /// Tunnels at most; 0: one per desired hub.
    #[serde(default)]
    pub connections: usize,
    /// A hub not heard of this long is forgotten.
    #[serde(default = "default_expiry", with = "value::duration")]
    pub expiry: Duration,
    /// Time allowed for the connect and the handshake.
    #[serde(default = "default_handshake_timeout", with = "value::duration")]
    pub handshake_timeout: Duration,
    /// First wait after a failed dial.
    #[serde(default = "default_backoff_min", with = "value::duration")]
    pub backoff_min: Duration,
    /// Longest wait between dials.
    #[serde(default = "default_backoff_max", with = "value::duration")]
    pub backoff_max: Duration,
    /// TLS to the hubs (`ca`, `server_name`, and `cert`/`key` when hubs
    /// ask for a certificate).
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// How often a hub is asked which hubs exist (a new generation, hubs
    /// kept past the expiry).
    #[serde(default = "default_discovery_interval", with = "value::duration")]
    pub discovery_interval: Duration,
}

/// Tunnels a hub holds at most: 10 000.
pub const DEFAULT_MAX_AGENTS: usize = 10_000;

fn default_max_agents() -> usize {
    DEFAULT_MAX_AGENTS
}

fn default_hub_group() -> String {
    "hubs".to_owned()
}
fn default_generation() -> u64 {
    1
}
fn default_agent_group() -> String {
    DEFAULT_AGENT_GROUP.to_owned()
}
fn default_handshake_timeout() -> Duration {
    DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT
}
fn default_expiry() -> Duration {
    DEFAULT_HUB_EXPIRY
}
/// How often an agent asks which hubs exist: 60 s, a third of the
/// expiry, so a hub heard of stays known.
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(60);

fn default_discovery_interval() -> Duration {
    DEFAULT_DISCOVERY_INTERVAL
}

fn default_backoff_min() -> Duration {
    DEFAULT_BACKOFF_MIN
}
fn default_backoff_max() -> Duration {
    DEFAULT_BACKOFF_MAX
}

/// Whether `text` may be a tunnel name or id: names and ids travel in
/// the handshake's headers, so letters, digits and `-._:` only, at most 253
/// bytes (the config and the handshake check the same rule).
pub fn is_tunnel_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}

fn is_name(text: &str) -> bool {
    is_tunnel_name(text)
}

impl super::Config {
    pub(super) fn check_tunnel(&self, text: &str) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: String| Err(ConfigError::at_key(text, key.to_owned(), message));
        if let Some(hub) = &self.tunnel.hub {
            if !is_name(&hub.name) {
                return bad(
                    "tunnel.hub.name",
                    format!("{:?}: letters, digits and -._: only", hub.name),
                );
            }
            let certifies = hub.tls.as_ref().is_some_and(|t| t.client_auth.is_some());
            if hub.tokens.is_empty() && !certifies && !hub.allow_anonymous {
                return bad(
                    "tunnel.hub",
                    "anyone who reaches tunnel.hub.listen would become an agent: set `tokens`, or `[tunnel.hub.tls]` with `client_auth`, or `allow_anonymous = true`".to_owned(),
                );
            }
            if hub.max_agents == 0 {
                return bad("tunnel.hub.max_agents", "must be at least 1".to_owned());
            }
            if !is_name(&hub.hub_group) {
                return bad(
                    "tunnel.hub.hub_group",
                    "letters, digits and -._: only".to_owned(),
                );
            }
            for (i, p) in hub.peers.iter().enumerate() {
                if !is_name(&p.name) || !is_name(&p.group) {
                    return bad(
                        &format!("tunnel.hub.peers[{i}]"),
                        "names and groups: letters, digits and -._: only".to_owned(),
                    );
                }
            }
            if hub.listen == self.server.listen && hub.listen.port() != 0 {
                return bad(
                    "tunnel.hub.listen",
                    "the same address as server.listen; agents need a port of their own".to_owned(),
                );
            }
            if hub.tls.as_ref().is_some_and(|t| t.listen.is_some()) {
                return bad(
                    "tunnel.hub.tls.listen",
                    "agents dial tunnel.hub.listen; TLS there takes no address of its own"
                        .to_owned(),
                );
            }
            if hub
                .tokens
                .iter()
                .any(|t| t.is_empty() || t.bytes().any(|b| !b.is_ascii_graphic()))
            {
                return bad(
                    "tunnel.hub.tokens",
                    "a token is printable ASCII without spaces".to_owned(),
                );
            }
        }
        if self.admin.ready_requires_agents && self.tunnel.hub.is_none() {
            return bad(
                "admin.ready_requires_agents",
                "only a tunnel hub has agents ([tunnel.hub] is not set)".to_owned(),
            );
        }
        if let Some(agent) = &self.tunnel.agent {
            if agent.hubs.is_empty() {
                return bad(
                    "tunnel.agent.hubs",
                    "an agent needs at least one hub address".to_owned(),
                );
            }
            if !is_name(&agent.id) {
                return bad(
                    "tunnel.agent.id",
                    format!("{:?}: letters, digits and -._: only", agent.id),
                );
            }
            if agent
                .token
                .as_ref()
                .is_some_and(|t| t.is_empty() || t.bytes().any(|b| !b.is_ascii_graphic()))
            {
                return bad(
                    "tunnel.agent.token",
                    "a token is printable ASCII without spaces".to_owned(),
                );
            }
            if agent.discovery_interval.is_zero() {
                return bad(
                    "tunnel.agent.discovery_interval",
                    "must be above zero".to_owned(),
                );
            }
            if agent.backoff_min.is_zero() || agent.backoff_max < agent.backoff_min {
                return bad(
                    "tunnel.agent.backoff_max",
                    "backoff_min must be above zero and at most backoff_max".to_owned(),
                );
            }
        }
        Ok(())
    }
}
