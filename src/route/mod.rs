//! The built-in director: the config's `[[routes]]`, compiled once into
//! an index and matched in order for every call (the first route whose
//! conditions hold takes the call, as if every route were tried in turn).

mod compile;
mod describe;
mod glob;
mod index;

use std::{collections::HashSet, sync::Arc};

use http::request::Parts;
use sluice_layers::{
    direct::{Destination, Director, FanOut, Mode, Refusal, Route},
    grpc::status::Code,
    identity::PeerIdentity,
    peek::PeekedMessage,
};

pub(crate) use self::describe::describe;
use self::{
    compile::{Action, Compiled, FanoutAction, compile},
    glob::Glob,
    index::Index,
};
use crate::config::{Config, DEFAULT_GROUP, Fallback};

/// The endpoint names of a group, for a fan-out over all of them (the
/// group's current endpoints, which DNS may change).
pub type Members = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// The routes of a config, ready to match: sluice's built-in
/// [`Director`].
///
/// One pointer: every connection's stack holds a copy, so its size is paid
/// per idle connection.
#[derive(Clone)]
pub struct RouteTable {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Box<[Compiled]>,
    /// Which routes a call could match.
    index: Index,
    fallback: Fallback,
    /// The fallback route, built once: cloning it is a reference count.
    default_route: Route,
    /// Where calls no route takes go instead of the fallback, when
    /// something else routes them (xDS).
    unmatched: Option<Route>,
    members: Members,
    /// `[fanout] streaming_methods`.
    streaming: Box<[Glob]>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.inner.routes)
            .field("fallback", &self.inner.fallback)
            .finish_non_exhaustive()
    }
}

// === impl RouteTable ===

impl RouteTable {
    /// Compiles the config's `[[routes]]` and `[routing]` fallback. A
    /// fan-out over a whole group sends to the endpoints the config lists
    /// (see [`RouteTable::with_members`] for the live ones).
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
        Self::build(config, members, None)
    }

    /// [`RouteTable::with_members`], sending the calls no route takes to
    /// `unmatched` whatever `routing.fallback` says (the xDS layer routes
    /// them).
    pub(crate) fn leaving(config: &Config, members: Members, unmatched: Route) -> Self {
        Self::build(config, members, Some(unmatched))
    }

    fn build(config: &Config, members: Members, unmatched: Option<Route>) -> Self {
        let globs: Vec<Glob> = config
            .fanout
            .streaming_methods
            .iter()
            .map(|g| Glob::new(g))
            .collect();
        let routes: Box<[Compiled]> = config.routes.iter().enumerate().map(compile).collect();
        Self {
            inner: Arc::new(Inner {
                index: Index::build(&routes),
                routes,
                streaming: globs.into(),
                fallback: config.routing.fallback,
                default_route: Route::to(DEFAULT_GROUP),
                unmatched,
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
        for route in self.candidates(parts) {
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
}

impl Director for RouteTable {
    fn direct(&mut self, parts: &Parts, peeked: &[PeekedMessage]) -> Result<Route, Refusal> {
        for route in self.candidates(parts) {
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
                    tracing::debug!(
                        path = parts.uri.path(),
                        identity = identity.map_or("", PeerIdentity::id),
                        spiffe = ?identity.and_then(PeerIdentity::spiffe_error),
                        "{message}"
                    );
                    return Err(Refusal::new(Code::PermissionDenied, message));
                }
            }
            return decision;
        }
        if let Some(route) = &self.inner.unmatched {
            return Ok(route.clone());
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

impl RouteTable {
    /// The routes the call with head `parts` could match, in order.
    fn candidates<'a>(&'a self, parts: &Parts) -> impl Iterator<Item = &'a Compiled> {
        let routes = &self.inner.routes;
        self.inner.index.candidates(parts).map(move |i| &routes[i])
    }

    /// The destinations of a fan-out for the call with head `parts`:
    /// `None` when the route has a key and the call does not carry it; a
    /// refusal when the key names more destinations than the group has
    /// endpoints (each would cost an upstream call: a client must not be
    /// able to multiply its call beyond the group).
    fn fan_out(&self, f: &FanoutAction, parts: &Parts) -> Option<Result<Route, Refusal>> {
        let ids: Vec<String> = match &f.key {
            None => (self.inner.members)(&f.group),
            Some(key) => {
                let endpoints = (self.inner.members)(&f.group).len();
                // Bounded by the group's size, not the key's: the work
                // stops at the first id past the group's endpoints.
                let mut seen = HashSet::new();
                let mut ids = Vec::new();
                let names = parts
                    .headers
                    .get_all(key)
                    .iter()
                    .flat_map(|v| v.to_str().unwrap_or_default().split(','))
                    .map(str::trim)
                    .filter(|id| !id.is_empty());
                for id in names {
                    if !seen.insert(id) {
                        continue;
                    }
                    if ids.len() == endpoints {
                        return Some(Err(Refusal::new(
                            Code::InvalidArgument,
                            format!(
                                "{key} names more than {endpoints} destinations; group {} has {endpoints} endpoints",
                                f.group
                            ),
                        )));
                    }
                    ids.push(id.to_owned());
                }
                if ids.is_empty() {
                    return None;
                }
                ids
            }
        };
        let destinations = ids
            .into_iter()
            .map(|id| {
                let mut d = Destination::new(f.group.clone()).with_endpoint(id);
                if let Some(name) = &f.name {
                    d = d.with_route_name(name.clone());
                }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut routes = RouteTable::from_config(&config);
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

    /// Issue #17.5: a key naming thousands of ids is refused after
    /// reading one id more than the group has, not after de-duplicating
    /// all of them (which cost quadratic CPU).
    #[test]
    fn a_fanout_key_is_read_only_as_far_as_the_group_is_large() {
        let config = Config::from_toml_str(
            "[upstreams.nodes]\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n\
             [[routes]]\nfanout = { group = \"nodes\", key = \"nodes\" }\n",
        )
        .expect("config");
        let mut routes = RouteTable::from_config(&config);
        let ids: Vec<String> = (0..4_900).map(|i| format!("n{i}")).collect();
        let key = ids.join(",");
        let r = routes.direct(&head("/a.B/C", &[("nodes", &key)], None), &[]);
        let Err(refusal) = r else {
            panic!("refused: {r:?}")
        };
        assert_eq!(refusal.code(), Code::InvalidArgument);
        // It stopped at the third id: it cannot know there were 4,900.
        assert!(refusal.message().contains("more than 2"), "{refusal:?}");
        assert!(!refusal.message().contains("4900"), "{refusal:?}");
        // Repeats are one destination; as many as the group has pass.
        let r = routes.direct(
            &head(
                "/a.B/C",
                &[("nodes", "127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:1")],
                None,
            ),
            &[],
        );
        assert!(
            matches!(r, Ok(Route::FanOut(ref f)) if f.destinations().len() == 2),
            "{r:?}"
        );
    }
}
