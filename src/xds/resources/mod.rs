//! The four resource types of the proxyless subset, decoded from the
//! published Envoy types and checked as gRPC checks them (gRFC A27, A28,
//! A29, A31, A32): what sluice can carry out becomes its own small model;
//! what a client must not ignore is an error, which NACKs the resource.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    },
    google::protobuf::{Any, Duration as PbDuration},
};
use prost::Message;

mod cluster;
mod listener;

use self::{
    cluster::{assignment, cluster},
    listener::{listener, route_table},
};
use super::bootstrap::Bootstrap;
use crate::config::{HostPort, UpstreamTlsConfig};

pub(crate) const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub(crate) const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub(crate) const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub(crate) const ENDPOINT: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const RESOURCE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// The four types, in the order their subscriptions depend on each other.
pub(crate) const TYPES: [&str; 4] = [LISTENER, ROUTE, CLUSTER, ENDPOINT];

/// The short name of a type URL, for logs and metric labels.
pub(crate) fn short(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "listener",
        ROUTE => "route",
        CLUSTER => "cluster",
        ENDPOINT => "endpoint",
        _ => "other",
    }
}

/// A resource that cannot be used: why, for the NACK's `error_detail`.
pub(crate) type Invalid = String;

/// A decoded resource of any of the four types.
#[derive(Clone, Debug)]
pub(crate) enum Decoded {
    Listener(Arc<ListenerRes>),
    Route(Arc<RouteTable>),
    Cluster(Arc<ClusterRes>),
    Endpoint(Arc<Assignment>),
}

/// A Listener: where its routes come from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ListenerRes {
    pub(crate) routes: RouteSource,
    /// `common_http_protocol_options.max_stream_duration`: a route's own
    /// overrides it.
    pub(crate) max_stream_duration: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RouteSource {
    /// A RouteConfiguration to subscribe to.
    Rds(String),
    Inline(Arc<RouteTable>),
}

/// A RouteConfiguration: virtual hosts in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RouteTable {
    pub(crate) virtual_hosts: Vec<VirtualHostRes>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VirtualHostRes {
    pub(crate) domains: Vec<String>,
    pub(crate) routes: Vec<RouteRes>,
}

/// One route: its match and what it does.
#[derive(Clone, Debug)]
pub(crate) struct RouteRes {
    pub(crate) path: PathMatch,
    pub(crate) case_sensitive: bool,
    pub(crate) headers: Vec<HeaderMatch>,
    /// `runtime_fraction.default_value` as parts per million.
    pub(crate) fraction: Option<u32>,
    pub(crate) action: RouteAction,
}

impl PartialEq for RouteRes {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

#[derive(Clone, Debug)]
pub(crate) enum PathMatch {
    Prefix(String),
    Path(String),
    Regex(regex::Regex),
}

/// A header matcher (gRFC A28).
#[derive(Clone, Debug)]
pub(crate) struct HeaderMatch {
    pub(crate) name: String,
    pub(crate) rule: HeaderRule,
    pub(crate) invert: bool,
}

#[derive(Clone, Debug)]
pub(crate) enum HeaderRule {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(regex::Regex),
    Range(i64, i64),
    Present(bool),
}

/// What a route does with a call.
#[derive(Clone, Debug)]
pub(crate) enum RouteAction {
    /// To clusters, one picked per call by weight.
    Clusters {
        clusters: Vec<(Arc<str>, u32)>,
        /// The deadline cap (gRFC A31), if any.
        max_stream_duration: Option<Duration>,
        /// With `grpc_timeout_header_max`: the client's `grpc-timeout`
        /// counts, capped by it (zero: no cap).
        grpc_timeout_header_max: Option<Duration>,
        /// The route's retry policy, else its virtual host's (gRFC A44).
        retry: Option<Arc<crate::balance::Policy>>,
    },
    /// Any other action: a call it matches fails UNAVAILABLE.
    NonForwarding,
}

/// A Cluster: where its endpoints come from, and how calls pick one.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ClusterRes {
    /// The ClusterLoadAssignment to subscribe to.
    pub(crate) eds_name: String,
    pub(crate) lb: Lb,
    /// `circuit_breakers` (DEFAULT priority) `max_requests`: calls in
    /// flight at most (gRFC A32).
    pub(crate) max_requests: u32,
    /// TLS to its endpoints (gRFC A29), as sluice's upstream TLS takes it.
    pub(crate) tls: Option<UpstreamTlsConfig>,
    /// `outlier_detection` (gRFC A50), if given.
    pub(crate) outlier: Option<crate::config::OutlierConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lb {
    RoundRobin,
    LeastRequest,
}

/// A ClusterLoadAssignment: endpoints by priority, lowest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Assignment {
    pub(crate) priorities: Vec<Vec<EndpointRes>>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EndpointRes {
    pub(crate) address: HostPort,
    /// Its locality's weight share times its own weight.
    pub(crate) weight: u32,
    /// Not `UNHEALTHY` or `DRAINING`.
    pub(crate) healthy: bool,
}

/// The resource in `any` (unwrapping a `Resource` envelope): its name and
/// what it decodes to, or why it cannot be used. A resource whose name
/// cannot even be read is `Err((None, why))`.
pub(crate) fn decode(
    type_url: &str,
    any: &Any,
    bootstrap: &Bootstrap,
) -> Result<(String, Decoded), (Option<String>, Invalid)> {
    let mut any = any.clone();
    if any.type_url == RESOURCE {
        let wrapped =
            envoy_types::pb::envoy::service::discovery::v3::Resource::decode(any.value.as_slice())
                .map_err(|e| {
                    (
                        None,
                        format!("a Resource envelope that does not decode: {e}"),
                    )
                })?;
        any = wrapped.resource.ok_or_else(|| {
            (
                Some(wrapped.name.clone()),
                "an empty Resource envelope".to_owned(),
            )
        })?;
    }
    if any.type_url != type_url {
        return Err((
            None,
            format!("a {} resource in a {type_url} response", any.type_url),
        ));
    }
    let bytes = any.value.as_slice();
    let named = |name: &str| Some(name.to_owned());
    match type_url {
        LISTENER => {
            let l = Listener::decode(bytes).map_err(|e| (None, e.to_string()))?;
            let res = listener(&l).map_err(|e| (named(&l.name), e))?;
            Ok((l.name, Decoded::Listener(Arc::new(res))))
        }
        ROUTE => {
            let r = RouteConfiguration::decode(bytes).map_err(|e| (None, e.to_string()))?;
            let res = route_table(&r).map_err(|e| (named(&r.name), e))?;
            Ok((r.name, Decoded::Route(Arc::new(res))))
        }
        CLUSTER => {
            let c = Cluster::decode(bytes).map_err(|e| (None, e.to_string()))?;
            let res = cluster(&c, bootstrap).map_err(|e| (named(&c.name), e))?;
            Ok((c.name, Decoded::Cluster(Arc::new(res))))
        }
        ENDPOINT => {
            let a = ClusterLoadAssignment::decode(bytes).map_err(|e| (None, e.to_string()))?;
            let res = assignment(&a).map_err(|e| (named(&a.cluster_name), e))?;
            Ok((a.cluster_name, Decoded::Endpoint(Arc::new(res))))
        }
        other => Err((None, format!("type {other} is not one sluice asked for"))),
    }
}

fn duration(d: &PbDuration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}
