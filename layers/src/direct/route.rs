//! What a director decides: the [`Route`] of a call and its destinations.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Where a call goes; in the request's extensions after
/// [`Direct`](super::Direct).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// One destination.
    One(Destination),
    /// Every destination gets the call; their answers are merged
    /// (see [`fanout`](crate::fanout)).
    FanOut(FanOut),
    /// Every message goes to the primary and the secondaries; only the
    /// primary answers (see [`fanout`](crate::fanout#mirror)).
    Mirror(Mirror),
}

/// One destination of a route: a target (an upstream group's name),
/// optionally one endpoint of it, a deadline cap, and optionally the first
/// request message to send it instead of the client's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    target: Arc<str>,
    route: Option<Arc<str>>,
    endpoint: Option<Arc<str>>,
    first_message: Option<Bytes>,
    timeout: Option<Duration>,
    edits: Option<Arc<Edits>>,
    policy: Option<Policy>,
}

/// What the layers below a director make of a destination that the
/// director itself does not read (sluice's per-route retry, limits and
/// faults): any shared value, compared by identity.
#[derive(Clone)]
struct Policy(Arc<dyn std::any::Any + Send + Sync>);

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Policy {}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Policy(..)")
    }
}

/// Metadata a route changes on the calls it sends to a destination:
/// keys removed, then set, then appended. The forwarder applies them.
///
/// ```
/// use http::{HeaderMap, HeaderName, HeaderValue};
/// use sluice_layers::direct::Edits;
///
/// let edits = Edits::new()
///     .remove(HeaderName::from_static("x-debug"))
///     .set(HeaderName::from_static("x-tier"), HeaderValue::from_static("gold"));
/// let mut headers = HeaderMap::new();
/// headers.insert("x-debug", HeaderValue::from_static("1"));
/// edits.apply(&mut headers);
/// assert!(headers.get("x-debug").is_none());
/// assert_eq!(headers["x-tier"], "gold");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    append: Vec<(HeaderName, HeaderValue)>,
}

impl Edits {
    /// No edits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes `key`.
    #[must_use]
    pub fn remove(mut self, key: HeaderName) -> Self {
        self.remove.push(key);
        self
    }

    /// Sets `key` to `value`, replacing what was there.
    #[must_use]
    pub fn set(mut self, key: HeaderName, value: HeaderValue) -> Self {
        self.set.push((key, value));
        self
    }

    /// Adds `value` to `key`.
    #[must_use]
    pub fn append(mut self, key: HeaderName, value: HeaderValue) -> Self {
        self.append.push((key, value));
        self
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.append.is_empty()
    }

    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for key in &self.remove {
            headers.remove(key);
        }
        for (key, value) in &self.set {
            headers.insert(key.clone(), value.clone());
        }
        for (key, value) in &self.append {
            headers.append(key.clone(), value.clone());
        }
    }
}

/// A one-to-many route (Talos's `One2Many`): the call goes to every
/// destination, and the answers come back as one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanOut {
    destinations: Vec<Destination>,
    mode: Mode,
    strip: Vec<HeaderName>,
    name: Option<Arc<str>>,
}

/// How the answers of a fan-out become the client's one answer.
///
/// Whether a method streams is not visible on the wire (the request and
/// response of every gRPC method are a stream of messages), so the route
/// says which mode it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// For unary replies of the form `message R { repeated X messages = 1; }`:
    /// the entries of every destination are concatenated into one reply.
    #[default]
    Merge,
    /// Same as [`Mode::Merge`], entries in the order the destinations
    /// answered rather than the route's order.
    MergeByArrival,
    /// For streaming replies: every message of every destination is
    /// forwarded as it arrives.
    Interleave,
}

/// A mirroring route (Gitaly's primary and secondaries): every request
/// message goes to every destination, only the primary's answer reaches
/// the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    primary: Destination,
    secondaries: Vec<Secondary>,
    name: Option<Arc<str>>,
}

/// A destination that gets a copy of the call, and what happens when it
/// falls behind or fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secondary {
    destination: Destination,
    overflow: Overflow,
    on_error: OnError,
}

/// What a secondary's full queue does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// The client's next message waits until the secondary has room: the
    /// slowest destination paces the call, as Praefect does.
    #[default]
    Block,
    /// The secondary is cancelled and reported as dropped; the primary is
    /// never slowed by it.
    Drop,
}

/// What a secondary's failure does to the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnError {
    /// The failure is reported and the client gets the primary's answer.
    #[default]
    Swallow,
    /// The client gets the secondary's status (INTERNAL naming it) unless
    /// the primary failed first; the primary's trailers wait for it.
    Fail,
}

// === impl Route ===

impl Route {
    /// A route to one target.
    pub fn to(target: impl Into<Arc<str>>) -> Self {
        Self::One(Destination::new(target))
    }

    /// Every destination of the route, the primary first.
    pub fn destinations(&self) -> impl Iterator<Item = &Destination> {
        let (first, fanout, secondaries): (Option<&Destination>, &[Destination], &[Secondary]) =
            match self {
                Self::One(d) => (Some(d), &[], &[]),
                Self::FanOut(f) => (None, &f.destinations, &[]),
                Self::Mirror(m) => (Some(&m.primary), &[], &m.secondaries),
            };
        first
            .into_iter()
            .chain(fanout)
            .chain(secondaries.iter().map(Secondary::destination))
    }
}

