//! sluice's configuration: one TOML file, read into plain data.
//!
//! [`Config::from_toml_str`] is pure, so tests pass strings. Every value is
//! checked while it is read, so an error names the key and the line and
//! column where it sits. With no file, sluice runs on the embedded
//! [`DEFAULT_TOML`]: inbound h2c on port 15051, forwarding to the
//! application on `127.0.0.1:50051`.

mod defaults;
mod enrich;
mod error;
mod fanout;
mod ops;
mod resilience;
mod routes;
mod server;
mod tls;
mod tunnel;
mod upstream;
mod validate;
mod value;
mod xds;

use std::time::Duration;

use serde::Deserialize;

pub use self::defaults::*;
pub use self::enrich::EnrichConfig;
pub use self::error::ConfigError;
pub use self::fanout::{
    FailWhen, FanoutConfig, FanoutMode, FanoutRouteConfig, MalformedConfig, MirrorRouteConfig,
    OnErrorConfig, OverflowConfig, SecondaryConfig,
};
pub use self::ops::{
    AdminConfig, AdminControl, AdminListen, DrainConfig, LogConfig, LogFormat, OtlpEndpoint,
    ReloadConfig, RuntimeConfig, TraceConfig,
};
pub use self::resilience::{
    DEFAULT_RETRY_BUFFER_PER_CALL, DEFAULT_RETRY_BUFFER_TOTAL, FailurePercentageConfig,
    FaultConfig, HedgeConfig, OutlierConfig, RateLimitConfig, RetryBufferConfig, RetryConfig,
    SuccessRateConfig, ThrottleConfig,
};
pub use self::routes::{
    CompressedMatch, Fallback, FieldMatch, RefuseConfig, RouteConfig, RoutingConfig, TextMatch,
};
pub use self::server::{NonGrpc, ServerConfig};
pub use self::tls::{
    ClientAuthConfig, ClientAuthMode, DEFAULT_CLIENT_ID_KEY, DEFAULT_RELOAD_INTERVAL,
    IdentityConfig, RoleSource, ServerTlsConfig, TlsConfig, UpstreamTlsConfig,
};
pub use self::tunnel::{
    AgentConfig, DEFAULT_AGENT_GROUP, DEFAULT_AGENT_WAIT, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN,
    DEFAULT_DISCOVERY_INTERVAL, DEFAULT_HUB_EXPIRY, DEFAULT_MAX_AGENTS,
    DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT, HubConfig, HubPeerConfig, IdentifiersConfig, TunnelConfig,
    is_tunnel_name,
};
pub use self::upstream::{
    DEFAULT_DEST_HOST_KEY, DEFAULT_RESOLVE_INTERVAL, EndpointConfig, FrameSize, GroupConfig,
    HealthCheckConfig, Strategy, UpstreamConfig,
};
pub use self::value::{ByteSize, HostPort, WindowSize};
pub use self::xds::{
    DEFAULT_XDS_IDLE_UNSUBSCRIBE, DEFAULT_XDS_MAX_AUTHORITIES, DEFAULT_XDS_RESOURCE_TIMEOUT,
    XdsConfig, XdsFallback,
};

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The name of the group `[upstream]` defines.
pub const DEFAULT_GROUP: &str = "default";

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The downstream side: where sluice listens, and its HTTP/2 settings.
    pub server: ServerConfig,
    /// Where calls go.
    pub upstream: UpstreamConfig,
    /// The tokio runtime.
    pub runtime: RuntimeConfig,
    /// Logging.
    pub log: LogConfig,
    /// Shutdown: readiness, GOAWAY, grace period.
    pub drain: DrainConfig,
    /// The admin HTTP server: `/live`, `/ready`, `/metrics`, `POST /drain`.
    pub admin: AdminConfig,
    /// OpenTelemetry span export.
    pub trace: TraceConfig,
    /// More upstream groups, by name, besides `[upstream]` (group `default`).
    pub upstreams: std::collections::BTreeMap<String, GroupConfig>,
    /// RouteTable, tried in order; the first that matches decides.
    pub routes: Vec<RouteConfig>,
    /// What happens when no route matches, and how routing reads calls.
    pub routing: RoutingConfig,
    /// What fan-out and mirror routes share.
    pub fanout: FanoutConfig,
    /// Request metadata added and stripped on every call.
    pub enrich: EnrichConfig,
    /// `[tls]`: reloading of every certificate, key and CA file.
    pub tls: TlsConfig,
    /// `[reload]`: reading this config again while calls run.
    pub reload: ReloadConfig,
    /// `[xds]`: routes and endpoints from an xDS control plane.
    pub xds: XdsConfig,
    /// `[tunnel]`: reverse tunnels (hub, agent).
    pub tunnel: TunnelConfig,
    /// `[retry]`: what retries and hedges may hold.
    pub retry: RetryBufferConfig,
}

