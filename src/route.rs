//! The built-in director: the config's `[[routes]]`, compiled once and
//! tried in order for every call.

use std::sync::Arc;

use http::{HeaderName, request::Parts};
use sluice_layers::{
    direct::{
        Destination, Director, Edits, FanOut, Mirror, Mode, OnError, Overflow, Refusal, Route,
        Secondary,
    },
    grpc::{status::Code, wire},
    identity::{IdentityRule, PeerIdentity},
    peek::PeekedMessage,
};

use crate::config::{
    CompressedMatch, Config, DEFAULT_GROUP, Fallback, FanoutMode, FieldMatch, OnErrorConfig,
    OverflowConfig, RouteConfig, SecondaryConfig, TextMatch,
};

/// The endpoint names of a group, for a fan-out over all of them (the
/// group's current endpoints, which DNS may change).
pub type Members = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// The routes of a config, ready to match: sluice's built-in
/// [`Director`].
///
/// One pointer: every connection's stack holds a copy, so its size is paid
/// per idle connection.
#[derive(Clone)]
pub struct Routes {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Box<[Compiled]>,
    fallback: Fallback,
    /// The fallback route, built once: cloning it is a reference count.
    default_route: Route,
    members: Members,
    /// `[fanout] streaming_methods`.
    streaming: Box<[Glob]>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("routes", &self.inner.routes)
            .field("fallback", &self.inner.fallback)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Compiled {
    method: Option<Glob>,
    authority: Option<String>,
    metadata: Vec<(HeaderName, TextMatch)>,
    field: Option<FieldMatch>,
    /// Who may make the calls the route matches.
    identity: Option<IdentityRule>,
    action: Action,
}

#[derive(Clone, Debug)]
enum Action {
    Forward(Route),
    Refuse(Refusal),
    FanOut(FanoutAction),
}

/// A fan-out whose destinations are found per call.
#[derive(Clone, Debug)]
struct FanoutAction {
    group: Arc<str>,
    /// The metadata key naming the endpoints, if any.
    key: Option<HeaderName>,
    /// The route's mode; without one, by `[fanout] streaming_methods`.
    mode: Option<Mode>,
    timeout: Option<std::time::Duration>,
    name: Option<Arc<str>>,
    edits: Option<Arc<Edits>>,
}

/// A `*` pattern: literal pieces that must appear in order, the first at
/// the start and the last at the end.
#[derive(Debug)]
struct Glob {
    pieces: Vec<String>,
}

// === impl Routes ===

impl Routes {
    /// Compiles the config's `[[routes]]` and `[routing]` fallback. A
    /// fan-out over a whole group sends to the endpoints the config lists
    /// (see [`Routes::with_members`] for the live ones).
    pub fn from_config(config: &Config) -> Self {
        let groups: std::collections::HashMap<String, Vec<String>> = config
            .upstreams
            .iter()
            .map(|(name, g)| {
                let names = g
                    .endpoints
                    .iter()
                    .map(|e| match e {
                        crate::config::EndpointConfig::Detailed { ids, .. } if !ids.is_empty() => {
                            ids[0].clone()
                        }
                        e => e.address().to_string(),
                    })
                    .collect();
                (name.clone(), names)
            })
            .collect();
        let members: Members =
            Arc::new(move |group: &str| groups.get(group).cloned().unwrap_or_default());
        Self::with_members(config, members)
    }

    /// Compiles the routes, with `members` telling a whole-group fan-out
    /// the endpoints of a group at the time of each call.
    pub fn with_members(config: &Config, members: Members) -> Self {
        let globs: Vec<Glob> = config
            .fanout
            .streaming_methods
            .iter()
            .map(|g| Glob::new(g))
            .collect();
        Self {
            inner: Arc::new(Inner {
                routes: config.routes.iter().map(compile).collect(),
                streaming: globs.into(),
                fallback: config.routing.fallback,
                default_route: Route::to(DEFAULT_GROUP),
                members,
            }),
        }
    }

    /// Whether any route looks at the first message (so some calls must
    /// be peeked).
    pub(crate) fn needs_peek(&self) -> bool {
        self.inner.routes.iter().any(|r| r.field.is_some())
    }

    /// Whether the call with head `parts` must be peeked: a route on the
    /// first message could still decide it, because no earlier route
    /// decides on the head alone. Every other call is never read ahead.
    pub(crate) fn wants_peek(&self, parts: &Parts) -> bool {
        for route in self.inner.routes.iter() {
            if !route.head_matches(parts) {
                continue;
            }
            if route.field.is_some() {
                return true;
            }
            if let Action::FanOut(f) = &route.action
                && f.key
                    .as_ref()
                    .is_some_and(|k| !parts.headers.contains_key(k))
            {
                // A keyed fan-out without its key passes the call on.
                continue;
            }
            return false;
        }
        false
    }

