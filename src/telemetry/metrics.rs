//! Prometheus metrics, encoded by `prometheus-client`.
//!
//! Handles are resolved once and shared; per call the cost is a label
//! lookup and a few atomic adds.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use sluice_layers::drain::Watch;

pub(crate) use super::refusals::RefusalReason;
use super::{
    calls::CallFamilies,
    collect::{
        AgentCollector, AgentFn, CountFn, GroupsCollector, GroupsFn, HubCollector,
        ProcessCollector, to_text_004,
    },
    refusals::Refusals,
};
use crate::stats::Counters;

/// A mirror destination's outcome, by route and destination (group
/// names from the config: bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MirrorLabels {
    route: String,
    destination: String,
    outcome: &'static str,
}

/// A fan-out destination's outcome, by route. Not by destination: a
/// metadata key lets a client name any destination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FanoutLabels {
    route: String,
    outcome: &'static str,
}

/// A failed TLS handshake: which side, and why (a fixed set of reasons).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    side: &'static str,
    reason: &'static str,
}

/// A reload of TLS material: which (a config key) and how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    material: String,
    outcome: &'static str,
}

/// A reload of the config: how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConfigReloadLabels {
    outcome: &'static str,
}

/// An xDS resource type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct XdsTypeLabels {
    r#type: &'static str,
}

/// The version of an xDS type in force.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct XdsVersionLabels {
    r#type: &'static str,
    version: String,
}

/// Every metric sluice exports.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    downstream_connections: Gauge,
    upstream_connections: Gauge,
    calls_in_flight: Gauge,
    retry_buffer_bytes: Gauge,
    pub(crate) refusals: Refusals,
    drain_state: Gauge,
    pub(crate) calls: std::sync::Arc<CallFamilies>,
    mirror_outcomes: Family<MirrorLabels, Counter>,
    fanout_outcomes: Family<FanoutLabels, Counter>,
    tls_handshake_failures: Family<HandshakeLabels, Counter>,
    tls_reloads: Family<ReloadLabels, Counter>,
    config_reloads: Family<ConfigReloadLabels, Counter>,
    xds_connected: Gauge,
    xds_versions: Family<XdsVersionLabels, Gauge>,
    /// The version label each type's sample has now, to remove it when it
    /// changes.
    xds_current: std::sync::Mutex<std::collections::HashMap<&'static str, String>>,
    xds_updates: Family<XdsTypeLabels, Counter>,
    xds_nacks: Family<XdsTypeLabels, Counter>,
    /// Access-log entries dropped because the writer was behind.
    pub(crate) access_log_dropped: Counter,
}

/// The handles scrape-time families read (see [`super::collect`]).
#[derive(Default)]
pub(crate) struct Views {
    /// A tunnel agent's pool: its families exist only on an agent.
    pub(crate) agent: Option<AgentFn>,
    /// A hub's agents: the family exists only on a hub.
    pub(crate) hub: Option<CountFn>,
    /// The upstream groups now.
    pub(crate) groups: Option<GroupsFn>,
}

// === impl Metrics ===

