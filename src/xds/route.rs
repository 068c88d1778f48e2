//! The calls the file's routes leave to xDS: their Listener (the one
//! configured, or the call's `:authority`), its virtual host by domain
//! (Envoy's rules), the first route that matches (gRFC A28), a cluster of
//! its action (by weight), and that cluster's endpoints at the lowest
//! priority that can serve. A call whose resources are not here yet
//! waits for them, bounded by its deadline and `xds.resource_timeout`;
//! one xDS does not route fails UNAVAILABLE, saying what was missing.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::Either;
use http::{Request, Response, request::Parts};
use sluice_layers::{
    BoxError,
    direct::{Destination, Route},
    grpc::timeout,
};
use tower::{Service, ServiceExt};

use super::{
    client::Shared,
    resources::{
        HeaderMatch, HeaderRule, PathMatch, RouteAction, RouteRes, RouteTable, VirtualHostRes,
    },
    view::{Lookup, View},
};
use crate::{
    balance::{Resolved, random_below},
    config::{DEFAULT_GROUP, XdsFallback},
};

/// The target the route table gives a call none of its routes takes,
/// when xDS is on: this layer routes it.
pub(crate) const XDS_TARGET: &str = "xds:";

/// Why xDS did not route a call (UNAVAILABLE).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unrouted(pub(crate) String);

/// Routes the calls the file's routes leave to xDS.
#[derive(Clone, Debug)]
pub(crate) struct XdsRoute<S> {
    inner: S,
    xds: Option<Arc<Shared>>,
}

impl<S> XdsRoute<S> {
    pub(crate) fn new(inner: S, xds: Option<Arc<Shared>>) -> Self {
        Self { inner, xds }
    }
}

/// What routing a call came to.
enum Decision {
    /// Its route and group.
    Go(Destination, Resolved),
    /// A resource it needs is not here yet.
    Wait,
    /// Not routed: why.
    No(String),
}

type Waiting<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

impl<S, B, RB> Service<Request<B>> for XdsRoute<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Either<S::Future, Waiting<Response<RB>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(xds) = &self.xds else {
            return Either::Left(self.inner.call(req));
        };
        let ours = matches!(req.extensions().get::<Route>(), Some(Route::One(d)) if d.target() == XDS_TARGET);
        if !ours {
            return Either::Left(self.inner.call(req));
        }
        let (mut parts, body) = req.into_parts();
        match decide(xds, &parts) {
            Decision::Go(destination, resolved) => {
                parts.extensions.insert(Route::One(destination));
                parts.extensions.insert(resolved);
                req = Request::from_parts(parts, body);
                Either::Left(self.inner.call(req))
            }
            Decision::No(why) => match fallback(xds, &mut parts, why) {
                Ok(()) => Either::Left(self.inner.call(Request::from_parts(parts, body))),
                Err(e) => Either::Right(Box::pin(std::future::ready(Err(e)))),
            },
            Decision::Wait => {
                let xds = xds.clone();
                let inner = self.inner.clone();
                Either::Right(Box::pin(async move {
                    let mut parts = parts;
                    wait(&xds, &mut parts).await?;
                    inner.oneshot(Request::from_parts(parts, body)).await
                }))
            }
        }
    }
}

/// Waits until the call can be routed (or refused), bounded by its
/// deadline and `xds.resource_timeout`.
async fn wait(xds: &Arc<Shared>, parts: &mut Parts) -> Result<(), BoxError> {
    let mut limit = xds.config.resource_timeout;
    if let Some(t) = timeout::from_headers(&parts.headers) {
        limit = limit.min(t);
    }
    let until = tokio::time::Instant::now() + limit;
    let mut changed = xds.changed.subscribe();
    loop {
        changed.borrow_and_update();
        match decide(xds, parts) {
            Decision::Go(destination, resolved) => {
                parts.extensions.insert(Route::One(destination));
                parts.extensions.insert(resolved);
                return Ok(());
            }
            Decision::No(why) => return fallback(xds, parts, why),
            Decision::Wait => {}
        }
        if tokio::time::timeout_at(until, changed.changed())
            .await
            .is_err()
        {
            let why = format!(
                "xDS resources for Listener {:?} did not arrive within {limit:?}",
                listener_name(xds, parts)
            );
            return fallback(xds, parts, why);
        }
    }
}

/// `xds.fallback = "upstream"` sends an unrouted call to `[upstream]`;
/// otherwise it fails.
fn fallback(xds: &Shared, parts: &mut Parts, why: String) -> Result<(), BoxError> {
    match xds.config.fallback {
        XdsFallback::Upstream => {
            parts
                .extensions
                .insert(Route::One(Destination::new(DEFAULT_GROUP)));
            Ok(())
        }
        XdsFallback::None => Err(Box::new(Unrouted(why))),
    }
}