    /// One line per route, for `sluice check`.
    pub(crate) fn describe(config: &Config) -> Vec<String> {
        let mut lines: Vec<String> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| describe(i, r))
            .collect();
        lines.push(match config.routing.fallback {
            Fallback::Upstream => {
                format!("otherwise → {DEFAULT_GROUP} ({})", config.upstream.address)
            }
            Fallback::Unimplemented => "otherwise → refuse UNIMPLEMENTED".to_owned(),
        });
        lines
    }
}

fn describe(i: usize, r: &RouteConfig) -> String {
    let mut conditions = Vec::new();
    if let Some(m) = &r.method {
        conditions.push(format!("method {m}"));
    }
    if let Some(a) = &r.authority {
        conditions.push(format!("authority {a}"));
    }
    for (k, m) in &r.metadata {
        conditions.push(match m {
            TextMatch::Equals(v) => format!("{k} = {v:?}"),
            TextMatch::Prefix(v) => format!("{k} starts with {v:?}"),
            TextMatch::Regex(re) => format!("{k} matches /{re}/"),
            TextMatch::Present(true) => format!("{k} present"),
            TextMatch::Present(false) => format!("{k} absent"),
        });
    }
    if let Some(f) = &r.field {
        let test = match (&f.equals, &f.prefix, f.int, f.present) {
            (Some(v), ..) => format!("= {v:?}"),
            (None, Some(v), ..) => format!("starts with {v:?}"),
            (None, None, Some(n), _) => format!("= {n}"),
            (None, None, None, Some(false)) => "absent".to_owned(),
            _ => "present".to_owned(),
        };
        conditions.push(format!("first message field {} {test}", f.path));
    }
    let when = if conditions.is_empty() {
        "every call".to_owned()
    } else {
        format!("when {}", conditions.join(" and "))
    };
    let then = match (&r.upstream, &r.refuse, &r.fanout, &r.mirror) {
        (Some(group), ..) => format!("→ {}", group.get_ref()),
        (None, Some(refuse), ..) => format!(
            "→ refuse with grpc-status {} {:?}",
            refuse.code.as_i32(),
            refuse.message
        ),
        (None, None, Some(f), _) => {
            let which = match &f.key {
                Some(k) => format!("the endpoints of {} named by {k}", f.group.get_ref()),
                None => format!("every endpoint of {}", f.group.get_ref()),
            };
            let mode = match f.mode {
                Some(FanoutMode::Merge) => "merged",
                Some(FanoutMode::MergeByArrival) => "merged by arrival",
                Some(FanoutMode::Interleave) => "interleaved",
                None => "merged (interleaved for [fanout] streaming_methods)",
            };
            format!("→ fan out to {which}, replies {mode}")
        }
        (None, None, None, Some(m)) => {
            let secondaries: Vec<String> = m
                .secondaries
                .iter()
                .map(|s| match s {
                    SecondaryConfig::Group(g) => format!("{g} (block, swallow)"),
                    SecondaryConfig::Detailed {
                        upstream,
                        overflow,
                        on_error,
                    } => format!(
                        "{} ({}, {})",
                        upstream,
                        match overflow {
                            OverflowConfig::Block => "block",
                            OverflowConfig::Drop => "drop",
                        },
                        match on_error {
                            OnErrorConfig::Swallow => "swallow",
                            OnErrorConfig::Fail => "fail",
                        }
                    ),
                })
                .collect();
            format!(
                "→ mirror: {} answers, copies to {}",
                m.primary.get_ref(),
                secondaries.join(", ")
            )
        }
        _ => "→ ?".to_owned(),
    };
    let name = r
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let cap = r
        .timeout
        .map(|t| format!(" (deadline capped at {t:?})"))
        .unwrap_or_default();
    let only = r
        .identity
        .as_ref()
        .map(|id| {
            format!(
                " (only for {}; others PERMISSION_DENIED)",
                id.rule().describe()
            )
        })
        .unwrap_or_default();
    format!("route {i}{name}: {when} {then}{cap}{only}")
}