impl Metrics {
    pub(crate) fn new(views: Views) -> Self {
        let mut root = Registry::default();
        // The process's own families are unprefixed, as every client
        // library names them.
        root.register_collector(Box::new(ProcessCollector::new()));
        let registry = root.sub_registry_with_prefix("sluice");
        registry.register(
            "build",
            "sluice's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        if let Some(agent) = views.agent {
            registry.register_collector(Box::new(AgentCollector(agent)));
        }
        if let Some(hub) = views.hub {
            registry.register_collector(Box::new(HubCollector(hub)));
        }
        if let Some(groups) = views.groups {
            registry.register_collector(Box::new(GroupsCollector(groups)));
        }
        let calls = std::sync::Arc::new(CallFamilies::new());
        for (name, help, family) in [
            (
                "request_messages",
                "gRPC request messages",
                &calls.request_messages,
            ),
            (
                "response_messages",
                "gRPC response messages",
                &calls.response_messages,
            ),
            (
                "request_bytes",
                "Request DATA bytes (framing included)",
                &calls.request_bytes,
            ),
            (
                "response_bytes",
                "Response DATA bytes (framing included)",
                &calls.response_bytes,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "calls",
            "Calls by service, method and gRPC status",
            calls.calls.clone(),
        );
        registry.register(
            "upstream_calls",
            "Calls by the route that sent them (empty: none named), the upstream group they went to, and gRPC status",
            calls.upstream_calls.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Call duration, from request headers to the end of the response",
            calls.duration.clone(),
        );
        Self {
            downstream_connections: register(
                registry,
                "downstream_connections",
                "Downstream (client) connections being served",
            ),
            upstream_connections: register(
                registry,
                "upstream_connections",
                "Upstream connections open",
            ),
            calls_in_flight: register(
                registry,
                "calls_in_flight",
                "Calls forwarded and not yet finished",
            ),
            retry_buffer_bytes: register(
                registry,
                "retry_buffer_bytes",
                "Request bytes kept for another attempt by calls not yet committed",
            ),
            refusals: Refusals(register(
                registry,
                "refusals",
                "Calls sluice answered itself instead of forwarding, by reason",
            )),
            drain_state: register(
                registry,
                "drain_state",
                "0 serving, 1 draining, 2 drain deadline passed",
            ),
            mirror_outcomes: register(
                registry,
                "mirror_outcomes",
                "Mirrored calls' destinations by route, destination and outcome",
            ),
            fanout_outcomes: register(
                registry,
                "fanout_outcomes",
                "Fan-out calls' destinations by route and outcome",
            ),
            tls_handshake_failures: register(
                registry,
                "tls_handshake_failures",
                "TLS handshakes that failed, by side (downstream, upstream) and reason",
            ),
            tls_reloads: register(
                registry,
                "tls_reloads",
                "Reloads of certificates, keys and CA bundles, by material and outcome",
            ),
            config_reloads: register(
                registry,
                "config_reloads",
                "Reloads of the config file, by outcome (applied, unchanged, invalid)",
            ),
            xds_connected: register(
                registry,
                "xds_connected",
                "Whether the ADS stream to the xDS control plane is open (1) or not (0)",
            ),
            xds_versions: register(
                registry,
                "xds_resource_version",
                "The version of each xDS resource type in force (the sample with value 1)",
            ),
            xds_current: std::sync::Mutex::default(),
            xds_updates: register(
                registry,
                "xds_updates",
                "xDS responses applied (ACKed), by resource type",
            ),
            xds_nacks: register(
                registry,
                "xds_nacks",
                "xDS responses refused (NACKed) because a resource was invalid, by resource type",
            ),
            access_log_dropped: register(
                registry,
                "access_log_dropped",
                "Access-log lines dropped because the writer was behind",
            ),
            calls,
            registry: root,
        }
    }

    /// Counts a failed TLS handshake.
    pub(crate) fn tls_handshake_failed(&self, side: &'static str, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&HandshakeLabels { side, reason })
            .inc();
    }

    /// Counts a reload of TLS material (`swapped` or `failed`).
    pub(crate) fn tls_reloaded(&self, material: &str, outcome: &'static str) {
        self.tls_reloads
            .get_or_create(&ReloadLabels {
                material: material.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Whether the ADS stream is open.
    pub(crate) fn xds_connected(&self, open: bool) {
        self.xds_connected.set(i64::from(open));
    }

    /// Counts an applied xDS response of type `kind`, now at `version`.
    pub(crate) fn xds_update(&self, kind: &'static str, version: &str) {
        self.xds_updates
            .get_or_create(&XdsTypeLabels { r#type: kind })
            .inc();
        let mut current = self.xds_current.lock().expect("xds versions lock");
        if let Some(old) = current.insert(kind, version.to_owned()) {
            self.xds_versions.remove(&XdsVersionLabels {
                r#type: kind,
                version: old,
            });
        }
        self.xds_versions
            .get_or_create(&XdsVersionLabels {
                r#type: kind,
                version: version.to_owned(),
            })
            .set(1);
    }

    /// Counts a refused xDS response of type `kind`.
    pub(crate) fn xds_nack(&self, kind: &'static str) {
        self.xds_nacks
            .get_or_create(&XdsTypeLabels { r#type: kind })
            .inc();
    }

    /// Counts a reload of the config (`applied`, `unchanged`, `invalid`).
    pub(crate) fn config_reloaded(&self, outcome: &'static str) {
        self.config_reloads
            .get_or_create(&ConfigReloadLabels { outcome })
            .inc();
    }

    /// Counts the outcomes of one fan-out or mirror call; a mirror also
    /// gets a log line (its finalizer): debug when every destination was
    /// OK, warn otherwise.
    pub(crate) fn fanout_report(&self, report: &sluice_layers::fanout::Report) {
        let route = report.route.as_deref().unwrap_or("").to_owned();
        if !report.mirror {
            // One lookup per distinct outcome (usually one: all ok).
            let mut counts: Vec<(&'static str, u64)> = Vec::with_capacity(2);
            for (_, outcome) in &report.destinations {
                let label = outcome.as_str();
                match counts.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((label, 1)),
                }
            }
            for (outcome, n) in counts {
                self.fanout_outcomes
                    .get_or_create(&FanoutLabels {
                        route: route.clone(),
                        outcome,
                    })
                    .inc_by(n);
            }
            return;
        }
        for (destination, outcome) in &report.destinations {
            self.mirror_outcomes
                .get_or_create(&MirrorLabels {
                    route: route.clone(),
                    destination: destination.to_string(),
                    outcome: outcome.as_str(),
                })
                .inc();
        }
        let outcomes: Vec<String> = report
            .destinations
            .iter()
            .map(|(d, o)| match o {
                sluice_layers::fanout::Outcome::Failed { code, message } => {
                    format!("{d}={} ({}: {message})", o.as_str(), code.name())
                }
                _ => format!("{d}={}", o.as_str()),
            })
            .collect();
        let outcomes = outcomes.join(", ");
        if report.destinations.iter().all(|(_, o)| o.as_str() == "ok") {
            tracing::debug!(route = %route, %outcomes, "mirrored call ended");
        } else {
            tracing::warn!(route = %route, %outcomes, "mirrored call ended with a destination not ok");
        }
    }

    pub(crate) fn refused(&self, reason: RefusalReason) {
        self.refusals.refused(reason);
    }

    /// The exposition, with live gauges read at scrape time (the drain's
    /// phase from the drain handle itself): OpenMetrics when asked for,
    /// else the Prometheus text format 0.0.4.
    pub(crate) fn encode(&self, counters: &Counters, drain: &Watch, openmetrics: bool) -> String {
        let drain_state = if drain.is_expired() {
            2
        } else {
            i64::from(!drain.is_ready())
        };
        self.drain_state.set(drain_state);
        let stats = counters.snapshot();
        self.downstream_connections
            .set(gauge(stats.downstream_connections));
        self.upstream_connections
            .set(gauge(stats.upstream_connections));
        self.calls_in_flight.set(gauge(stats.calls_in_flight));
        self.retry_buffer_bytes.set(gauge(stats.retry_buffer_bytes));
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        if openmetrics { out } else { to_text_004(&out) }
    }
}

/// A new metric, registered under `name`; the handle shares its value.
fn register<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