/// The call's `:authority`, as sent.
fn authority(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

fn listener_name<'a>(xds: &'a Shared, parts: &'a Parts) -> &'a str {
    xds.config
        .listener
        .as_deref()
        .unwrap_or_else(|| authority(parts))
}

fn decide(xds: &Shared, parts: &Parts) -> Decision {
    let name = listener_name(xds, parts);
    let view = xds.view.load();
    let listener = match view.listener(name) {
        Lookup::Ready(l) => l,
        Lookup::Missing(why) => return Decision::No(why),
        Lookup::Waiting => {
            if xds.config.listener.is_none()
                && let Err(e) = xds.want(name)
            {
                return Decision::No(format!(
                    "xDS: already {} authorities subscribed (xds.max_authorities); {name:?} is not",
                    e.0
                ));
            }
            return Decision::Wait;
        }
    };
    if let Some(used) = &listener.used {
        used.store(xds.now_secs(), Ordering::Relaxed);
    }
    let host = authority(parts);
    let Some(vhost) = virtual_host(&listener.table, host) else {
        return Decision::No(format!(
            "xDS Listener {name:?} has no virtual host for authority {host:?}"
        ));
    };
    let path = parts.uri.path();
    let Some(route) = vhost.routes.iter().find(|r| matches(r, parts)) else {
        return Decision::No(format!(
            "xDS Listener {name:?}: no route for {path} at authority {host:?}"
        ));
    };
    let RouteAction::Clusters {
        clusters,
        max_stream_duration,
        grpc_timeout_header_max,
        retry,
    } = &route.action
    else {
        return Decision::No(format!(
            "xDS Listener {name:?}: the route for {path} does not forward (a non-forwarding action)"
        ));
    };
    let cluster = pick_weighted(clusters);
    cluster_decision(
        &view,
        cluster,
        cap(
            *grpc_timeout_header_max,
            *max_stream_duration,
            listener.max_stream_duration,
        ),
        retry.as_ref(),
    )
}

fn cluster_decision(
    view: &View,
    cluster: &str,
    cap: Option<Duration>,
    retry: Option<&Arc<crate::balance::Policy>>,
) -> Decision {
    let c = match view.cluster(cluster) {
        Lookup::Ready(c) => c,
        Lookup::Missing(why) => return Decision::No(why),
        Lookup::Waiting => return Decision::Wait,
    };
    let Some((group, next)) = c.groups.current() else {
        return Decision::No(format!("xDS Cluster {cluster:?} has no healthy endpoint"));
    };
    let mut destination = Destination::new(c.target.clone());
    if let Some(cap) = cap {
        destination = destination.with_timeout(cap);
    }
    if let Some(retry) = retry {
        destination = destination.with_policy(retry.clone());
    }
    Decision::Go(
        destination,
        Resolved {
            group: group.clone(),
            next: next.cloned(),
            limit: Some((c.in_flight.clone(), c.max_requests)),
        },
    )
}

/// The deadline cap of gRFC A31: with `grpc_timeout_header_max`, the
/// client's `grpc-timeout` capped by it (zero: not capped); otherwise the
/// route's `max_stream_duration`, else the listener's.
fn cap(
    header_max: Option<Duration>,
    route: Option<Duration>,
    listener: Option<Duration>,
) -> Option<Duration> {
    match header_max {
        Some(max) => Some(max).filter(|d| !d.is_zero()),
        None => route.or(listener).filter(|d| !d.is_zero()),
    }
}

/// One of `clusters`, in proportion to its weight.
fn pick_weighted(clusters: &[(Arc<str>, u32)]) -> &str {
    if let [(only, _)] = clusters {
        return only;
    }
    let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut at = random_below(usize::try_from(total).unwrap_or(usize::MAX)) as u64;
    for (c, w) in clusters {
        if at < u64::from(*w) {
            return c;
        }
        at -= u64::from(*w);
    }
    clusters.last().map_or("", |(c, _)| c)
}

/// The virtual host for `authority` by Envoy's domain rules (an exact
/// domain, then the longest `*suffix`, then the longest `prefix*`, then
/// `*`), the authority taken with its port and without it: the more
/// specific match wins, with the port on a tie.
pub(crate) fn virtual_host<'a>(
    table: &'a RouteTable,
    authority: &str,
) -> Option<&'a VirtualHostRes> {
    let host = authority.to_ascii_lowercase();
    let with_port = best_domain(table, &host);
    let without = match host.rsplit_once(':') {
        Some((h, port))
            if !port.is_empty()
                && port.chars().all(|c| c.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            best_domain(table, h)
        }
        _ => None,
    };
    match (with_port, without) {
        (Some((a, va)), Some((b, vb))) => Some(if b > a { vb } else { va }),
        (a, b) => a.or(b).map(|(_, v)| v),
    }
}