/// A route's `enrich` as destination edits (validate() checked the keys).
fn edits(r: &RouteConfig) -> Option<Arc<Edits>> {
    let e = r.enrich.as_ref()?;
    let name = |k: &str| HeaderName::try_from(k.to_ascii_lowercase()).ok();
    let value = |v: &str| http::HeaderValue::try_from(v).ok();
    let mut edits = Edits::new();
    for k in e.remove.iter().filter_map(|k| name(k)) {
        edits = edits.remove(k);
    }
    for (k, v) in &e.set {
        if let (Some(k), Some(v)) = (name(k), value(v)) {
            edits = edits.set(k, v);
        }
    }
    for (k, v) in &e.append {
        if let (Some(k), Some(v)) = (name(k), value(v)) {
            edits = edits.append(k, v);
        }
    }
    (!edits.is_empty()).then(|| Arc::new(edits))
}

fn compile(r: &RouteConfig) -> Compiled {
    let edits = edits(r);
    let destination = |group: &str| {
        let mut destination = Destination::new(group);
        if let Some(timeout) = r.timeout {
            destination = destination.with_timeout(timeout);
        }
        if let Some(edits) = &edits {
            destination = destination.with_edits(edits.clone());
        }
        destination
    };
    let action = match (&r.upstream, &r.refuse, &r.fanout, &r.mirror) {
        (Some(group), ..) => Action::Forward(Route::One(destination(group.get_ref()))),
        (None, Some(refuse), ..) => {
            Action::Refuse(Refusal::new(refuse.code, refuse.message.clone()))
        }
        (None, None, Some(f), _) => {
            let mode = f.mode.map(|m| match m {
                FanoutMode::Merge => Mode::Merge,
                FanoutMode::MergeByArrival => Mode::MergeByArrival,
                FanoutMode::Interleave => Mode::Interleave,
            });
            Action::FanOut(FanoutAction {
                edits: edits.clone(),
                group: Arc::from(f.group.get_ref().as_str()),
                key: f
                    .key
                    .as_deref()
                    .and_then(|k| HeaderName::try_from(k.to_ascii_lowercase()).ok()),
                mode,
                timeout: r.timeout,
                name: r.name.as_deref().map(Arc::from),
            })
        }
        (None, None, None, Some(m)) => {
            let secondaries = m
                .secondaries
                .iter()
                .map(|s| {
                    let secondary = Secondary::new(destination(s.upstream()));
                    match s {
                        SecondaryConfig::Group(_) => secondary,
                        SecondaryConfig::Detailed {
                            overflow, on_error, ..
                        } => secondary
                            .overflow(match overflow {
                                OverflowConfig::Block => Overflow::Block,
                                OverflowConfig::Drop => Overflow::Drop,
                            })
                            .on_error(match on_error {
                                OnErrorConfig::Swallow => OnError::Swallow,
                                OnErrorConfig::Fail => OnError::Fail,
                            }),
                    }
                })
                .collect();
            let mut mirror = Mirror::new(destination(m.primary.get_ref()), secondaries);
            if let Some(name) = &r.name {
                mirror = mirror.named(name.as_str());
            }
            Action::Forward(Route::Mirror(mirror))
        }
        // validate() refuses such a route; match nothing rather than panic.
        _ => Action::Refuse(Refusal::new(Code::Internal, "route without an action")),
    };
    Compiled {
        method: r.method.as_deref().map(Glob::new),
        authority: r.authority.clone(),
        metadata: r
            .metadata
            .iter()
            .filter_map(|(k, m)| {
                Some((
                    HeaderName::try_from(k.to_ascii_lowercase()).ok()?,
                    m.clone(),
                ))
            })
            .collect(),
        field: r.field.clone(),
        identity: r.identity.as_ref().map(crate::config::IdentityConfig::rule),
        action,
    }
}

impl Director for Routes {
    fn direct(&mut self, parts: &Parts, peeked: &[PeekedMessage]) -> Result<Route, Refusal> {
        for route in self.inner.routes.iter() {
            if !route.matches(parts, peeked) {
                continue;
            }
            let decision = match &route.action {
                Action::Forward(r) => Ok(r.clone()),
                Action::Refuse(r) => Err(r.clone()),
                Action::FanOut(f) => match self.fan_out(f, parts) {
                    Some(decision) => decision,
                    // The key is absent: this route is not for the call.
                    None => continue,
                },
            };
            // Only once the route is the call's: a route that passes the
            // call on must not refuse it.
            if let Some(rule) = &route.identity {
                // Says what is missing, never what would have passed.
                let identity = parts.extensions.get::<PeerIdentity>();
                if !rule.permits(identity) {
                    let message = if identity.is_none() {
                        "this method requires a verified client certificate"
                    } else {
                        "the client's identity is not permitted to call this method"
                    };
                    return Err(Refusal::new(Code::PermissionDenied, message));
                }
            }
            return decision;
        }
        match self.inner.fallback {
            Fallback::Upstream => Ok(self.inner.default_route.clone()),
            Fallback::Unimplemented => Err(Refusal::new(
                Code::Unimplemented,
                format!("no route for {}", parts.uri.path()),
            )),
        }
    }
}

