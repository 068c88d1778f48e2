//! Clusters and ClusterLoadAssignments: how a cluster picks, its circuit
//! breaker and TLS (gRFC A29, A32), and its endpoints by priority.

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::{
            Cluster,
            cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
        },
        core::v3::{HealthStatus, address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier},
    },
    extensions::transport_sockets::tls::v3::{
        CommonTlsContext, UpstreamTlsContext, common_tls_context::ValidationContextType,
    },
};
use prost::Message;

use super::{Assignment, ClusterRes, EndpointRes, Invalid, Lb, UPSTREAM_TLS};
use crate::{
    config::{HostPort, UpstreamTlsConfig},
    xds::bootstrap::Bootstrap,
};

/// gRPC's default `max_requests` when a cluster sets none (gRFC A32).
const DEFAULT_MAX_REQUESTS: u32 = 1024;

pub(super) fn cluster(c: &Cluster, bootstrap: &Bootstrap) -> Result<ClusterRes, Invalid> {
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
        outlier: c.outlier_detection.as_ref().map(outlier).transpose()?,
    })
}

/// An Envoy `OutlierDetection` as gRFC A50 reads it: its defaults, success
/// rate ejection unless `enforcing_success_rate` is 0, failure percentage
/// ejection only when `enforcing_failure_percentage` is more than 0, and
/// (sluice's addition) consecutive gateway failures only when
/// `enforcing_consecutive_gateway_failure` is.
fn outlier(
    od: &envoy_types::pb::envoy::config::cluster::v3::OutlierDetection,
) -> Result<crate::config::OutlierConfig, Invalid> {
    use crate::config::{FailurePercentageConfig, OutlierConfig, SuccessRateConfig};
    let time = |d: Option<&envoy_types::pb::google::protobuf::Duration>, default: u64| {
        d.map_or(std::time::Duration::from_secs(default), super::duration)
    };
    let num = |v: Option<&envoy_types::pb::google::protobuf::UInt32Value>, default: u32| {
        v.map_or(default, |v| v.value)
    };
    let percent = |v: u32, what: &str| {
        if v > 100 {
            Err(format!("outlier_detection.{what} is {v}, above 100"))
        } else {
            Ok(v)
        }
    };
    let interval = time(od.interval.as_ref(), 10);
    let base = time(od.base_ejection_time.as_ref(), 30);
    let max = time(od.max_ejection_time.as_ref(), 300).max(base);
    if interval.is_zero() {
        return Err("outlier_detection.interval must be more than 0".to_owned());
    }
    let enforcing_sr = percent(
        num(od.enforcing_success_rate.as_ref(), 100),
        "enforcing_success_rate",
    )?;
    let enforcing_fp = percent(
        num(od.enforcing_failure_percentage.as_ref(), 0),
        "enforcing_failure_percentage",
    )?;
    let enforcing_gw = percent(
        num(od.enforcing_consecutive_gateway_failure.as_ref(), 0),
        "enforcing_consecutive_gateway_failure",
    )?;
    Ok(OutlierConfig {
        interval,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: percent(
            num(od.max_ejection_percent.as_ref(), 10),
            "max_ejection_percent",
        )?,
        success_rate: (enforcing_sr > 0).then(|| SuccessRateConfig {
            stdev_factor: num(od.success_rate_stdev_factor.as_ref(), 1900),
            enforcement_percentage: enforcing_sr,
            minimum_hosts: num(od.success_rate_minimum_hosts.as_ref(), 5),
            request_volume: num(od.success_rate_request_volume.as_ref(), 100),
        }),
        failure_percentage: Some(FailurePercentageConfig {
            threshold: percent(
                num(od.failure_percentage_threshold.as_ref(), 85),
                "failure_percentage_threshold",
            )?,
            enforcement_percentage: enforcing_fp,
            minimum_hosts: num(od.failure_percentage_minimum_hosts.as_ref(), 5),
            request_volume: num(od.failure_percentage_request_volume.as_ref(), 50),
        })
        .filter(|_| enforcing_fp > 0),
        consecutive_failures: (enforcing_gw > 0)
            .then(|| num(od.consecutive_gateway_failure.as_ref(), 5))
            .filter(|n| *n > 0),
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

pub(super) fn assignment(a: &ClusterLoadAssignment) -> Result<Assignment, Invalid> {
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
