//! The view calls read, rebuilt from the cache after every change: each
//! Listener with its routes, each Cluster with its groups (rebuilt only
//! when its resource or assignment changed, keeping the endpoints that
//! stay), and the lines `/config` shows.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicUsize},
};

use super::{Built, Client, ENDPOINT_LINGER};
use crate::{
    balance::{ClusterGroups, Endpoint, Member, Pick},
    xds::{
        cache::Entry,
        resources::{Assignment, ClusterRes, Lb, RouteSource},
        view::{ClusterView, ListenerView, Lookup, View},
    },
};

impl Client {
    /// Rebuilds the view calls read, and wakes the calls waiting for one.
    pub(super) fn publish(&mut self) {
        let mut view = View::default();
        let used = self
            .shared
            .authorities
            .lock()
            .expect("xds authorities lock")
            .clone();
        for name in &self.cache.roots {
            let lookup = match self.cache.listeners.get(name) {
                None | Some(Entry::Waiting(_)) => Lookup::Waiting,
                Some(Entry::Missing) => {
                    Lookup::Missing(format!("xDS Listener {name:?} does not exist"))
                }
                Some(Entry::Ready(l)) => match &l.routes {
                    RouteSource::Inline(table) => Lookup::Ready(Arc::new(ListenerView {
                        table: table.clone(),
                        max_stream_duration: l.max_stream_duration,
                        used: used.get(name).cloned(),
                    })),
                    RouteSource::Rds(r) => match self.cache.routes.get(r) {
                        Some(Entry::Ready(table)) => Lookup::Ready(Arc::new(ListenerView {
                            table: table.clone(),
                            max_stream_duration: l.max_stream_duration,
                            used: used.get(name).cloned(),
                        })),
                        Some(Entry::Missing) => Lookup::Missing(format!(
                            "xDS RouteConfiguration {r:?} (of Listener {name:?}) does not exist"
                        )),
                        _ => Lookup::Waiting,
                    },
                },
            };
            view.listeners.insert(name.clone(), lookup);
        }
        let mut gone: Vec<Arc<Endpoint>> = Vec::new();
        let mut built = HashMap::new();
        let clusters: Vec<(String, Entry<Arc<ClusterRes>>)> = self
            .cache
            .clusters
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (name, entry) in &clusters {
            let lookup = match entry {
                Entry::Waiting(_) => Lookup::Waiting,
                Entry::Missing => Lookup::Missing(format!("xDS Cluster {name:?} does not exist")),
                Entry::Ready(res) => match self.cache.endpoints.get(&res.eds_name).cloned() {
                    Some(Entry::Ready(assignment)) => {
                        match self.cluster(name, res, &assignment, &mut gone) {
                            Ok(b) => {
                                let view = b.view.clone();
                                built.insert(name.clone(), b);
                                Lookup::Ready(view)
                            }
                            Err(e) => Lookup::Missing(format!("xDS Cluster {name:?}: {e}")),
                        }
                    }
                    Some(Entry::Missing) => Lookup::Missing(format!(
                        "xDS ClusterLoadAssignment {:?} (of Cluster {name:?}) does not exist",
                        res.eds_name
                    )),
                    _ => Lookup::Waiting,
                },
            };
            view.clusters.insert(name.clone(), lookup);
        }
        // Clusters no longer in use close their connections.
        for (name, old) in self.built.drain() {
            if !built.contains_key(&name) {
                gone.extend(
                    old.view
                        .groups
                        .priorities
                        .iter()
                        .flat_map(|g| g.endpoints().iter().cloned().collect::<Vec<_>>()),
                );
            }
        }
        self.built = built;
        if !gone.is_empty() {
            tokio::spawn(async move {
                tokio::time::sleep(ENDPOINT_LINGER).await;
                for e in gone {
                    e.pool().close();
                }
            });
        }
        self.status_lines();
        self.shared.view.store(Arc::new(view));
        self.shared.changed.send_modify(|g| *g += 1);
    }

    /// Cluster `name`'s groups, reusing what was built for it before.
    fn cluster(
        &mut self,
        name: &str,
        res: &Arc<ClusterRes>,
        assignment: &Arc<Assignment>,
        gone: &mut Vec<Arc<Endpoint>>,
    ) -> Result<Built, crate::tls::TlsError> {
        let previous = self.built.get(name);
        if let Some(p) = previous
            && p.res == *res
            && p.assignment == *assignment
        {
            return Ok(Built {
                res: res.clone(),
                assignment: assignment.clone(),
                view: p.view.clone(),
            });
        }
        let mut upstream = self.template.clone();
        upstream.tls.clone_from(&res.tls);
        let priorities: Vec<Vec<Member>> = assignment
            .priorities
            .iter()
            .map(|p| {
                p.iter()
                    .filter(|e| e.healthy)
                    .map(|e| Member {
                        address: e.address.clone(),
                        weight: e.weight,
                    })
                    .collect()
            })
            .collect();
        let pick = match res.lb {
            Lb::RoundRobin => Pick::Weighted,
            Lb::LeastRequest => Pick::LeastLoaded,
        };
        let same_tls = previous.is_some_and(|p| p.res.tls == res.tls);
        let (groups, left) = ClusterGroups::build(
            &format!("xds:{name}"),
            pick,
            &priorities,
            upstream,
            previous.map(|p| (&*p.view.groups, same_tls)),
            &self.counters,
            res.outlier.as_ref(),
        )?;
        gone.extend(left);
        let in_flight = previous.map_or_else(
            || Arc::new(AtomicUsize::new(0)),
            |p| p.view.in_flight.clone(),
        );
        Ok(Built {
            res: res.clone(),
            assignment: assignment.clone(),
            view: Arc::new(ClusterView {
                target: Arc::from(format!("xds:{name}")),
                groups: Arc::new(groups),
                max_requests: usize::try_from(res.max_requests).unwrap_or(usize::MAX),
                in_flight,
            }),
        })
    }

    /// The lines `/config` shows.
    fn status_lines(&self) {
        let mut lines = Vec::new();
        let mut names: Vec<_> = self.cache.listeners.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (name, e) in names {
            lines.push(format!("  listener {name}: {}", state(e)));
        }
        let mut names: Vec<_> = self.cache.routes.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (name, e) in names {
            lines.push(format!("  route {name}: {}", state(e)));
        }
        let mut names: Vec<_> = self.built.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (name, b) in names {
            let sizes: Vec<String> = b
                .view
                .groups
                .priorities
                .iter()
                .map(|g| g.len().to_string())
                .collect();
            lines.push(format!(
                "  cluster {name}: {:?}, endpoints by priority [{}], max_requests {}",
                b.res.lb,
                sizes.join(", "),
                b.res.max_requests
            ));
        }
        let mut status = self.shared.status.lock().expect("xds status lock");
        for (i, t) in self.cache.types.iter().enumerate() {
            status.versions[i].clone_from(&t.version);
        }
        status.lines = lines;
    }
}

fn state<T>(e: &Entry<T>) -> &'static str {
    match e {
        Entry::Waiting(_) => "waiting",
        Entry::Ready(_) => "ready",
        Entry::Missing => "does not exist",
    }
}
