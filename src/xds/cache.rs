//! What the control plane said: every subscribed resource of the four
//! types with its state (waiting, there, known not to exist), the
//! versions and nonces to ACK with, and the subscriptions that follow
//! from the resources (a Listener's RouteConfiguration, a route's
//! Clusters, a Cluster's ClusterLoadAssignment).

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use tokio::time::Instant;

use super::resources::{
    self, Assignment, ClusterRes, Decoded, ListenerRes, RouteAction, RouteSource, RouteTable,
};

/// One subscribed resource.
#[derive(Clone, Debug)]
pub(crate) enum Entry<T> {
    /// Asked for (since then, once the request went out), not seen yet.
    Waiting(Option<Instant>),
    /// The last good version.
    Ready(T),
    /// The control plane said it does not exist, or did not send it
    /// within the does-not-exist timer.
    Missing,
}

impl<T> Entry<T> {
    pub(crate) fn ready(&self) -> Option<&T> {
        match self {
            Self::Ready(t) => Some(t),
            _ => None,
        }
    }
}

/// Per type: the version last accepted and the nonce last seen.
#[derive(Clone, Debug, Default)]
pub(crate) struct TypeState {
    pub(crate) version: String,
    pub(crate) nonce: String,
    /// The names last sent in a request of this type.
    pub(crate) sent: BTreeSet<String>,
}

/// Every resource and what to ask for.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) listeners: HashMap<String, Entry<std::sync::Arc<ListenerRes>>>,
    pub(crate) routes: HashMap<String, Entry<std::sync::Arc<RouteTable>>>,
    pub(crate) clusters: HashMap<String, Entry<std::sync::Arc<ClusterRes>>>,
    pub(crate) endpoints: HashMap<String, Entry<std::sync::Arc<Assignment>>>,
    pub(crate) types: [TypeState; 4],
    /// The Listener names asked for by the routing side (the configured
    /// one, or the authorities of calls).
    pub(crate) roots: BTreeSet<String>,
}

/// What one response did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Names of resources that changed (added, updated, removed).
    pub(crate) changed: Vec<String>,
    /// Why resources were refused; a NACK when not empty.
    pub(crate) errors: Vec<String>,
}

fn index(type_url: &str) -> usize {
    resources::TYPES
        .iter()
        .position(|t| *t == type_url)
        .unwrap_or(0)
}

impl Cache {
    pub(crate) fn state(&self, type_url: &str) -> &TypeState {
        &self.types[index(type_url)]
    }

    pub(crate) fn state_mut(&mut self, type_url: &str) -> &mut TypeState {
        &mut self.types[index(type_url)]
    }

    /// Applies the resources of one response of `type_url`: valid ones
    /// replace what was there; invalid ones keep their last good version
    /// (gRFC A46) and are reported. For Listeners and Clusters (whose
    /// responses carry every subscribed resource) a name received before
    /// and now absent no longer exists.
    pub(crate) fn apply(
        &mut self,
        type_url: &str,
        decoded: Vec<Result<(String, Decoded), (Option<String>, String)>>,
    ) -> Applied {
        let mut applied = Applied::default();
        let mut seen = BTreeSet::new();
        for result in decoded {
            match result {
                Ok((name, resource)) => {
                    seen.insert(name.clone());
                    let changed = match resource {
                        Decoded::Listener(r) => set(&mut self.listeners, name.clone(), r),
                        Decoded::Route(r) => set(&mut self.routes, name.clone(), r),
                        Decoded::Cluster(r) => set(&mut self.clusters, name.clone(), r),
                        Decoded::Endpoint(r) => set(&mut self.endpoints, name.clone(), r),
                    };
                    if changed {
                        applied.changed.push(name);
                    }
                }
                Err((name, why)) => {
                    if let Some(name) = &name {
                        seen.insert(name.clone());
                    }
                    applied.errors.push(match name {
                        Some(n) => format!("{n}: {why}"),
                        None => why,
                    });
                }
            }
        }
        let absent_means_gone = type_url == resources::LISTENER || type_url == resources::CLUSTER;
        if absent_means_gone {
            if type_url == resources::LISTENER {
                mark_gone(&mut self.listeners, &seen, &mut applied);
            } else {
                mark_gone(&mut self.clusters, &seen, &mut applied);
            }
        }
        applied
    }

