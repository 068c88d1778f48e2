//! The four resource types of the proxyless subset, decoded from the
//! published Envoy types and checked as gRPC checks them (gRFC A27, A28,
//! A29, A31, A32): what sluice can carry out becomes its own small model;
//! what a client must not ignore is an error, which NACKs the resource.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
            },
            core::v3::{HealthStatus, address, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier},
            listener::v3::Listener,
            route::v3::{
                HeaderMatcher, RouteConfiguration, RouteMatch, VirtualHost,
                header_matcher::HeaderMatchSpecifier, route::Action,
                route_action::ClusterSpecifier, route_match::PathSpecifier,
            },
        },
        extensions::{
            filters::network::http_connection_manager::v3::{
                HttpConnectionManager, http_connection_manager::RouteSpecifier,
            },
            transport_sockets::tls::v3::{
                CommonTlsContext, UpstreamTlsContext, common_tls_context::ValidationContextType,
            },
        },
        r#type::{
            matcher::v3::{RegexMatcher, StringMatcher, string_matcher::MatchPattern},
            v3::fractional_percent::DenominatorType,
        },
    },
    google::protobuf::{Any, Duration as PbDuration},
};
use prost::Message;

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

/// gRPC's default `max_requests` when a cluster sets none (gRFC A32).
const DEFAULT_MAX_REQUESTS: u32 = 1024;

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

fn listener(l: &Listener) -> Result<ListenerRes, Invalid> {
    let api = l
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
        .ok_or("not an API listener (no api_listener)")?;
    if api.type_url != HCM {
        return Err(format!(
            "api_listener is {}, not an HttpConnectionManager",
            api.type_url
        ));
    }
    let hcm = HttpConnectionManager::decode(api.value.as_slice())
        .map_err(|e| format!("the HttpConnectionManager does not decode: {e}"))?;
    let routes = match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return Err("rds names no route_config_name".to_owned());
            }
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Inline(Arc::new(route_table(rc)?)),
        Some(_) | None => {
            return Err("the HttpConnectionManager has neither rds nor route_config".to_owned());
        }
    };
    let max_stream_duration = hcm
        .common_http_protocol_options
        .as_ref()
        .and_then(|o| o.max_stream_duration.as_ref())
        .map(duration)
        .filter(|d| !d.is_zero());
    Ok(ListenerRes {
        routes,
        max_stream_duration,
    })
}

fn route_table(r: &RouteConfiguration) -> Result<RouteTable, Invalid> {
    let virtual_hosts = r
        .virtual_hosts
        .iter()
        .map(virtual_host)
        .collect::<Result<_, _>>()?;
    Ok(RouteTable { virtual_hosts })
}

fn virtual_host(v: &VirtualHost) -> Result<VirtualHostRes, Invalid> {
    let mut routes = Vec::with_capacity(v.routes.len());
    for (i, r) in v.routes.iter().enumerate() {
        let Some(m) = &r.r#match else {
            return Err(format!("virtual host {:?} route {i} has no match", v.name));
        };
        // A route whose match sluice cannot carry out is skipped, as gRPC
        // skips it (query parameters can never match a gRPC call).
        let Some(path) = path_match(m).map_err(|e| format!("route {i}: {e}"))? else {
            continue;
        };
        if !m.query_parameters.is_empty() {
            continue;
        }
        let headers = m
            .headers
            .iter()
            .map(header_match)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("virtual host {:?} route {i}: {e}", v.name))?;
        let fraction = m
            .runtime_fraction
            .as_ref()
            .and_then(|f| f.default_value.as_ref())
            .map(|p| {
                let per = match DenominatorType::try_from(p.denominator) {
                    Ok(DenominatorType::Hundred) => 10_000,
                    Ok(DenominatorType::TenThousand) => 100,
                    _ => 1,
                };
                p.numerator.saturating_mul(per).min(1_000_000)
            });
        let action = match &r.action {
            Some(Action::Route(a)) => {
                let clusters = match &a.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                        vec![(Arc::from(c.as_str()), 1)]
                    }
                    Some(ClusterSpecifier::WeightedClusters(w)) => {
                        let clusters: Vec<(Arc<str>, u32)> = w
                            .clusters
                            .iter()
                            .map(|c| (Arc::from(c.name.as_str()), c.weight.map_or(0, |w| w.value)))
                            .filter(|(_, w)| *w > 0)
                            .collect();
                        let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
                        if total == 0 || total > u64::from(u32::MAX) {
                            return Err(format!(
                                "virtual host {:?} route {i}: weighted_clusters weights sum to {total}",
                                v.name
                            ));
                        }
                        clusters
                    }
                    // cluster_header and plugins: gRPC ignores such a
                    // route; so does sluice.
                    _ => continue,
                };
                let msd = a.max_stream_duration.as_ref();
                RouteAction::Clusters {
                    clusters,
                    max_stream_duration: msd
                        .and_then(|m| m.max_stream_duration.as_ref())
                        .map(duration),
                    grpc_timeout_header_max: msd
                        .and_then(|m| m.grpc_timeout_header_max.as_ref())
                        .map(duration),
                }
            }
            Some(_) => RouteAction::NonForwarding,
            None => {
                return Err(format!("virtual host {:?} route {i} has no action", v.name));
            }
        };
        routes.push(RouteRes {
            path,
            case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
            headers,
            fraction,
            action,
        });
    }
    if v.domains.is_empty() {
        return Err(format!("virtual host {:?} has no domains", v.name));
    }
    Ok(VirtualHostRes {
        domains: v.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
    })
}

