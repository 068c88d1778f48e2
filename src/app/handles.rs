//! The handles the app gives the admin server and the metrics: functions
//! over the groups and the tunnel tracker, so that neither reaches a
//! `Group`, a `Pool` or the `Tracker` itself.

use std::sync::Arc;

use crate::{
    Config, admin,
    balance::{Group, Groups},
    telemetry::{
        collect::{AgentFn, CountFn, GroupView, TunnelView},
        metrics::Views,
    },
    tunnel::tracker::Tracker,
};

/// The admin server's handles: readiness probes as functions of the
/// groups, which the admin port never sees.
pub(super) fn admin_state(
    config: &Config,
    groups: &Arc<Groups>,
    agents: Option<Arc<Group>>,
    mut state: admin::State,
) -> admin::State {
    if config.admin.ready_requires_upstream {
        // Looked up at each probe: a config reload may change `[upstream]`.
        let groups = groups.clone();
        state.upstream_reachable = Some(Arc::new(move || {
            let pool = groups.default_pool();
            Box::pin(async move {
                match pool {
                    Some(pool) => pool.reachable().await,
                    None => false,
                }
            })
        }));
    }
    state.agents =
        agents.map(|g| Arc::new(move || g.len()) as Arc<dyn Fn() -> usize + Send + Sync>);
    state
}

/// What the metrics read at scrape time: the groups, an agent's tunnel
/// pool, a hub's agents (the tunnel families exist only on those roles).
pub(super) fn views(
    groups: &Arc<Groups>,
    agents: Option<&Arc<Group>>,
    tracker: Option<&Arc<Tracker>>,
) -> Views {
    let all = groups.clone();
    let groups_fn = Arc::new(move || {
        all.names()
            .into_iter()
            .filter_map(|name| all.group(&name))
            .map(|g| {
                let endpoints = g.endpoints();
                let usable = endpoints.iter().filter(|e| !e.unusable()).count();
                GroupView {
                    group: g.name().to_string(),
                    usable,
                    unusable: endpoints.len() - usable,
                    in_flight: endpoints.iter().map(|e| e.pool().in_flight()).sum(),
                }
            })
            .collect()
    });
    Views {
        agent: tracker.cloned().map(|t| {
            Arc::new(move || {
                let s = t.snapshot();
                TunnelView {
                    desired: s.desired,
                    claimed: s.claimed,
                    inflight: s.inflight,
                    failed_dials: s.failed_dials,
                    hubs: t.claimed_hubs(),
                }
            }) as AgentFn
        }),
        hub: agents
            .cloned()
            .map(|g| Arc::new(move || g.len()) as CountFn),
        groups: Some(groups_fn),
    }
}