/// Checks what the environment adds to a config: `RUST_LOG`, which
/// overrides `log.level` when set and not empty, must be a log filter.
///
/// # Errors
///
/// [`ConfigError::Environment`] naming the variable.
pub fn validate_environment(_config: &Config) -> Result<(), ConfigError> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&v)
            .map(drop)
            .map_err(|e| ConfigError::Environment {
                variable: "RUST_LOG",
                message: format!("{v:?} is not a log filter ({e})"),
            }),
        _ => Ok(()),
    }
}

/// Parses a duration as the config writes them: `"250ms"`, `"1s"`,
/// `"5m"`, `"1h"`.
///
/// # Errors
///
/// What is wrong with `s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    value::duration::parse(s)
}

// === impl Config ===

impl Config {
    /// Reads a configuration from TOML text.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key, line and column of the first value
    /// that is malformed, unknown or out of range.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| ConfigError::from_toml(text, None, &e))?;
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::from_toml(text, Some(path), e.inner())
        })?;
        config.validate(text)?;
        Ok(config)
    }

    /// Reads a configuration file.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the file cannot be read or is not valid.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text).map_err(|e| e.in_file(path))?;
        let base = path.parent().unwrap_or_else(|| std::path::Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Makes every relative file path (certificates, keys, CA bundles)
    /// relative to `base`, the config file's directory.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(tls) = &mut self.server.tls {
            tls.resolve_paths(base);
        }
        if let Some(tls) = &mut self.upstream.tls {
            tls.resolve_paths(base);
        }
        for group in self.upstreams.values_mut() {
            if let Some(tls) = &mut group.tls {
                tls.resolve_paths(base);
            }
        }
        if let Some(tls) = self.tunnel.hub.as_mut().and_then(|h| h.tls.as_mut()) {
            tls.resolve_paths(base);
        }
        if let Some(tls) = self.tunnel.agent.as_mut().and_then(|a| a.tls.as_mut()) {
            tls.resolve_paths(base);
        }
        if let Some(bootstrap) = &mut self.xds.bootstrap
            && bootstrap.is_relative()
        {
            *bootstrap = base.join(&*bootstrap);
        }
    }

    /// Whether upstream group `name` exists: the default, a configured
    /// one, or the one tunnel agents join.
    pub fn group_defined(&self, name: &str) -> bool {
        name == DEFAULT_GROUP
            || self.upstreams.contains_key(name)
            || self.tunnel.hub.as_ref().is_some_and(|h| h.group == name)
    }

    /// The metadata key a verified client identity goes under, if any:
    /// `enrich.client_id` (empty: none), else [`DEFAULT_CLIENT_ID_KEY`]
    /// when client certificates are verified.
    pub fn client_id_key(&self) -> Option<&str> {
        match self.enrich.client_id.as_deref() {
            Some("") => None,
            Some(key) => Some(key),
            None => self
                .server
                .tls
                .as_ref()
                .and_then(|t| t.client_auth.as_ref())
                .map(|_| DEFAULT_CLIENT_ID_KEY),
        }
    }

    /// The settings of the endpoints of group `group`: `[upstream]`'s,
    /// with what the group sets itself.
    pub fn group_upstream(&self, group: &GroupConfig) -> UpstreamConfig {
        let mut u = self.upstream.clone();
        if let Some(t) = group.connect_timeout {
            u.connect_timeout = t;
        }
        if let Some(n) = group.max_connections {
            u.max_connections = n;
        }
        if let Some(t) = group.idle_timeout {
            u.idle_timeout = t;
        }
        u.tls.clone_from(&group.tls);
        u
    }

    /// The embedded default configuration.
    pub fn embedded() -> Self {
        Self::from_toml_str(DEFAULT_TOML).expect("the embedded default config is valid")
    }
}

#[cfg(test)]
mod tests;