    /// The names to ask for, per type, as the resources in hand imply:
    /// the roots, their RouteConfigurations, the clusters their routes
    /// name, and those clusters' assignments. Entries no longer wanted are
    /// dropped; new ones start waiting.
    pub(crate) fn resubscribe(&mut self) -> [BTreeSet<String>; 4] {
        let listeners = self.roots.clone();
        let mut routes = BTreeSet::new();
        let mut clusters = BTreeSet::new();
        let mut tables: Vec<std::sync::Arc<RouteTable>> = Vec::new();
        for name in &listeners {
            if let Some(Entry::Ready(l)) = self.listeners.get(name) {
                match &l.routes {
                    RouteSource::Rds(r) => {
                        routes.insert(r.clone());
                        if let Some(Entry::Ready(t)) = self.routes.get(r) {
                            tables.push(t.clone());
                        }
                    }
                    RouteSource::Inline(t) => tables.push(t.clone()),
                }
            }
        }
        for table in &tables {
            for vh in &table.virtual_hosts {
                for r in &vh.routes {
                    if let RouteAction::Clusters { clusters: cs, .. } = &r.action {
                        clusters.extend(cs.iter().map(|(c, _)| c.to_string()));
                    }
                }
            }
        }
        let endpoints: BTreeSet<String> = clusters
            .iter()
            .filter_map(|c| self.clusters.get(c).and_then(Entry::ready))
            .map(|c| c.eds_name.clone())
            .collect();
        keep(&mut self.listeners, &listeners);
        keep(&mut self.routes, &routes);
        keep(&mut self.clusters, &clusters);
        keep(&mut self.endpoints, &endpoints);
        [listeners, routes, clusters, endpoints]
    }

    /// Starts the does-not-exist timer of every entry of `type_url` that
    /// waits without one: its request just went out.
    pub(crate) fn requested(&mut self, type_url: &str, now: Instant) {
        fn start<T>(map: &mut HashMap<String, Entry<T>>, now: Instant) {
            for entry in map.values_mut() {
                if let Entry::Waiting(since @ None) = entry {
                    *since = Some(now);
                }
            }
        }
        match type_url {
            resources::LISTENER => start(&mut self.listeners, now),
            resources::ROUTE => start(&mut self.routes, now),
            resources::CLUSTER => start(&mut self.clusters, now),
            _ => start(&mut self.endpoints, now),
        }
    }

    /// The stream went away: timers stop until the next request (gRFC
    /// A27), and what was received is kept.
    pub(crate) fn disconnected(&mut self) {
        fn stop<T>(map: &mut HashMap<String, Entry<T>>) {
            for entry in map.values_mut() {
                if let Entry::Waiting(since) = entry {
                    *since = None;
                }
            }
        }
        stop(&mut self.listeners);
        stop(&mut self.routes);
        stop(&mut self.clusters);
        stop(&mut self.endpoints);
        for t in &mut self.types {
            t.nonce.clear();
            t.sent.clear();
        }
    }

    /// Marks entries that waited past `timeout` as missing; says whether
    /// any did.
    pub(crate) fn expire(&mut self, now: Instant, timeout: Duration) -> bool {
        fn expire<T>(map: &mut HashMap<String, Entry<T>>, now: Instant, timeout: Duration) -> bool {
            let mut any = false;
            for entry in map.values_mut() {
                if let Entry::Waiting(Some(since)) = entry
                    && now.duration_since(*since) >= timeout
                {
                    *entry = Entry::Missing;
                    any = true;
                }
            }
            any
        }
        let a = expire(&mut self.listeners, now, timeout);
        let b = expire(&mut self.routes, now, timeout);
        let c = expire(&mut self.clusters, now, timeout);
        let d = expire(&mut self.endpoints, now, timeout);
        a || b || c || d
    }
}

/// Marks the entries of `map` that a full response did not carry as no
/// longer existing: only those received before (gRFC A27). One asked for
/// and never seen may be newer than the response (a stale response to
/// the previous subscription); the does-not-exist timer decides it.
fn mark_gone<T>(
    map: &mut HashMap<String, Entry<T>>,
    seen: &BTreeSet<String>,
    applied: &mut Applied,
) {
    for (name, entry) in map.iter_mut() {
        if !seen.contains(name) && matches!(entry, Entry::Ready(_)) {
            *entry = Entry::Missing;
            applied.changed.push(name.clone());
        }
    }
}

