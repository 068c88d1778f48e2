//! Listeners and RouteConfigurations: where a Listener's routes come
//! from, and each virtual host's routes as sluice matches them (gRFC A28).

use std::sync::Arc;

use envoy_types::pb::envoy::{
    config::{
        listener::v3::Listener,
        route::v3::{
            HeaderMatcher, RouteConfiguration, RouteMatch, VirtualHost,
            header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
            route_match::PathSpecifier,
        },
    },
    extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    },
    r#type::{
        matcher::v3::{RegexMatcher, StringMatcher, string_matcher::MatchPattern},
        v3::fractional_percent::DenominatorType,
    },
};
use prost::Message;

use super::{
    HCM, HeaderMatch, HeaderRule, Invalid, ListenerRes, PathMatch, RouteAction, RouteRes,
    RouteSource, RouteTable, VirtualHostRes, duration,
};

pub(super) fn listener(l: &Listener) -> Result<ListenerRes, Invalid> {
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

pub(super) fn route_table(r: &RouteConfiguration) -> Result<RouteTable, Invalid> {
    let virtual_hosts = r
        .virtual_hosts
        .iter()
        .map(virtual_host)
        .collect::<Result<_, _>>()?;
    Ok(RouteTable { virtual_hosts })
}

/// An Envoy retry policy as gRFC A44 converts it: the gRPC codes of
/// `retry_on` (none of them: no policy), `num_retries` + 1 attempts (at
/// most 5), backoff from `retry_back_off` (25ms and 10 × that unless
/// given), multiplier 2.
fn retry_policy(
    p: &envoy_types::pb::envoy::config::route::v3::RetryPolicy,
) -> Result<Option<Arc<crate::balance::Policy>>, Invalid> {
    use sluice_layers::grpc::status::Code;
    let codes: Vec<Code> = p
        .retry_on
        .split(',')
        .filter_map(|c| match c.trim() {
            "cancelled" => Some(Code::Cancelled),
            "deadline-exceeded" => Some(Code::DeadlineExceeded),
            "internal" => Some(Code::Internal),
            "resource-exhausted" => Some(Code::ResourceExhausted),
            "unavailable" => Some(Code::Unavailable),
            _ => None,
        })
        .collect();
    let attempts = p
        .num_retries
        .as_ref()
        .map_or(1, |n| n.value)
        .saturating_add(1);
    let base = p
        .retry_back_off
        .as_ref()
        .and_then(|b| b.base_interval.as_ref())
        .map_or(std::time::Duration::from_millis(25), duration);
    if base.is_zero() {
        return Err("retry_policy.retry_back_off.base_interval must be more than 0".to_owned());
    }
    let max = p
        .retry_back_off
        .as_ref()
        .and_then(|b| b.max_interval.as_ref())
        .map_or(base * 10, duration);
    if max < base {
        return Err("retry_policy.retry_back_off.max_interval is below base_interval".to_owned());
    }
    if codes.is_empty() || attempts < 2 {
        return Ok(None);
    }
    Ok(Some(crate::balance::Policy::retry_only(
        "xDS route",
        crate::config::RetryConfig {
            max_attempts: attempts.min(5),
            initial_backoff: base,
            max_backoff: max,
            backoff_multiplier: 2.0,
            retryable_codes: codes,
        },
    )))
}

fn virtual_host(v: &VirtualHost) -> Result<VirtualHostRes, Invalid> {
    let mut routes = Vec::with_capacity(v.routes.len());
    let host_retry = match &v.retry_policy {
        Some(p) => retry_policy(p).map_err(|e| format!("virtual host {:?}: {e}", v.name))?,
        None => None,
    };
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
                let retry = match &a.retry_policy {
                    Some(p) => retry_policy(p)
                        .map_err(|e| format!("virtual host {:?} route {i}: {e}", v.name))?,
                    None => host_retry.clone(),
                };
                RouteAction::Clusters {
                    retry,
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

#[cfg(test)]
mod tests {
    use envoy_types::pb::{
        envoy::config::route::v3::{RetryPolicy, retry_policy::RetryBackOff},
        google::protobuf::{Duration as PbDuration, UInt32Value},
    };
    use sluice_layers::grpc::status::Code;

    use super::retry_policy;

    fn policy(retry_on: &str, retries: Option<u32>, base_ms: Option<i32>) -> RetryPolicy {
        RetryPolicy {
            retry_on: retry_on.to_owned(),
            num_retries: retries.map(|value| UInt32Value { value }),
            retry_back_off: base_ms.map(|ms| RetryBackOff {
                base_interval: Some(PbDuration {
                    seconds: 0,
                    nanos: ms * 1_000_000,
                }),
                max_interval: None,
            }),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn an_envoy_retry_policy_converts_as_grfc_a44_says() {
        let p = retry_policy(&policy("unavailable, 5xx,cancelled", None, None))
            .expect("valid")
            .expect("a policy");
        let r = p.retry.as_ref().expect("retry");
        assert_eq!(r.retryable_codes, [Code::Unavailable, Code::Cancelled]);
        assert_eq!(r.max_attempts, 2, "num_retries 1 by default, + 1");
        assert_eq!(r.initial_backoff, std::time::Duration::from_millis(25));
        assert_eq!(r.max_backoff, std::time::Duration::from_millis(250));
        let p = retry_policy(&policy("internal", Some(9), Some(40)))
            .expect("valid")
            .expect("a policy");
        let r = p.retry.as_ref().expect("retry");
        assert_eq!(r.max_attempts, 5, "capped at 5");
        assert_eq!(r.max_backoff, std::time::Duration::from_millis(400));
        // No gRPC code: no policy. A zero base interval: NACK.
        assert!(
            retry_policy(&policy("5xx,reset", None, None))
                .expect("valid")
                .is_none()
        );
        assert!(retry_policy(&policy("unavailable", None, Some(0))).is_err());
    }
}
