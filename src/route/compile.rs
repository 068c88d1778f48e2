//! A `[[routes]]` entry compiled into the conditions and action a call
//! is matched against.

use std::sync::Arc;

use http::{HeaderName, request::Parts};
use sluice_layers::{
    direct::{Destination, Edits, Mirror, Mode, OnError, Overflow, Refusal, Route, Secondary},
    grpc::{status::Code, wire},
    identity::IdentityRule,
    peek::PeekedMessage,
};

use super::glob::Glob;
use crate::config::{
    CompressedMatch, FanoutMode, FieldMatch, OnErrorConfig, OverflowConfig, RouteConfig,
    SecondaryConfig, TextMatch,
};

#[derive(Debug)]
pub(super) struct Compiled {
    pub(super) method: Option<Glob>,
    pub(super) authority: Option<String>,
    pub(super) metadata: Vec<(HeaderName, TextMatch)>,
    pub(super) field: Option<FieldMatch>,
    /// Who may make the calls the route matches.
    pub(super) identity: Option<IdentityRule>,
    pub(super) action: Action,
}

#[derive(Clone, Debug)]
pub(super) enum Action {
    Forward(Route),
    Refuse(Refusal),
    FanOut(FanoutAction),
}

/// A fan-out whose destinations are found per call.
#[derive(Clone, Debug)]
pub(super) struct FanoutAction {
    pub(super) group: Arc<str>,
    /// The metadata key naming the endpoints, if any.
    pub(super) key: Option<HeaderName>,
    /// The route's mode; without one, by `[fanout] streaming_methods`.
    pub(super) mode: Option<Mode>,
    pub(super) timeout: Option<std::time::Duration>,
    pub(super) name: Option<Arc<str>>,
    pub(super) edits: Option<Arc<Edits>>,
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

pub(super) fn compile((index, r): (usize, &RouteConfig)) -> Compiled {
    let edits = edits(r);
    let policy = crate::balance::Policy::new(index, r);
    let destination = |group: &str| {
        let mut destination = Destination::new(group);
        if let Some(name) = &r.name {
            destination = destination.with_route_name(name.as_str());
        }
        if let Some(timeout) = r.timeout {
            destination = destination.with_timeout(timeout);
        }
        if let Some(edits) = &edits {
            destination = destination.with_edits(edits.clone());
        }
        if let Some(policy) = &policy {
            destination = destination.with_policy(policy.clone());
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

// === impl Compiled ===

impl Compiled {
    pub(super) fn matches(&self, parts: &Parts, peeked: &[PeekedMessage]) -> bool {
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
    pub(super) fn head_matches(&self, parts: &Parts) -> bool {
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
