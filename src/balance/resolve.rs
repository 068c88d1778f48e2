//! Endpoints given by name, resolved again every `resolve_interval`: each
//! address is an endpoint of its own; an address that appears gets a new
//! pool, one that leaves has its pool closed once idle, one that stays
//! keeps its pool (connections and latency).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tracing::{debug, info, warn};

use super::{
    endpoint::{Endpoint, Settings},
    group::Group,
};
use crate::{
    config::{EndpointConfig, GroupConfig, HostPort},
    stats::Counters,
};

/// Resolves a group's named endpoints every `resolve_interval` and swaps in
/// the new endpoint list.
pub(super) async fn resolve(
    name: String,
    group: Arc<Group>,
    group_config: GroupConfig,
    settings: Settings,
    counters: Arc<Counters>,
) {
    let mut tick = tokio::time::interval(group_config.resolve_interval);
    loop {
        tick.tick().await;
        let mut wanted: Vec<(EndpointConfig, Option<SocketAddr>)> = Vec::new();
        for e in &group_config.endpoints {
            let address = e.address();
            if address.unix_path().is_some() || address.host().parse::<IpAddr>().is_ok() {
                wanted.push((e.clone(), None));
                continue;
            }
            match tokio::net::lookup_host((address.host(), address.port())).await {
                Ok(addrs) => wanted.extend(addrs.map(|a| (e.clone(), Some(a)))),
                Err(err) => {
                    // Keep what we had for this name: a DNS hiccup must not
                    // empty the group.
                    warn!(group = %name, %address, error = %err, "cannot resolve an upstream endpoint");
                    let current = group.endpoints();
                    let kept = current.iter().filter(|ep| ep.is(address.host()));
                    wanted
                        .extend(kept.map(|ep| (e.clone(), ep.address().to_string().parse().ok())));
                }
            }
        }
        let current = group.endpoints();
        let (next, gone) = reconcile(&current, &wanted, |e, resolved| {
            Arc::new(Endpoint::configured(&settings, &counters, e, resolved))
        });
        if next.is_empty() {
            continue;
        }
        let changed = !gone.is_empty() || next.len() != current.len();
        group.replace(next);
        for endpoint in gone {
            debug!(group = %name, address = %endpoint.address(), "endpoint left; closing its connections once idle");
            endpoint.pool().close();
        }
        if changed {
            info!(group = %name, endpoints = ?group.endpoints().iter().map(|e| e.address().to_string()).collect::<Vec<_>>(), "upstream group endpoints changed");
        }
    }
}

/// The endpoint list for `wanted` (entries and, for names, the addresses
/// they resolved to), reusing `current` endpoints made from the same entry
/// with the same address; returns it and the endpoints that are no longer wanted.
pub(super) fn reconcile<F>(
    current: &[Arc<Endpoint>],
    wanted: &[(EndpointConfig, Option<SocketAddr>)],
    mut make: F,
) -> (Vec<Arc<Endpoint>>, Vec<Arc<Endpoint>>)
where
    F: FnMut(&EndpointConfig, Option<SocketAddr>) -> Arc<Endpoint>,
{
    let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(wanted.len());
    for (e, resolved) in wanted {
        let address = resolved.map_or_else(
            || e.address().to_string(),
            |a| HostPort::from(a).to_string(),
        );
        if next.iter().any(|n| n.address().to_string() == address) {
            continue;
        }
        match current
            .iter()
            .find(|c| c.address().to_string() == address && c.source.as_ref() == Some(e))
        {
            Some(same) => next.push(same.clone()),
            None => next.push(make(e, *resolved)),
        }
    }
    let gone = current
        .iter()
        .filter(|c| !next.iter().any(|n| Arc::ptr_eq(n, c)))
        .cloned()
        .collect();
    (next, gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    #[tokio::test]
    async fn reconcile_keeps_staying_endpoints_adds_new_ones_and_lets_gone_ones_go() {
        let config = Settings::new("upstream", UpstreamConfig::default()).expect("plaintext");
        let counters = Arc::new(Counters::default());
        let name: EndpointConfig =
            EndpointConfig::Address("svc.local:80".parse().expect("hostport"));
        let at = |ip: &str| -> SocketAddr { format!("{ip}:80").parse().expect("addr") };
        let make = |e: &EndpointConfig, r: Option<SocketAddr>| {
            Arc::new(Endpoint::configured(&config, &counters, e, r))
        };
        let (first, gone) = reconcile(
            &[],
            &[
                (name.clone(), Some(at("10.0.0.1"))),
                (name.clone(), Some(at("10.0.0.2"))),
            ],
            make,
        );
        assert_eq!(first.len(), 2);
        assert!(gone.is_empty());
        // 10.0.0.1 stays, 10.0.0.2 leaves, 10.0.0.3 arrives.
        let (next, gone) = reconcile(
            &first,
            &[
                (name.clone(), Some(at("10.0.0.1"))),
                (name, Some(at("10.0.0.3"))),
            ],
            make,
        );
        assert!(
            Arc::ptr_eq(&next[0], &first[0]),
            "a staying endpoint keeps its pool"
        );
        assert_eq!(next[1].address().to_string(), "10.0.0.3:80");
        assert_eq!(gone.len(), 1);
        assert!(Arc::ptr_eq(&gone[0], &first[1]));
        // Resolved endpoints still answer to the name they came from.
        assert!(next[1].is("svc.local"));
        assert!(next[1].is("10.0.0.3"));
    }
}
