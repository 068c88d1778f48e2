//! Groups made from outside the config: an xDS cluster's endpoints, one
//! group per priority. Rebuilt when the control plane sends a new
//! assignment, keeping the endpoints (pools, latency) that stay.

use std::{sync::Arc, time::Duration};

use http::HeaderName;

use super::{
    endpoint::{Endpoint, Settings},
    group::Group,
};
use crate::{
    config::{DEFAULT_DEST_HOST_KEY, EndpointConfig, HostPort, Strategy, UpstreamConfig},
    stats::Counters,
    tls::TlsError,
};

/// How a cluster picks among its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// In proportion to their weights.
    Weighted,
    /// Power of two choices over latency and load (`LEAST_REQUEST`).
    LeastLoaded,
}

/// One endpoint of an assignment.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Member {
    pub(crate) address: HostPort,
    pub(crate) weight: u32,
}

/// A cluster's groups, by priority (lowest first).
#[derive(Debug, Default)]
pub(crate) struct ClusterGroups {
    pub(crate) priorities: Vec<Arc<Group>>,
}

impl ClusterGroups {
    /// The groups for `priorities` (each a list of healthy members), named
    /// `name`, dialled with `upstream`. Endpoints of `previous` at the
    /// same address are kept when `same_settings`; the ones that left are
    /// returned, for the caller to close once calls no longer pick them.
    ///
    /// # Errors
    ///
    /// The TLS material `upstream` names cannot be used.
    pub(crate) fn build(
        name: &str,
        pick: Pick,
        priorities: &[Vec<Member>],
        upstream: UpstreamConfig,
        previous: Option<(&Self, bool)>,
        counters: &Arc<Counters>,
        outlier: Option<&crate::config::OutlierConfig>,
    ) -> Result<(Self, Vec<Arc<Endpoint>>), TlsError> {
        let settings = Settings::new(&format!("xds cluster {name}"), upstream)?;
        let old: Vec<Arc<Endpoint>> = match previous {
            Some((p, true)) => p
                .priorities
                .iter()
                .flat_map(|g| g.endpoints().iter().cloned().collect::<Vec<_>>())
                .collect(),
            _ => Vec::new(),
        };
        let mut kept: Vec<Arc<Endpoint>> = Vec::new();
        let mut groups = Vec::with_capacity(priorities.len());
        for members in priorities {
            let mut endpoints = Vec::with_capacity(members.len());
            for m in members {
                let endpoint = match old
                    .iter()
                    .find(|e| e.address() == &m.address && e.weight == m.weight)
                {
                    Some(e) => e.clone(),
                    None => {
                        let mut e = Endpoint::configured(
                            &settings,
                            counters,
                            &EndpointConfig::Address(m.address.clone()),
                            None,
                        );
                        e.weight = m.weight.max(1);
                        Arc::new(e)
                    }
                };
                kept.push(endpoint.clone());
                endpoints.push(endpoint);
            }
            let strategy = match pick {
                Pick::Weighted => Strategy::Random,
                Pick::LeastLoaded => Strategy::LeastLoaded,
            };
            let group = Group::new(
                name,
                endpoints,
                Box::new([strategy]),
                HeaderName::from_static(DEFAULT_DEST_HOST_KEY),
                Duration::ZERO,
            );
            let group = Arc::new(
                match pick {
                    Pick::Weighted => group.weighted(),
                    Pick::LeastLoaded => group,
                }
                .with_outlier(outlier),
            );
            super::outlier::Detector::watch(&group);
            groups.push(group);
        }
        let gone = match previous {
            Some((p, _)) => p
                .priorities
                .iter()
                .flat_map(|g| g.endpoints().iter().cloned().collect::<Vec<_>>())
                .filter(|e| !kept.iter().any(|k| Arc::ptr_eq(k, e)))
                .collect(),
            None => Vec::new(),
        };
        Ok((Self { priorities: groups }, gone))
    }

    /// The group calls go to now: the lowest priority with an endpoint
    /// that is not failing, else the lowest with any endpoint (gRPC's
    /// priority failover); and the next priority with endpoints after it,
    /// for a call whose dial fails.
    pub(crate) fn current(&self) -> Option<(&Arc<Group>, Option<&Arc<Group>>)> {
        let at = self
            .priorities
            .iter()
            .position(|g| g.endpoints().iter().any(|e| !e.unusable()))
            .or_else(|| self.priorities.iter().position(|g| g.len() > 0))?;
        let next = self.priorities[at + 1..].iter().find(|g| g.len() > 0);
        Some((&self.priorities[at], next))
    }

    /// Closes every endpoint's connections once their calls are done.
    pub(crate) fn close(&self) {
        for g in &self.priorities {
            g.close();
        }
    }
}