/// The best virtual host for `host`, with its score (kind, length).
fn best_domain<'a>(table: &'a RouteTable, host: &str) -> Option<((u8, usize), &'a VirtualHostRes)> {
    let mut best: Option<((u8, usize), &VirtualHostRes)> = None;
    for vh in &table.virtual_hosts {
        for d in &vh.domains {
            let score = if d == "*" {
                Some((0, 0))
            } else if let Some(suffix) = d.strip_prefix('*') {
                (host.len() > suffix.len() && host.ends_with(suffix)).then_some((2, d.len()))
            } else if let Some(prefix) = d.strip_suffix('*') {
                (host.len() > prefix.len() && host.starts_with(prefix)).then_some((1, d.len()))
            } else {
                (d == host).then_some((3, d.len()))
            };
            if let Some(score) = score
                && best.is_none_or(|(b, _)| score > b)
            {
                best = Some((score, vh));
            }
        }
    }
    best
}

/// Whether route `r` matches the call with head `parts` (gRFC A28).
pub(crate) fn matches(r: &RouteRes, parts: &Parts) -> bool {
    let path = parts.uri.path();
    let path_ok = match &r.path {
        PathMatch::Prefix(p) if r.case_sensitive => path.starts_with(p.as_str()),
        PathMatch::Prefix(p) => path
            .get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p)),
        PathMatch::Path(p) if r.case_sensitive => path == p,
        PathMatch::Path(p) => path.eq_ignore_ascii_case(p),
        PathMatch::Regex(re) => re.is_match(path),
    };
    if !path_ok || !r.headers.iter().all(|h| header_matches(h, parts)) {
        return false;
    }
    r.fraction
        .is_none_or(|f| (random_below(1_000_000) as u64) < u64::from(f))
}

