//! Every group, as one snapshot that each call reads once (an atomic
//! load, no lock) and that can be replaced whole while calls run; calls
//! in flight keep the snapshot they started with.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::HeaderName;

use super::{
    endpoint::{Endpoint, Settings},
    group::Group,
    health::check_health,
    resolve::{reconcile, resolve},
};
use crate::{
    config::{
        Config, DEFAULT_DEST_HOST_KEY, DEFAULT_GROUP, EndpointConfig, GroupConfig, Strategy,
        UpstreamConfig,
    },
    stats::Counters,
    tls::{TlsError, reload::Reload},
    upstream::Pool,
};

/// The groups by name, at one moment.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    by_name: HashMap<Arc<str>, Arc<Group>>,
}

impl Snapshot {
    /// Group `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Group>> {
        self.by_name.get(name)
    }
}

/// Every group: the snapshot in force, and per group what the config
/// said, the tasks that keep its endpoints current (DNS, health checks)
/// and its TLS material.
#[derive(Debug)]
pub(crate) struct Groups {
    current: ArcSwap<Snapshot>,
    /// Changed only by [`Groups::apply`] (under this lock) and
    /// [`Groups::close`].
    kept: Mutex<HashMap<String, Kept>>,
    counters: Arc<Counters>,
    /// The group tunnel agents join, if this is a hub: the hub holds it,
    /// so a reload never replaces it.
    agents: Option<String>,
}

/// What a group was made from, what runs for it, and its TLS material.
#[derive(Debug)]
struct Kept {
    spec: Spec,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    materials: Vec<Arc<dyn Reload>>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One group as the config defines it: what a reload compares.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    /// Its config key, for errors and TLS material names.
    key: String,
    /// The `[upstreams.NAME]` entry; none for `[upstream]` (group
    /// `default`) and for a hub's agents' group not configured.
    group: Option<GroupConfig>,
    /// The settings its endpoints are dialled with.
    upstream: UpstreamConfig,
    /// How long a call waits for an endpoint (a hub's agents).
    wait: Duration,
}

/// What [`Groups::apply`] changed, by group name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupChanges {
    pub(crate) added: Vec<String>,
    pub(crate) changed: Vec<String>,
    pub(crate) removed: Vec<String>,
    /// Endpoints that left (their connections close once their calls end).
    pub(crate) endpoints_gone: usize,
}