impl From<FanOut> for Route {
    fn from(f: FanOut) -> Self {
        Self::FanOut(f)
    }
}

impl From<Mirror> for Route {
    fn from(m: Mirror) -> Self {
        Self::Mirror(m)
    }
}

// === impl Destination ===

impl Destination {
    /// A destination with no rewrite.
    pub fn new(target: impl Into<Arc<str>>) -> Self {
        Self {
            target: target.into(),
            route: None,
            endpoint: None,
            first_message: None,
            timeout: None,
            edits: None,
            policy: None,
        }
    }

    /// Attaches `policy` for the layers below to read with
    /// [`Destination::policy`]; the director layer passes it untouched.
    /// Cloning the destination clones one `Arc`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sluice_layers::direct::Destination;
    ///
    /// struct Retry { attempts: u32 }
    /// let d = Destination::new("billing").with_policy(Arc::new(Retry { attempts: 3 }));
    /// assert_eq!(d.policy::<Retry>().map(|r| r.attempts), Some(3));
    /// assert!(d.policy::<String>().is_none());
    /// ```
    #[must_use]
    pub fn with_policy<T: std::any::Any + Send + Sync>(mut self, policy: Arc<T>) -> Self {
        self.policy = Some(Policy(policy));
        self
    }

    /// The attached policy, if it is a `T`.
    pub fn policy<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        self.policy.as_ref()?.0.downcast_ref()
    }

    /// Changes the metadata of the calls sent to this destination (a
    /// route's own enrichment; a forwarder applies it).
    #[must_use]
    pub fn with_edits(mut self, edits: Arc<Edits>) -> Self {
        self.edits = Some(edits);
        self
    }

    /// The metadata edits, if any.
    pub fn edits(&self) -> Option<&Edits> {
        self.edits.as_deref()
    }

    /// Sends the call to the endpoint of the target group with this
    /// identifier (an address or one of its ids), rather than to one the
    /// group's strategies choose.
    #[must_use]
    pub fn with_endpoint(mut self, id: impl Into<Arc<str>>) -> Self {
        self.endpoint = Some(id.into());
        self
    }

    /// Caps the call's deadline at `timeout` for this destination (the
    /// client's `grpc-timeout`, if shorter, still wins).
    /// [`DeadlineLayer`](crate::deadline::DeadlineLayer) below enforces it.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The deadline cap, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Sends `message` as the first request message to this destination.
    #[must_use]
    pub fn with_first_message(mut self, message: Bytes) -> Self {
        self.first_message = Some(message);
        self
    }

    /// Names the route that chose this destination (for logs and
    /// metrics; routing does not read it).
    #[must_use]
    pub fn with_route_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.route = Some(name.into());
        self
    }

    /// The name of the route that chose this destination, if it has one.
    pub fn route_name(&self) -> Option<&Arc<str>> {
        self.route.as_ref()
    }

    /// The target's name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The endpoint asked for, if any.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The name a fan-out reports this destination by: the endpoint if one
    /// was asked for, else the target.
    pub fn name(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(&self.target)
    }

    /// The replacement first message, if any.
    pub fn first_message(&self) -> Option<&Bytes> {
        self.first_message.as_ref()
    }
}

// === impl FanOut ===

impl FanOut {
    /// A fan-out to `destinations`, answered in `mode`.
    pub fn new(destinations: Vec<Destination>, mode: Mode) -> Self {
        Self {
            destinations,
            mode,
            strip: Vec::new(),
            name: None,
        }
    }

    /// Removes `key` from the request each destination gets (the metadata
    /// key that chose the destinations, for one).
    #[must_use]
    pub fn strip(mut self, key: HeaderName) -> Self {
        self.strip.push(key);
        self
    }

    /// Names the route in reports.
    #[must_use]
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The destinations, in the route's order.
    pub fn destinations(&self) -> &[Destination] {
        &self.destinations
    }

    /// How the answers are put together.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The keys removed from each destination's request.
    pub fn stripped(&self) -> &[HeaderName] {
        &self.strip
    }

    /// The route's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

// === impl Mirror ===

impl Mirror {
    /// A mirror answered by `primary`, with copies to `secondaries`.
    pub fn new(primary: Destination, secondaries: Vec<Secondary>) -> Self {
        Self {
            primary,
            secondaries,
            name: None,
        }
    }

    /// Names the route in reports.
    #[must_use]
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The destination that answers.
    pub fn primary(&self) -> &Destination {
        &self.primary
    }

    /// The destinations that get copies.
    pub fn secondaries(&self) -> &[Secondary] {
        &self.secondaries
    }

    /// The route's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

// === impl Secondary ===

impl Secondary {
    /// A secondary that blocks when full and whose failures are swallowed.
    pub fn new(destination: Destination) -> Self {
        Self {
            destination,
            overflow: Overflow::default(),
            on_error: OnError::default(),
        }
    }

    /// What a full queue does.
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// What a failure does.
    #[must_use]
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// The destination.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The overflow policy.
    pub fn overflow_policy(&self) -> Overflow {
        self.overflow
    }

    /// The error policy.
    pub fn error_policy(&self) -> OnError {
        self.on_error
    }
}

impl From<Destination> for Secondary {
    fn from(destination: Destination) -> Self {
        Self::new(destination)
    }
}