impl Routes {
    /// The destinations of a fan-out for the call with head `parts`:
    /// `None` when the route has a key and the call does not carry it; a
    /// refusal when the key names more destinations than the group has
    /// endpoints (each would cost an upstream call: a client must not be
    /// able to multiply its call beyond the group).
    fn fan_out(&self, f: &FanoutAction, parts: &Parts) -> Option<Result<Route, Refusal>> {
        let ids: Vec<String> = match &f.key {
            None => (self.inner.members)(&f.group),
            Some(key) => {
                let mut ids = Vec::new();
                for value in parts.headers.get_all(key) {
                    let text = value.to_str().unwrap_or_default();
                    for id in text.split(',').map(str::trim).filter(|id| !id.is_empty()) {
                        if !ids.iter().any(|seen| seen == id) {
                            ids.push(id.to_owned());
                        }
                    }
                }
                if ids.is_empty() {
                    return None;
                }
                let endpoints = (self.inner.members)(&f.group).len();
                if ids.len() > endpoints {
                    return Some(Err(Refusal::new(
                        Code::InvalidArgument,
                        format!(
                            "{key} names {} destinations; group {} has {endpoints} endpoints",
                            ids.len(),
                            f.group
                        ),
                    )));
                }
                ids
            }
        };
        let destinations = ids
            .into_iter()
            .map(|id| {
                let mut d = Destination::new(f.group.clone()).with_endpoint(id);
                if let Some(t) = f.timeout {
                    d = d.with_timeout(t);
                }
                if let Some(e) = &f.edits {
                    d = d.with_edits(e.clone());
                }
                d
            })
            .collect();
        let mode = f.mode.unwrap_or_else(|| {
            let path = parts.uri.path();
            if self.inner.streaming.iter().any(|g| g.matches(path)) {
                Mode::Interleave
            } else {
                Mode::Merge
            }
        });
        let mut route = FanOut::new(destinations, mode);
        if let Some(key) = &f.key {
            route = route.strip(key.clone());
        }
        if let Some(name) = &f.name {
            route = route.named(name.clone());
        }
        Some(Ok(Route::FanOut(route)))
    }
}

// === impl Compiled ===

impl Compiled {
    fn matches(&self, parts: &Parts, peeked: &[PeekedMessage]) -> bool {
        if !self.head_matches(parts) {
            return false;
        }
        if let Some(field) = &self.field {
            // A route that requires identities fails closed: a compressed
            // first message, whose fields cannot be read, counts as a
            // match, so that compressing cannot skip the requirement.
            if self.identity.is_some() && peeked.first().is_some_and(PeekedMessage::compressed) {
                return true;
            }
            return field_matches(field, peeked.first());
        }
        true
    }

