//! xDS: routes and endpoints from a control plane, taken as gRPC's
//! proxyless clients take them (gRFC A27 and the gRFCs it points to), so
//! that one control plane and one bootstrap file steer sluice and the
//! proxyless clients beside it.
//!
//! [`bootstrap`] reads gRPC's bootstrap; the ADS client ([`client`])
//! keeps one state-of-the-world stream, ACKs and NACKs, and rebuilds the
//! view ([`view`]) that the routing layer ([`route`]) reads once per
//! call. The resources ([`resources`]) are the published Envoy types,
//! decoded into sluice's own small model; endpoints become
//! [`balance`](crate::balance) groups, one per priority.

pub(crate) mod bootstrap;
mod cache;
pub(crate) mod client;
pub(crate) mod resources;
pub(crate) mod route;
pub(crate) mod view;

use std::sync::Arc;

pub use self::bootstrap::{Bootstrap, BootstrapError};
pub(crate) use self::{
    client::Shared,
    route::{Unrouted, XDS_TARGET, XdsRoute},
};
use crate::{
    config::{UpstreamConfig, XdsConfig},
    stats::Counters,
    telemetry::metrics::Metrics,
};

/// Starts the ADS client on the current runtime: the state the routing
/// layer reads, and the task (aborted at drain).
pub(crate) fn start(
    bootstrap: Bootstrap,
    config: XdsConfig,
    template: UpstreamConfig,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
) -> (Arc<Shared>, tokio::task::JoinHandle<()>) {
    let shared = Arc::new(Shared::new(&bootstrap, config));
    let client = client::Client::new(shared.clone(), bootstrap, template, counters, metrics);
    (shared, tokio::spawn(client.run()))
}

/// What `GET /config` shows of xDS: the control plane, the versions in
/// force, the last NACK, and every resource's state.
pub(crate) fn describe(shared: &Shared) -> String {
    use std::sync::atomic::Ordering;
    let status = shared.status.lock().expect("xds status lock");
    let mode = shared.config.listener.as_ref().map_or_else(
        || "Listener by each call's :authority".to_owned(),
        |l| format!("Listener {l:?} for every call"),
    );
    let mut text = format!(
        "# xDS from {} (bootstrap {}), {}; {mode}\n",
        shared.server,
        shared.origin,
        if shared.connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "not connected"
        },
    );
    for (i, t) in resources::TYPES.iter().enumerate() {
        text.push_str(&format!(
            "  version {}: {:?}\n",
            resources::short(t),
            status.versions[i]
        ));
    }
    if let Some(nack) = &status.last_nack {
        text.push_str(&format!("  last NACK: {nack}\n"));
    }
    for line in &status.lines {
        text.push_str(line);
        text.push('\n');
    }
    text
}