fn header_matches(h: &HeaderMatch, parts: &Parts) -> bool {
    // Binary headers and pseudo-headers (but content-type) never match:
    // they are treated as absent (gRFC A28).
    let value: Option<String> = if h.name.ends_with("-bin") || h.name.starts_with(':') {
        None
    } else {
        let mut values = parts
            .headers
            .get_all(h.name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        values
            .peek()
            .is_some()
            .then(|| values.collect::<Vec<_>>().join(","))
    };
    let lower = |v: &str, ic: bool| {
        if ic {
            v.to_ascii_lowercase()
        } else {
            v.to_owned()
        }
    };
    let result = match (&h.rule, value.as_deref()) {
        (HeaderRule::Present(p), v) => v.is_some() == *p,
        (_, None) => false,
        (HeaderRule::Exact(s, ic), Some(v)) => lower(v, *ic) == *s,
        (HeaderRule::Prefix(s, ic), Some(v)) => lower(v, *ic).starts_with(s.as_str()),
        (HeaderRule::Suffix(s, ic), Some(v)) => lower(v, *ic).ends_with(s.as_str()),
        (HeaderRule::Contains(s, ic), Some(v)) => lower(v, *ic).contains(s.as_str()),
        (HeaderRule::Regex(re), Some(v)) => re.is_match(v),
        (HeaderRule::Range(start, end), Some(v)) => v
            .trim()
            .parse::<i64>()
            .is_ok_and(|n| *start <= n && n < *end),
    };
    result != h.invert
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::resources::RouteTable;

    fn vh(domains: &[&str]) -> VirtualHostRes {
        VirtualHostRes {
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn domains_match_exact_then_suffix_then_prefix_then_any_with_and_without_the_port() {
        let table = RouteTable {
            virtual_hosts: vec![
                vh(&["*"]),
                vh(&["api.*"]),
                vh(&["*.example.com"]),
                vh(&["*.b.example.com"]),
                vh(&["svc.example.com:8080", "exact.example.com"]),
            ],
        };
        let pick = |a: &str| {
            let v = virtual_host(&table, a).expect("a virtual host");
            table
                .virtual_hosts
                .iter()
                .position(|x| std::ptr::eq(x, v))
                .expect("in the table")
        };
        assert_eq!(pick("exact.example.com"), 4);
        assert_eq!(pick("svc.example.com:8080"), 4, "with the port first");
        assert_eq!(pick("svc.example.com:9090"), 2, "then without it");
        assert_eq!(pick("x.b.example.com"), 3, "the longest suffix");
        assert_eq!(pick("api.other"), 1);
        assert_eq!(pick("Other:1"), 0);
    }

    fn head(path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::post(format!("http://svc{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).expect("request").into_parts().0
    }

    fn route(path: PathMatch, case_sensitive: bool, headers: Vec<HeaderMatch>) -> RouteRes {
        RouteRes {
            path,
            case_sensitive,
            headers,
            fraction: None,
            action: RouteAction::NonForwarding,
        }
    }

    #[test]
    fn routes_match_paths_and_headers_as_grpc_does() {
        let r = route(PathMatch::Prefix("/pkg.Svc/".to_owned()), true, Vec::new());
        assert!(matches(&r, &head("/pkg.Svc/Get", &[])));
        assert!(!matches(&r, &head("/PKG.svc/Get", &[])));
        let r = route(PathMatch::Prefix("/pkg.svc/".to_owned()), false, Vec::new());
        assert!(matches(&r, &head("/PKG.Svc/Get", &[])));
        let r = route(PathMatch::Path("/a.B/C".to_owned()), true, Vec::new());
        assert!(matches(&r, &head("/a.B/C", &[])) && !matches(&r, &head("/a.B/Cd", &[])));
        let re = regex::Regex::new("^(?:/a\\.B/.*)$").expect("regex");
        let r = route(PathMatch::Regex(re), true, Vec::new());
        assert!(matches(&r, &head("/a.B/X", &[])));

        let header = |name: &str, rule: HeaderRule, invert: bool| HeaderMatch {
            name: name.to_owned(),
            rule,
            invert,
        };
        let any = PathMatch::Prefix(String::new());
        let cases = [
            (
                header("x-t", HeaderRule::Exact("a,b".to_owned(), false), false),
                vec![("x-t", "a"), ("x-t", "b")],
                true,
            ),
            (
                header("x-t", HeaderRule::Exact("acme".to_owned(), true), false),
                vec![("x-t", "ACME")],
                true,
            ),
            (
                header("x-t", HeaderRule::Prefix("ac".to_owned(), false), false),
                vec![("x-t", "acme")],
                true,
            ),
            (
                header("x-t", HeaderRule::Suffix("me".to_owned(), false), false),
                vec![("x-t", "acme")],
                true,
            ),
            (
                header("x-t", HeaderRule::Contains("cm".to_owned(), false), false),
                vec![("x-t", "acme")],
                true,
            ),
            (
                header("x-n", HeaderRule::Range(10, 20), false),
                vec![("x-n", "15")],
                true,
            ),
            (
                header("x-n", HeaderRule::Range(10, 20), false),
                vec![("x-n", "20")],
                false,
            ),
            (
                header("x-t", HeaderRule::Present(true), false),
                vec![],
                false,
            ),
            (header("x-t", HeaderRule::Present(true), true), vec![], true),
            (
                header("x-t", HeaderRule::Exact("a".to_owned(), false), true),
                vec![("x-t", "b")],
                true,
            ),
            (
                header("x-t-bin", HeaderRule::Present(true), false),
                vec![("x-t-bin", "AAEC")],
                false,
            ),
            (
                header(
                    "content-type",
                    HeaderRule::Prefix("application/grpc".to_owned(), false),
                    false,
                ),
                vec![("content-type", "application/grpc+proto")],
                true,
            ),
        ];
        for (i, (h, headers, want)) in cases.into_iter().enumerate() {
            let r = route(any.clone(), true, vec![h]);
            assert_eq!(matches(&r, &head("/a.B/C", &headers)), want, "case {i}");
        }
    }

    #[test]
    fn the_deadline_cap_follows_grfc_a31() {
        let s = Duration::from_secs;
        assert_eq!(cap(None, Some(s(5)), Some(s(9))), Some(s(5)));
        assert_eq!(cap(None, None, Some(s(9))), Some(s(9)));
        assert_eq!(cap(Some(s(2)), Some(s(5)), None), Some(s(2)));
        assert_eq!(cap(Some(Duration::ZERO), Some(s(5)), None), None);
        assert_eq!(cap(None, Some(Duration::ZERO), None), None);
    }

    #[test]
    fn weighted_clusters_are_picked_in_proportion() {
        let clusters = [(Arc::from("a"), 1), (Arc::from("b"), 3)];
        let b = (0..4000)
            .filter(|_| pick_weighted(&clusters) == "b")
            .count();
        assert!((2700..3300).contains(&b), "{b}");
    }
}