    /// Whether the conditions on the call's head (method, authority,
    /// metadata) hold.
    fn head_matches(&self, parts: &Parts) -> bool {
        if let Some(glob) = &self.method
            && !glob.matches(parts.uri.path())
        {
            return false;
        }
        if let Some(authority) = &self.authority
            && parts.uri.authority().map(|a| a.as_str()) != Some(authority.as_str())
        {
            return false;
        }
        for (key, m) in &self.metadata {
            let value = parts.headers.get(key).and_then(|v| v.to_str().ok());
            let ok = match (m, value) {
                (TextMatch::Present(want), v) => v.is_some() == *want,
                (TextMatch::Equals(want), Some(v)) => v == want,
                (TextMatch::Prefix(want), Some(v)) => v.starts_with(want.as_str()),
                (TextMatch::Regex(re), Some(v)) => re.is_match(v),
                (_, None) => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// A field condition on the first message. A compressed message never
/// matches: its bytes are not protobuf until decompressed.
fn field_matches(m: &FieldMatch, first: Option<&PeekedMessage>) -> bool {
    let Some(first) = first else {
        return false;
    };
    if first.compressed() {
        // Its bytes are not protobuf until decompressed: the route says
        // what such a call gets (a refuse route says `match`, so that
        // compressing cannot bypass it).
        return m.compressed == CompressedMatch::Match;
    }
    let value = wire::find(first.payload(), &m.path);
    if let Some(want) = m.present {
        return value.is_some() == want;
    }
    let Some(value) = value else {
        return false;
    };
    if let Some(want) = &m.equals {
        return value.as_str() == Some(want.as_str());
    }
    if let Some(want) = &m.prefix {
        return value.as_str().is_some_and(|v| v.starts_with(want.as_str()));
    }
    if let Some(want) = m.int {
        return value.as_u64() == Some(want);
    }
    true
}

// === impl Glob ===

impl Glob {
    fn new(pattern: &str) -> Self {
        Self {
            pieces: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    fn matches(&self, text: &str) -> bool {
        let [first, middle @ .., last] = self.pieces.as_slice() else {
            // One piece: no `*`, an exact match.
            return self.pieces.first().is_some_and(|p| p == text);
        };
        let Some(mut rest) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        for piece in middle {
            match rest.find(piece.as_str()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        let g = |p: &str, t: &str| Glob::new(p).matches(t);
        assert!(g("/pkg.Svc/Get", "/pkg.Svc/Get"));
        assert!(!g("/pkg.Svc/Get", "/pkg.Svc/GetAll"));
        assert!(g("/pkg.Svc/*", "/pkg.Svc/Get"));
        assert!(!g("/pkg.Svc/*", "/pkg.Other/Get"));
        assert!(g("/pkg.*", "/pkg.Svc/Get"));
        assert!(g("*", "/anything"));
        assert!(g("/*/Get", "/a.B/Get"));
        assert!(!g("/*/Get", "/a.B/Put"));
        assert!(g("/a*b*c", "/axxbyyc"));
        assert!(!g("/a*b*c", "/axxcyyb"));
        assert!(!g("/ab*ba", "/aba"), "pieces may not overlap");
    }

    fn head(path: &str, metadata: &[(&str, &str)], identity: Option<&str>) -> Parts {
        let mut req = http::Request::post(format!("http://x{path}"));
        for (k, v) in metadata {
            req = req.header(*k, *v);
        }
        let (mut parts, ()) = req.body(()).expect("request").into_parts();
        if let Some(id) = identity {
            parts
                .extensions
                .insert(PeerIdentity::new(sluice_layers::identity::IdentityParts {
                    uris: vec![id.to_owned()],
                    ..Default::default()
                }));
        }
        parts
    }

    #[test]
    fn an_identity_rule_binds_only_calls_the_route_takes_and_fails_closed_on_compression() {
        let tls = "[server.tls]\ncert = \"c\"\nkey = \"k\"\nclient_auth = { ca = \"ca\" }\n";
        let config = Config::from_toml_str(&format!(
            "{tls}[upstreams.nodes]\nendpoints = [{{ address = \"127.0.0.1:1\", ids = [\"n1\"] }}]\n\
             [[routes]]\nmethod = \"/a.B/Fan\"\nfanout = {{ group = \"nodes\", key = \"nodes\" }}\n\
             identity = {{ exact = [\"spiffe://td/admin\"] }}\n\
             [[routes]]\nmethod = \"/a.B/Put\"\nfield = {{ path = \"1\", equals = \"secret\" }}\nupstream = \"default\"\n\
             identity = {{ exact = [\"spiffe://td/admin\"] }}\n\
             [[routes]]\nupstream = \"default\"\n"
        ))
        .expect("config");
        let mut routes = Routes::from_config(&config);
        let denied =
            |r: &Result<Route, Refusal>| matches!(r, Err(e) if e.code() == Code::PermissionDenied);
        // A keyed fan-out without its key passes the call on: no refusal.
        let r = routes.direct(&head("/a.B/Fan", &[], Some("spiffe://td/other")), &[]);
        assert!(matches!(r, Ok(Route::One(_))), "{r:?}");
        let r = routes.direct(
            &head("/a.B/Fan", &[("nodes", "n1")], Some("spiffe://td/other")),
            &[],
        );
        assert!(denied(&r));
        let r = routes.direct(
            &head("/a.B/Fan", &[("nodes", "n1")], Some("spiffe://td/admin")),
            &[],
        );
        assert!(matches!(r, Ok(Route::FanOut(_))), "{r:?}");
        // A field route: the field's value decides, unless the message is
        // compressed; then the rule applies (fails closed).
        let secret = PeekedMessage::new(bytes::Bytes::from_static(b"\x0a\x06secret"));
        let r = routes.direct(&head("/a.B/Put", &[], None), std::slice::from_ref(&secret));
        assert!(denied(&r));
        let other = PeekedMessage::new(bytes::Bytes::from_static(b"\x0a\x05other"));
        let r = routes.direct(&head("/a.B/Put", &[], None), &[other]);
        assert!(
            matches!(r, Ok(Route::One(_))),
            "not the field's value: the next route"
        );
        let squeezed = secret.with_compressed(true);
        let r = routes.direct(&head("/a.B/Put", &[], None), &[squeezed]);
        assert!(denied(&r), "compressing does not skip the rule: {r:?}");
    }
}
