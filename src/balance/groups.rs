//! Every group, as one snapshot that each call reads once (an atomic
//! load, no lock) and that can be replaced whole while calls run; calls
//! in flight keep the snapshot they started with.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::HeaderName;

use super::{
    endpoint::{Endpoint, Settings},
    group::Group,
    health::check_health,
    resolve::resolve,
};
use crate::{
    config::{Config, DEFAULT_DEST_HOST_KEY, DEFAULT_GROUP, EndpointConfig, Strategy},
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

/// Every group: the snapshot in force, and the tasks that keep the
/// groups' endpoints current (DNS, health checks).
#[derive(Debug)]
pub(crate) struct Groups {
    current: ArcSwap<Snapshot>,
    /// Health-check and resolver tasks, stopped by [`Groups::close`].
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The groups' TLS material.
    materials: Vec<Arc<dyn Reload>>,
}

impl Groups {
    /// Every group of `config`, with its TLS material read.
    ///
    /// # Errors
    ///
    /// A group's TLS files cannot be used.
    pub(crate) fn from_config(config: &Config, counters: &Arc<Counters>) -> Result<Self, TlsError> {
        let mut by_name = HashMap::new();
        let mut materials: Vec<Arc<dyn Reload>> = Vec::new();
        let default = EndpointConfig::Address(config.upstream.address.clone());
        let settings = Settings::new("upstream", config.upstream.clone())?;
        materials.extend(settings.tls.iter().map(|t| t.material() as Arc<dyn Reload>));
        by_name.insert(
            Arc::from(DEFAULT_GROUP),
            Arc::new(Group::new(
                DEFAULT_GROUP,
                vec![Arc::new(Endpoint::configured(
                    &settings, counters, &default, None,
                ))],
                Box::new([Strategy::LeastLoaded]),
                HeaderName::from_static(DEFAULT_DEST_HOST_KEY),
                Duration::ZERO,
            )),
        );
        let mut tasks = Vec::new();
        for (name, group_config) in &config.upstreams {
            let settings = Settings::new(
                &format!("upstreams.{name}"),
                config.group_upstream(group_config),
            )?;
            materials.extend(settings.tls.iter().map(|t| t.material() as Arc<dyn Reload>));
            let endpoints: Vec<Arc<Endpoint>> = group_config
                .endpoints
                .iter()
                .map(|e| Arc::new(Endpoint::configured(&settings, counters, e, None)))
                .collect();
            let group = Arc::new(Group::new(
                name,
                endpoints,
                group_config.strategy.clone().into_boxed_slice(),
                HeaderName::try_from(group_config.dest_host_key.to_ascii_lowercase())
                    .unwrap_or_else(|_| HeaderName::from_static(DEFAULT_DEST_HOST_KEY)),
                agent_wait(config, name),
            ));
            if group_config.endpoints.iter().any(|e| {
                e.address().unix_path().is_none() && e.address().host().parse::<IpAddr>().is_err()
            }) {
                tasks.push(tokio::spawn(resolve(
                    name.clone(),
                    group.clone(),
                    group_config.clone(),
                    settings.clone(),
                    counters.clone(),
                )));
            }
            if let Some(hc) = &group_config.health_check {
                tasks.push(tokio::spawn(check_health(group.clone(), hc.clone())));
            }
            by_name.insert(Arc::from(name.as_str()), group);
        }
        // The group tunnel agents join exists even with no [upstreams]
        // entry: empty until an agent dials in.
        if let Some(hub) = &config.tunnel.hub
            && !by_name.contains_key(hub.group.as_str())
        {
            by_name.insert(
                Arc::from(hub.group.as_str()),
                Arc::new(Group::new(
                    &hub.group,
                    Vec::new(),
                    // A call for an agent that is not there must not reach
                    // another agent's network: by name only.
                    Box::new([Strategy::DestHost]),
                    HeaderName::from_static(DEFAULT_DEST_HOST_KEY),
                    hub.agent_wait,
                )),
            );
        }
        Ok(Self {
            current: ArcSwap::from_pointee(Snapshot { by_name }),
            tasks: Mutex::new(tasks),
            materials,
        })
    }

    /// The snapshot in force: what a call reads once, at its start.
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
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

    /// The TLS material of every group, for the reloader.
    pub(crate) fn tls_materials(&self) -> &[Arc<dyn Reload>] {
        &self.materials
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
    /// connections once idle.
    pub(crate) fn close(&self) {
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        for group in self.current.load().by_name.values() {
            group.close();
        }
    }
}

/// How long calls of group `name` wait for an endpoint: a hub's agent
/// wait for its agents' group, zero for every other.
fn agent_wait(config: &Config, name: &str) -> Duration {
    config
        .tunnel
        .hub
        .as_ref()
        .filter(|h| h.group == name)
        .map_or(Duration::ZERO, |h| h.agent_wait)
}