/// The path condition, `None` for one sluice skips (CONNECT matchers).
fn path_match(m: &RouteMatch) -> Result<Option<PathMatch>, Invalid> {
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    Ok(match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => Some(PathMatch::Prefix(p.clone())),
        Some(PathSpecifier::Path(p)) => Some(PathMatch::Path(p.clone())),
        Some(PathSpecifier::SafeRegex(r)) => {
            Some(PathMatch::Regex(full_regex(r, !case_sensitive)?))
        }
        Some(_) => None,
        None => return Err("a route match without a path specifier".to_owned()),
    })
}

/// A whole-value regex in the `regex` crate's syntax (RE2's, bar a few
/// features); one it cannot compile is refused.
fn full_regex(r: &RegexMatcher, ignore_case: bool) -> Result<regex::Regex, Invalid> {
    regex::RegexBuilder::new(&format!("^(?:{})$", r.regex))
        .case_insensitive(ignore_case)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("regex {:?} does not compile: {e}", r.regex))
}

fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch, Invalid> {
    #[allow(deprecated)]
    let rule = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(s)) => HeaderRule::Exact(s.clone(), false),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => HeaderRule::Regex(full_regex(r, false)?),
        Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderRule::Range(r.start, r.end),
        Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderRule::Present(*p),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => HeaderRule::Prefix(s.clone(), false),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => HeaderRule::Suffix(s.clone(), false),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => HeaderRule::Contains(s.clone(), false),
        Some(HeaderMatchSpecifier::StringMatch(m)) => string_match(m)?,
        None => HeaderRule::Present(true),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        rule,
        invert: h.invert_match,
    })
}

fn string_match(m: &StringMatcher) -> Result<HeaderRule, Invalid> {
    let ic = m.ignore_case;
    let lower = |s: &String| {
        if ic {
            s.to_ascii_lowercase()
        } else {
            s.clone()
        }
    };
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => HeaderRule::Exact(lower(s), ic),
        Some(MatchPattern::Prefix(s)) => HeaderRule::Prefix(lower(s), ic),
        Some(MatchPattern::Suffix(s)) => HeaderRule::Suffix(lower(s), ic),
        Some(MatchPattern::Contains(s)) => HeaderRule::Contains(lower(s), ic),
        Some(MatchPattern::SafeRegex(r)) => HeaderRule::Regex(full_regex(r, false)?),
        Some(MatchPattern::Custom(_)) | None => {
            return Err("a string matcher sluice does not know".to_owned());
        }
    })
}

fn cluster(c: &Cluster, bootstrap: &Bootstrap) -> Result<ClusterRes, Invalid> {
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {}
        Some(ClusterDiscoveryType::Type(t)) => {
            let name = DiscoveryType::try_from(*t).map_or("unknown", |t| t.as_str_name());
            return Err(format!(
                "cluster type {name} is not supported (EDS clusters only)"
            ));
        }
        _ => return Err("a custom cluster type is not supported (EDS clusters only)".to_owned()),
    }
    let eds = c
        .eds_cluster_config
        .as_ref()
        .ok_or("an EDS cluster without eds_cluster_config")?;
    if eds
        .eds_config
        .as_ref()
        .is_some_and(|s| s.config_source_specifier.is_some() && !ads_or_self(s))
    {
        return Err("eds_config must be ads or self".to_owned());
    }
    let lb = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => Lb::RoundRobin,
        Ok(LbPolicy::LeastRequest) => Lb::LeastRequest,
        Ok(other) => {
            return Err(format!(
                "lb_policy {} is not supported (ROUND_ROBIN, LEAST_REQUEST)",
                other.as_str_name()
            ));
        }
        Err(_) => return Err(format!("lb_policy {} is unknown", c.lb_policy)),
    };
    let max_requests = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
        .and_then(|t| t.max_requests)
        .map_or(DEFAULT_MAX_REQUESTS, |v| v.value);
    let tls = match &c.transport_socket {
        None => None,
        Some(ts) => match &ts.config_type {
            Some(
                envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                    any,
                ),
            ) if any.type_url == UPSTREAM_TLS => {
                let ctx = UpstreamTlsContext::decode(any.value.as_slice())
                    .map_err(|e| format!("the UpstreamTlsContext does not decode: {e}"))?;
                Some(upstream_tls(&ctx, bootstrap)?)
            }
            _ => return Err(format!("transport socket {:?} is not supported", ts.name)),
        },
    };
    Ok(ClusterRes {
        eds_name: if eds.service_name.is_empty() {
            c.name.clone()
        } else {
            eds.service_name.clone()
        },
        lb,
        max_requests,
        tls,
    })
}