impl Groups {
    /// Every group of `config`, with its TLS material read.
    ///
    /// # Errors
    ///
    /// A group's TLS files cannot be used.
    pub(crate) fn from_config(config: &Config, counters: &Arc<Counters>) -> Result<Self, TlsError> {
        let groups = Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            kept: Mutex::new(HashMap::new()),
            counters: counters.clone(),
            agents: config.tunnel.hub.as_ref().map(|h| h.group.clone()),
        };
        groups.apply(config, Duration::ZERO)?;
        Ok(groups)
    }

    /// Makes the groups what `config` says, for calls that start from now
    /// on: a group whose definition did not change is kept as it is; a
    /// changed one is made again, keeping the endpoints (their connections
    /// and latency) made from the same entry with the same settings; the
    /// endpoints and groups that left close their connections once their
    /// calls are done, `linger` from now: calls admitted before the reload
    /// may still pick one of them until then (a call picks its endpoint
    /// at most a peek's wait after it arrived). A hub's agents' group is
    /// always kept (the hub holds it).
    ///
    /// # Errors
    ///
    /// A group's TLS files cannot be used; then nothing changed.
    pub(crate) fn apply(
        &self,
        config: &Config,
        linger: Duration,
    ) -> Result<GroupChanges, TlsError> {
        let mut kept = self.kept.lock().expect("groups lock");
        let old = self.current.load_full();
        // Everything that can fail, first.
        let mut fresh = Vec::new();
        for (name, spec) in specs(config) {
            let same = kept.get(&name).is_some_and(|k| k.spec == spec);
            let agents = self.agents.as_deref() == Some(name.as_str());
            if (same || agents) && old.get(&name).is_some() {
                continue;
            }
            let settings = Settings::new(&spec.key, spec.upstream.clone())?;
            fresh.push((name, spec, settings));
        }
        let wanted: Vec<String> = specs(config).into_iter().map(|(n, _)| n).collect();
        let mut changes = GroupChanges::default();
        let mut by_name: HashMap<Arc<str>, Arc<Group>> = old
            .by_name
            .iter()
            .filter(|(name, _)| wanted.iter().any(|w| w.as_str() == &***name))
            .map(|(name, group)| (name.clone(), group.clone()))
            .collect();
        let mut gone: Vec<Arc<Endpoint>> = Vec::new();
        for (name, spec, settings) in fresh {
            let previous = old.get(&name);
            // Endpoints carry over only with the settings they were
            // dialled with.
            let carried: Vec<Arc<Endpoint>> = match (previous, kept.get(&name)) {
                (Some(group), Some(k)) if k.spec.upstream == spec.upstream => {
                    group.endpoints().to_vec()
                }
                _ => Vec::new(),
            };
            let entries = spec.entries();
            let wanted_endpoints = carried_addresses(&entries, &carried);
            let (endpoints, left) = reconcile(&carried, &wanted_endpoints, |e, resolved| {
                Arc::new(Endpoint::configured(&settings, &self.counters, e, resolved))
            });
            if let Some(group) = previous {
                gone.extend(
                    group
                        .endpoints()
                        .iter()
                        .filter(|e| !endpoints.iter().any(|n| Arc::ptr_eq(n, e)))
                        .cloned(),
                );
                changes.changed.push(name.clone());
            } else {
                changes.added.push(name.clone());
            }
            drop(left);
            let group = Arc::new(
                Group::new(
                    &name,
                    endpoints,
                    spec.strategies(),
                    spec.dest_host_key(),
                    spec.wait,
                )
                .with_max_requests(spec.group.as_ref().and_then(|g| g.max_requests))
                .with_resilience(spec.group.as_ref()),
            );
            let tasks = spec.tasks(&group, &settings, &self.counters);
            let materials = settings
                .tls
                .iter()
                .map(|t| t.material() as Arc<dyn Reload>)
                .collect();
            by_name.insert(Arc::from(name.as_str()), group);
            // Replacing the entry aborts the old group's tasks.
            kept.insert(
                name,
                Kept {
                    spec,
                    tasks,
                    materials,
                },
            );
        }
        for (name, group) in &old.by_name {
            if !by_name.contains_key(name) {
                changes.removed.push(name.to_string());
                gone.extend(group.endpoints().iter().cloned());
                kept.remove(&**name);
            }
        }
        self.current.store(Arc::new(Snapshot { by_name }));
        changes.endpoints_gone = gone.len();
        if !gone.is_empty() {
            tokio::spawn(async move {
                tokio::time::sleep(linger).await;
                for endpoint in gone {
                    endpoint.pool().close();
                }
            });
        }
        Ok(changes)
    }

    /// The snapshot in force, for a stack to hold.
    pub(crate) fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Group `name`, shared.
    pub(crate) fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.current.load().get(name).cloned()
    }

    /// The names of the groups, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .current
            .load()
            .by_name
            .keys()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        names
    }

    /// The TLS material of every group now, for the reloader.
    pub(crate) fn tls_materials(&self) -> Vec<Arc<dyn Reload>> {
        self.kept
            .lock()
            .expect("groups lock")
            .values()
            .flat_map(|k| k.materials.iter().cloned())
            .collect()
    }

    /// The first endpoint of the default group (`[upstream]`).
    pub(crate) fn default_pool(&self) -> Option<Pool> {
        let group = self.group(DEFAULT_GROUP)?;
        let endpoints = group.endpoints();
        endpoints.first().map(|e| e.pool().clone())
    }

    /// The addresses of a group's endpoints now.
    pub(crate) fn addresses(&self, name: &str) -> Option<Vec<String>> {
        let group = self.group(name)?;
        Some(
            group
                .endpoints()
                .iter()
                .map(|e| e.address().to_string())
                .collect(),
        )
    }

    /// Stops health checks and resolution, and closes every endpoint's
    /// connections once their calls are done.
    pub(crate) fn close(&self) {
        // Dropping what is kept aborts the tasks.
        self.kept.lock().expect("groups lock").clear();
        for group in self.current.load().by_name.values() {
            group.close();
        }
    }
}