/// Stores `value` under `name`; says whether anything changed.
fn set<T: PartialEq>(
    map: &mut HashMap<String, Entry<std::sync::Arc<T>>>,
    name: String,
    value: std::sync::Arc<T>,
) -> bool {
    match map.get(&name) {
        Some(Entry::Ready(old)) if **old == *value => false,
        // A resource nobody asked for is not kept.
        None => false,
        _ => {
            map.insert(name, Entry::Ready(value));
            true
        }
    }
}

/// Keeps the entries named in `wanted`, adding waiting ones.
fn keep<T>(map: &mut HashMap<String, Entry<T>>, wanted: &BTreeSet<String>) {
    map.retain(|name, _| wanted.contains(name));
    for name in wanted {
        map.entry(name.clone()).or_insert(Entry::Waiting(None));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::xds::resources::{RouteRes, VirtualHostRes};

    fn table(clusters: &[&str]) -> Arc<RouteTable> {
        Arc::new(RouteTable {
            virtual_hosts: vec![VirtualHostRes {
                domains: vec!["*".to_owned()],
                routes: clusters
                    .iter()
                    .map(|c| RouteRes {
                        path: resources::PathMatch::Prefix(String::new()),
                        case_sensitive: true,
                        headers: Vec::new(),
                        fraction: None,
                        action: RouteAction::Clusters {
                            clusters: vec![(Arc::from(*c), 1)],
                            max_stream_duration: None,
                            grpc_timeout_header_max: None,
                            retry: None,
                        },
                    })
                    .collect(),
            }],
        })
    }

    #[test]
    fn subscriptions_follow_the_resources_and_absent_listeners_are_gone() {
        let mut cache = Cache::default();
        cache.roots.insert("svc".to_owned());
        let [l, r, c, e] = cache.resubscribe();
        assert_eq!(l.len(), 1);
        assert!(r.is_empty() && c.is_empty() && e.is_empty());
        let applied = cache.apply(
            resources::LISTENER,
            vec![Ok((
                "svc".to_owned(),
                Decoded::Listener(Arc::new(ListenerRes {
                    routes: RouteSource::Inline(table(&["a", "b"])),
                    max_stream_duration: None,
                })),
            ))],
        );
        assert_eq!(applied.changed, ["svc"]);
        let [_, _, c, _] = cache.resubscribe();
        assert_eq!(c.into_iter().collect::<Vec<_>>(), ["a", "b"]);
        // A response without the listener: it no longer exists.
        let applied = cache.apply(resources::LISTENER, Vec::new());
        assert_eq!(applied.changed, ["svc"]);
        assert!(matches!(cache.listeners["svc"], Entry::Missing));
        let [_, _, c, _] = cache.resubscribe();
        assert!(c.is_empty(), "its clusters are dropped");
    }

    #[test]
    fn an_invalid_resource_keeps_its_last_good_version_and_is_reported() {
        let mut cache = Cache::default();
        cache.roots.insert("svc".to_owned());
        cache.resubscribe();
        let good = Arc::new(ListenerRes {
            routes: RouteSource::Rds("r".to_owned()),
            max_stream_duration: None,
        });
        cache.apply(
            resources::LISTENER,
            vec![Ok(("svc".to_owned(), Decoded::Listener(good.clone())))],
        );
        let applied = cache.apply(
            resources::LISTENER,
            vec![Err((Some("svc".to_owned()), "bad".to_owned()))],
        );
        assert_eq!(applied.errors, ["svc: bad"]);
        assert!(applied.changed.is_empty());
        assert!(matches!(&cache.listeners["svc"], Entry::Ready(l) if *l == good));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resource_not_sent_within_the_timer_does_not_exist() {
        let mut cache = Cache::default();
        cache.roots.insert("svc".to_owned());
        cache.resubscribe();
        assert!(
            !cache.expire(Instant::now(), Duration::from_secs(15)),
            "no request yet"
        );
        cache.requested(resources::LISTENER, Instant::now());
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(cache.expire(Instant::now(), Duration::from_secs(15)));
        assert!(matches!(cache.listeners["svc"], Entry::Missing));
    }
}