fn ads_or_self(s: &envoy_types::pb::envoy::config::core::v3::ConfigSource) -> bool {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    matches!(
        s.config_source_specifier,
        Some(ConfigSourceSpecifier::Ads(_) | ConfigSourceSpecifier::Self_(_))
    )
}

/// gRFC A29's cluster TLS: the CA (and a client certificate) from the
/// bootstrap's `file_watcher` certificate providers.
fn upstream_tls(
    ctx: &UpstreamTlsContext,
    bootstrap: &Bootstrap,
) -> Result<UpstreamTlsConfig, Invalid> {
    let common: &CommonTlsContext = ctx
        .common_tls_context
        .as_ref()
        .ok_or("an UpstreamTlsContext without common_tls_context")?;
    let validation = match &common.validation_context_type {
        Some(ValidationContextType::ValidationContext(v)) => Some(v),
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.as_ref()
        }
        _ => None,
    };
    let ca_instance = validation
        .and_then(|v| v.ca_certificate_provider_instance.as_ref())
        .ok_or("no ca_certificate_provider_instance: the only TLS validation supported")?;
    let provider = |name: &str| {
        bootstrap.certificates.get(name).ok_or_else(|| {
            format!("certificate provider instance {name:?} is not in the bootstrap")
        })
    };
    let ca = provider(&ca_instance.instance_name)?
        .ca_certificate_file
        .clone()
        .ok_or("the CA provider has no ca_certificate_file")?;
    let mut tls = UpstreamTlsConfig {
        ca: Some(ca),
        server_name: (!ctx.sni.is_empty()).then(|| ctx.sni.clone()),
        ..UpstreamTlsConfig::default()
    };
    if let Some(identity) = &common.tls_certificate_provider_instance {
        let p = provider(&identity.instance_name)?;
        tls.cert.clone_from(&p.certificate_file);
        tls.key.clone_from(&p.private_key_file);
    }
    Ok(tls)
}

fn assignment(a: &ClusterLoadAssignment) -> Result<Assignment, Invalid> {
    let mut by_priority: Vec<(u32, Vec<EndpointRes>)> = Vec::new();
    for locality in &a.endpoints {
        // gRPC refuses an assignment whose localities are not named.
        if locality.locality.is_none() {
            return Err("an endpoints entry without its locality".to_owned());
        }
        // A locality with weight 0 or none gets no traffic (gRPC).
        let locality_weight = locality.load_balancing_weight.map_or(0, |w| w.value);
        if locality_weight == 0 {
            continue;
        }
        let endpoints = &locality.lb_endpoints;
        let weight_sum: u64 = endpoints
            .iter()
            .map(|e| u64::from(e.load_balancing_weight.map_or(1, |w| w.value.max(1))))
            .sum();
        let mut list = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let Some(HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else {
                return Err("an lb_endpoint without an endpoint".to_owned());
            };
            let Some(address::Address::SocketAddress(sa)) =
                endpoint.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err("an endpoint without a socket address".to_owned());
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(format!("endpoint {} has no port_value", sa.address));
            };
            let port = u16::try_from(port).map_err(|_| format!("port {port} is out of range"))?;
            let text = if sa.address.contains(':') {
                format!("[{}]:{port}", sa.address)
            } else {
                format!("{}:{port}", sa.address)
            };
            let address: HostPort = text.parse().map_err(|e| format!("endpoint {text}: {e}"))?;
            let own = u64::from(e.load_balancing_weight.map_or(1, |w| w.value.max(1)));
            // The locality's share, spread over its endpoints by theirs.
            let weight = (u64::from(locality_weight) * own * 1000 / weight_sum.max(1)).max(1);
            let health = HealthStatus::try_from(e.health_status).unwrap_or(HealthStatus::Unknown);
            list.push(EndpointRes {
                address,
                weight: u32::try_from(weight).unwrap_or(u32::MAX),
                healthy: !matches!(health, HealthStatus::Unhealthy | HealthStatus::Draining),
            });
        }
        match by_priority
            .iter_mut()
            .find(|(p, _)| *p == locality.priority)
        {
            Some((_, all)) => all.extend(list),
            None => by_priority.push((locality.priority, list)),
        }
    }
    by_priority.sort_by_key(|(p, _)| *p);
    // Priorities must be contiguous from 0 (gRPC NACKs a gap).
    for (i, (p, _)) in by_priority.iter().enumerate() {
        if *p as usize != i {
            return Err(format!("priorities skip {i} (found {p})"));
        }
    }
    Ok(Assignment {
        priorities: by_priority.into_iter().map(|(_, l)| l).collect(),
    })
}