/// Every group `config` defines, by name: `[upstream]` as `default`,
/// each `[upstreams.NAME]`, and a hub's agents' group.
fn specs(config: &Config) -> Vec<(String, Spec)> {
    let mut all = vec![(
        DEFAULT_GROUP.to_owned(),
        Spec {
            key: "upstream".to_owned(),
            group: None,
            upstream: config.upstream.clone(),
            wait: Duration::ZERO,
        },
    )];
    let hub = config.tunnel.hub.as_ref();
    for (name, group) in &config.upstreams {
        all.push((
            name.clone(),
            Spec {
                key: format!("upstreams.{name}"),
                group: Some(group.clone()),
                upstream: config.group_upstream(group),
                wait: hub
                    .filter(|h| &h.group == name)
                    .map_or(Duration::ZERO, |h| h.agent_wait),
            },
        ));
    }
    // The group tunnel agents join exists even with no [upstreams] entry:
    // empty until an agent dials in.
    if let Some(hub) = hub
        && !config.upstreams.contains_key(&hub.group)
    {
        all.push((
            hub.group.clone(),
            Spec {
                key: format!("tunnel.hub.group {}", hub.group),
                group: None,
                upstream: config.upstream.clone(),
                wait: hub.agent_wait,
            },
        ));
    }
    all
}

impl Spec {
    /// Its configured endpoints (`[upstream]`: its one address; a hub's
    /// agents' group: none).
    fn entries(&self) -> Vec<EndpointConfig> {
        match &self.group {
            Some(g) => g.endpoints.clone(),
            None if self.key == "upstream" => {
                vec![EndpointConfig::Address(self.upstream.address.clone())]
            }
            None => Vec::new(),
        }
    }

    fn strategies(&self) -> Box<[Strategy]> {
        match &self.group {
            Some(g) => g.strategy.clone().into_boxed_slice(),
            None if self.key == "upstream" => Box::new([Strategy::LeastLoaded]),
            // A call for an agent that is not there must not reach
            // another agent's network: by name only.
            None => Box::new([Strategy::DestHost]),
        }
    }

    fn dest_host_key(&self) -> HeaderName {
        self.group
            .as_ref()
            .and_then(|g| HeaderName::try_from(g.dest_host_key.to_ascii_lowercase()).ok())
            .unwrap_or_else(|| HeaderName::from_static(DEFAULT_DEST_HOST_KEY))
    }

    /// The tasks that keep `group` current: re-resolution when an
    /// endpoint is a name, health checks when configured.
    fn tasks(
        &self,
        group: &Arc<Group>,
        settings: &Settings,
        counters: &Arc<Counters>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(config) = &self.group else {
            return Vec::new();
        };
        let mut tasks = Vec::new();
        let name = group.name().to_string();
        if config.endpoints.iter().any(|e| {
            e.address().unix_path().is_none() && e.address().host().parse::<IpAddr>().is_err()
        }) {
            tasks.push(tokio::spawn(resolve(
                name,
                group.clone(),
                config.clone(),
                settings.clone(),
                counters.clone(),
            )));
        }
        if let Some(hc) = &config.health_check {
            tasks.push(tokio::spawn(check_health(group.clone(), hc.clone())));
        }
        if group.outlier().is_some() {
            tasks.push(tokio::spawn(super::outlier::Detector::run(group.clone())));
        }
        tasks
    }
}

/// The endpoints `entries` want, each with the address it resolved to
/// when an endpoint of `carried` came from a name entry: a reload keeps
/// what DNS found until the resolver looks again.
fn carried_addresses(
    entries: &[EndpointConfig],
    carried: &[Arc<Endpoint>],
) -> Vec<(EndpointConfig, Option<SocketAddr>)> {
    let mut wanted = Vec::new();
    for e in entries {
        let resolved: Vec<SocketAddr> = carried
            .iter()
            .filter(|c| c.source.as_ref() == Some(e))
            .filter_map(|c| c.address().to_string().parse().ok())
            .filter(|a: &SocketAddr| a.to_string() != e.address().to_string())
            .collect();
        if resolved.is_empty() {
            wanted.push((e.clone(), None));
        } else {
            wanted.extend(resolved.into_iter().map(|a| (e.clone(), Some(a))));
        }
    }
    wanted
}
