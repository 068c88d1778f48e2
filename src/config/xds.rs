//! `[xds]`: routes and endpoints from an xDS control plane, as gRPC's
//! proxyless clients take them (gRFC A27).

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::value;

/// How long a call waits for the xDS resources it needs before they are
/// taken not to exist: 15 s, gRFC A27's does-not-exist timer.
pub const DEFAULT_XDS_RESOURCE_TIMEOUT: Duration = Duration::from_secs(15);
/// Listener subscriptions by `:authority` at most: a client picks the
/// authority, so it must not grow sluice's subscriptions without bound.
pub const DEFAULT_XDS_MAX_AUTHORITIES: usize = 1000;
/// An authority's subscription unused this long is dropped: 5 min.
pub const DEFAULT_XDS_IDLE_UNSUBSCRIBE: Duration = Duration::from_secs(300);

/// `[xds]`. Off unless a bootstrap is found: `--xds-bootstrap`, then
/// `bootstrap` here, then the `GRPC_XDS_BOOTSTRAP` and
/// `GRPC_XDS_BOOTSTRAP_CONFIG` environment variables, as gRPC reads them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdsConfig {
    /// gRPC's bootstrap JSON file: the control plane (`xds_servers`) and
    /// the node sluice announces.
    pub bootstrap: Option<PathBuf>,
    /// The one Listener whose routes route every call; without it, each
    /// call's `:authority` names its Listener (as `xds:///AUTHORITY`).
    pub listener: Option<String>,
    /// A call xDS does not route: `none` fails it UNAVAILABLE, `upstream`
    /// sends it to `[upstream]`.
    pub fallback: XdsFallback,
    /// How long a call waits for resources that have not arrived.
    #[serde(with = "value::duration")]
    pub resource_timeout: Duration,
    /// Listener subscriptions by authority at most.
    pub max_authorities: usize,
    /// An authority unused this long is unsubscribed.
    #[serde(with = "value::duration")]
    pub idle_unsubscribe: Duration,
    /// Whether `/ready` waits for the control plane's first answer.
    pub ready_requires_config: bool,
}

/// What happens to a call xDS does not route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsFallback {
    /// UNAVAILABLE, naming the authority and what was missing.
    #[default]
    None,
    /// To `[upstream]`.
    Upstream,
}

impl Default for XdsConfig {
    fn default() -> Self {
        Self {
            bootstrap: None,
            listener: None,
            fallback: XdsFallback::None,
            resource_timeout: DEFAULT_XDS_RESOURCE_TIMEOUT,
            max_authorities: DEFAULT_XDS_MAX_AUTHORITIES,
            idle_unsubscribe: DEFAULT_XDS_IDLE_UNSUBSCRIBE,
            ready_requires_config: true,
        }
    }
}
