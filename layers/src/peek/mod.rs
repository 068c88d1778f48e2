//! Middleware that lets the layers below read the first gRPC messages of a
//! request without consuming them.
//!
//! [`Peek`] reads the request body until it holds the first
//! [`max_messages`](PeekLayer::max_messages) complete messages (or the body
//! ends), puts them in the request's extensions as [`Peeked`], and hands
//! the inner service a [`ReplayBody`] that replays the bytes it read, then
//! streams the rest of the body on, unbuffered. Messages that lie in one
//! DATA chunk are not copied.
//!
//! - A request stream with no message at all (half-closed at once) still
//!   proceeds, with nothing peeked.
//! - Compressed messages (flag 1) are kept as they are:
//!   [`PeekedMessage::compressed`] says so, and predicates should not match
//!   on their bytes.
//! - Peeking more than [`max_bytes`](PeekLayer::max_bytes) (one big
//!   message, or many small ones) is refused with a trailers-only
//!   `RESOURCE_EXHAUSTED`: the budget bounds what a call can make the proxy
//!   hold. [`max_bytes_per_connection`](PeekLayer::max_bytes_per_connection)
//!   bounds what all the calls of one connection hold at once, until each
//!   call's peeked bytes are replayed. Which calls share a budget is the
//!   server's to say, with a [`ConnectionBudget`] in each request's
//!   extensions or a service made per connection
//!   ([`PeekLayer::per_connection`]): see [`ConnectionBudget`] for how,
//!   under tonic, hyper and sluice's own server.
//! - [`when`](PeekLayer::when) picks the calls to peek from their head
//!   (sluice peeks only calls that a route on message contents could still
//!   match); the others are never read ahead.
//! - The wait for the first messages is bounded by the call's
//!   `grpc-timeout` and by [`max_wait`](PeekLayer::max_wait)
//!   (`DEADLINE_EXCEEDED`): a client that waits for the server before
//!   sending cannot hold a call open with no answer. The `grpc-timeout`
//!   passed on is what is left of it.
//! - Reading is linear in the bytes read, however small the DATA frames.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Extensions, Request, Response, request::Parts};
//! use http_body_util::{BodyExt, Full};
//! use sluice_layers::peek::{PeekLayer, Peeked, ReplayBody};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! let mut svc = ServiceBuilder::new()
//!     .layer(PeekLayer::new())
//!     .service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
//!         // The first message is there to look at...
//!         let first = req.extensions().get::<Peeked>().and_then(|p| p.first()).cloned();
//!         assert_eq!(first.map(|m| m.payload().clone()), Some(Bytes::from_static(b"hello")));
//!         // ...and the body still carries every byte.
//!         let body = req.into_body().collect().await?.to_bytes();
//!         assert_eq!(&body[..], b"\0\0\0\0\x05hello");
//!         Ok::<_, sluice_layers::BoxError>(Response::new(Full::<Bytes>::default()))
//!     });
//! let req = Request::new(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello")));
//! svc.ready().await?.call(req).await?;
//! # Ok(())
//! # }
//! ```

mod body;
mod future;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Extensions, Request, Response, request::Parts};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

pub use self::{
    body::ReplayBody,
    future::{MakeFuture, ResponseFuture},
};
use crate::BoxError;

/// Messages peeked by default: the first one, which is what directors
/// route on (Gitaly's `StreamPeeker` reads exactly one).
pub const DEFAULT_MAX_MESSAGES: usize = 1;
/// Bytes a call may make the peek hold by default: 64 KiB, far above the
/// request messages routing looks at, small enough that 10 000 calls peeking
/// at once stay under 1 GiB.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;
/// Bytes all the calls of one connection may make the peek hold at once by
/// default: 1 MiB, sixteen calls at the full per-call budget.
pub const DEFAULT_MAX_BYTES_PER_CONNECTION: usize = 1 << 20;
/// How long a call may take to send its first messages by default: 10 s.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);

type When = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// The messages [`Peek`] read, in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Peeked {
    messages: Vec<PeekedMessage>,
}

/// One peeked message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeekedMessage {
    compressed: bool,
    payload: Bytes,
}

/// [`Layer`] that applies [`Peek`] middleware.
///
/// See the [module docs](crate::peek) for an example.
#[derive(Clone)]
pub struct PeekLayer {
    max_messages: usize,
    max_bytes: usize,
    max_bytes_per_connection: usize,
    max_wait: Duration,
    when: Option<When>,
    budget_from: BudgetFrom,
}

impl fmt::Debug for PeekLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeekLayer")
            .field("max_messages", &self.max_messages)
            .field("max_bytes", &self.max_bytes)
            .field("max_bytes_per_connection", &self.max_bytes_per_connection)
            .field("max_wait", &self.max_wait)
            .field("when", &self.when.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads a connection's [`ConnectionBudget`] out of a request's extensions
/// (see [`PeekLayer::budget_from`]).
pub type BudgetFrom = fn(&Extensions) -> Option<ConnectionBudget>;

/// The peek budget of one connection: the bytes that the peeks of all its
/// calls hold at once, checked against
/// [`max_bytes_per_connection`](PeekLayer::max_bytes_per_connection).
///
/// A handle: cheap to clone, every clone counts against the same bytes.
/// The budget belongs to whatever holds it, so it works however a server
/// clones its services:
///
/// - a server that can put a value in each request's extensions creates
///   one `ConnectionBudget` per connection and inserts a clone into every
///   request of that connection; [`Peek`] uses it (sluice's server does
///   this; under tonic, through the `ConnectInfo` of a custom
///   `Connected` type read by [`PeekLayer::budget_from`]);
/// - a server that makes one service per connection (a make-service, or a
///   hand-written accept loop) can use [`PeekLayer::per_connection`] or
///   [`Peek::with_budget`] instead.
///
/// Without either, each [`Peek`] *value* has a budget of its own, and a
/// clone starts a fresh one: right for a server that clones its stack once
/// per connection and calls that clone for every request, wrong for one
/// that clones per request (tonic, and hyper-util's `TowerToHyperService`).
///
/// Bytes are given back when each call's peeked bytes have been replayed
/// (or the call is dropped), so a budget no call holds is as good as new.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{BodyExt, Full};
/// use sluice_layers::peek::{ConnectionBudget, PeekLayer, ReplayBody};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sluice_layers::BoxError> {
/// let mut svc = ServiceBuilder::new()
///     .layer(PeekLayer::new())
///     .service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
///         req.into_body().collect().await?;
///         Ok::<_, sluice_layers::BoxError>(Response::new(Full::<Bytes>::default()))
///     });
///
/// // Per connection, in the server's accept loop:
/// let budget = ConnectionBudget::new();
/// // Per request of that connection:
/// let mut req = Request::new(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello")));
/// req.extensions_mut().insert(budget.clone());
/// svc.ready().await?.call(req).await?;
/// // The body was replayed: the connection holds nothing any more.
/// assert_eq!(budget.held(), 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct ConnectionBudget {
    held: Arc<AtomicUsize>,
}

/// A call's share of its connection's peek budget, given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: ConnectionBudget,
    bytes: usize,
}

impl Reservation {
    pub(crate) fn new(budget: ConnectionBudget) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Takes `n` more bytes; `false` (taking nothing) past `max`.
    pub(crate) fn take(&mut self, n: usize, max: usize) -> bool {
        let ok = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                h.checked_add(n).filter(|t| *t <= max)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Middleware that reads the first messages of each request body and
/// replays them to the inner service.
///
/// Which [`ConnectionBudget`] a call counts against, first match wins:
///
/// 1. the one in the request's extensions (read by
///    [`PeekLayer::budget_from`], by default a [`ConnectionBudget`]
///    extension);
/// 2. the one this service was made with by [`Peek::with_budget`] or
///    [`PeekLayer::per_connection`], shared by all its clones;
/// 3. otherwise one of this value's own: each clone starts a fresh one.
///
/// See the [module docs](crate::peek) for an example.
#[derive(Debug)]
pub struct Peek<S> {
    inner: S,
    // Behind a pointer: a server holds one copy of its stack per
    // connection.
    layer: Arc<PeekLayer>,
    budget: ConnectionBudget,
    /// Whether `budget` is the connection's (kept by clones) or this
    /// value's own (not kept).
    shared: bool,
}

impl<S: Clone> Clone for Peek<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
            budget: if self.shared {
                self.budget.clone()
            } else {
                ConnectionBudget::new()
            },
            shared: self.shared,
        }
    }
}

/// [`Layer`] for make-services: wraps each service a make-service makes
/// (one per connection) in a [`Peek`] with a [`ConnectionBudget`] of its
/// own, shared by all its clones.
///
/// Made by [`PeekLayer::per_connection`]; see there for an example.
#[derive(Clone, Debug)]
pub struct MakePeekLayer {
    layer: Arc<PeekLayer>,
}

/// A make-service whose services are [`Peek`]s, each with a fresh
/// [`ConnectionBudget`] shared by all its clones.
///
/// It is ready when the wrapped make-service is. Made by
/// [`MakePeekLayer`]; see [`PeekLayer::per_connection`] for an example.
#[derive(Clone, Debug)]
pub struct MakePeek<M> {
    inner: M,
    layer: Arc<PeekLayer>,
}

// === impl Peeked ===

impl Peeked {
    /// The messages, in order (fewer than asked for if the stream ended).
    pub fn messages(&self) -> &[PeekedMessage] {
        &self.messages
    }

    /// The first message, if the stream had one.
    pub fn first(&self) -> Option<&PeekedMessage> {
        self.messages.first()
    }
}

// === impl PeekedMessage ===

impl PeekedMessage {
    /// A message with this payload (no compression).
    pub fn new(payload: Bytes) -> Self {
        Self {
            compressed: false,
            payload,
        }
    }

    /// The same message, marked compressed (its flag byte 1) or not: for
    /// directors' tests.
    #[must_use]
    pub fn with_compressed(mut self, compressed: bool) -> Self {
        self.compressed = compressed;
        self
    }

    /// Whether the message is compressed (its flag byte is 1).
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// The message bytes, without the 5-byte prefix.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
}

// === impl PeekLayer ===

impl PeekLayer {
    /// Peeks [`DEFAULT_MAX_MESSAGES`] of every call within
    /// [`DEFAULT_MAX_BYTES`], [`DEFAULT_MAX_BYTES_PER_CONNECTION`] and
    /// [`DEFAULT_MAX_WAIT`].
    pub const fn new() -> Self {
        Self {
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_bytes_per_connection: DEFAULT_MAX_BYTES_PER_CONNECTION,
            max_wait: DEFAULT_MAX_WAIT,
            when: None,
            budget_from: budget_extension,
        }
    }

    /// Sets how many messages to peek.
    #[must_use]
    pub const fn max_messages(mut self, n: usize) -> Self {
        self.max_messages = n;
        self
    }

    /// Sets the byte budget; beyond it the call is refused with
    /// `RESOURCE_EXHAUSTED`.
    #[must_use]
    pub const fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Sets the budget of all the calls of one connection together; beyond
    /// it a call is refused with `RESOURCE_EXHAUSTED`. What "one
    /// connection" is depends on the server: see [`ConnectionBudget`].
    #[must_use]
    pub const fn max_bytes_per_connection(mut self, n: usize) -> Self {
        self.max_bytes_per_connection = n;
        self
    }

    /// Sets how long a call may take to send its first messages (its
    /// `grpc-timeout`, if shorter, wins); then it gets `DEADLINE_EXCEEDED`.
    #[must_use]
    pub const fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Peeks only the calls whose head `f` accepts; the others pass with
    /// nothing read ahead.
    #[must_use]
    pub fn when(mut self, f: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Arc::new(f));
        self
    }

    /// Sets where a call's [`ConnectionBudget`] is read from in its
    /// request's extensions (default: a `ConnectionBudget` extension).
    /// A call whose extensions hold none uses the service's own budget
    /// (see [`Peek`]).
    ///
    /// For a server that puts a per-connection value of its own type in
    /// the extensions: tonic inserts the `ConnectInfo` of its IO type,
    /// so a custom `Connected` IO can carry a budget per connection:
    ///
    /// ```
    /// use sluice_layers::peek::{ConnectionBudget, PeekLayer};
    ///
    /// /// The `ConnectInfo` of a custom tonic IO type (see
    /// /// `tonic::transport::server::Connected`), one per connection.
    /// #[derive(Clone)]
    /// struct ConnInfo {
    ///     tcp: tonic::transport::server::TcpConnectInfo,
    ///     budget: ConnectionBudget,
    /// }
    ///
    /// let layer = PeekLayer::new()
    ///     .budget_from(|ext| ext.get::<ConnInfo>().map(|c| c.budget.clone()));
    /// ```
    ///
    /// The crate's `tonic_server` example runs this under a real tonic
    /// server.
    #[must_use]
    pub const fn budget_from(mut self, f: BudgetFrom) -> Self {
        self.budget_from = f;
        self
    }

    /// A [`MakePeekLayer`]: for servers that make one service per
    /// connection through a make-service (axum's `serve`, a hyper-util
    /// accept loop), each service made gets a [`ConnectionBudget`] of its
    /// own that all its clones share, so the budget is the connection's
    /// even if the server clones the service for every request.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::Full;
    /// use sluice_layers::peek::{PeekLayer, ReplayBody};
    /// use tower::{Layer, Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), sluice_layers::BoxError> {
    /// // A make-service: one echo service per connection (the target, here
    /// // `()`, is whatever the server passes per connection).
    /// let make = service_fn(|_conn: ()| async {
    ///     Ok::<_, Infallible>(service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
    ///         Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    ///     }))
    /// });
    /// let mut make = PeekLayer::new().per_connection().layer(make);
    /// // Per connection:
    /// let conn = make.ready().await?.call(()).await?;
    /// // Per request (even on a fresh clone, as tonic and hyper-util do):
    /// let req = Request::new(Full::new(Bytes::from_static(b"\0\0\0\0\x01!")));
    /// conn.clone().oneshot(req).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn per_connection(self) -> MakePeekLayer {
        MakePeekLayer {
            layer: Arc::new(self),
        }
    }
}

/// The default of [`PeekLayer::budget_from`].
fn budget_extension(ext: &Extensions) -> Option<ConnectionBudget> {
    ext.get::<ConnectionBudget>().cloned()
}

// === impl ConnectionBudget ===

impl ConnectionBudget {
    /// A budget with nothing held: one per connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes the peeks of this connection's calls hold now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

// === impl MakePeekLayer ===

impl<M> Layer<M> for MakePeekLayer {
    type Service = MakePeek<M>;

    fn layer(&self, inner: M) -> Self::Service {
        MakePeek {
            inner,
            layer: self.layer.clone(),
        }
    }
}

// === impl MakePeek ===

impl<M> MakePeek<M> {
    inner_accessors!(M);
}

impl<M, T> Service<T> for MakePeek<M>
where
    M: Service<T>,
{
    type Response = Peek<M::Response>;
    type Error = M::Error;
    type Future = MakeFuture<M::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), M::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, target: T) -> Self::Future {
        MakeFuture::new(self.inner.call(target), self.layer.clone())
    }
}

impl Default for PeekLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for PeekLayer {
    type Service = Peek<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Peek {
            inner,
            layer: Arc::new(self.clone()),
            // Each value has a budget of its own unless the request brings
            // the connection's (see `Peek`).
            budget: ConnectionBudget::new(),
            shared: false,
        }
    }
}

// === impl Peek ===

impl<S> Peek<S> {
    /// Wraps `inner` with the default limits.
    pub fn new(inner: S) -> Self {
        PeekLayer::new().layer(inner)
    }

    /// Wraps `inner` for one connection: this service and all its clones
    /// count against `budget` (unless a request's extensions bring a
    /// budget of their own), with the limits of `layer`.
    pub fn with_budget(inner: S, layer: &PeekLayer, budget: ConnectionBudget) -> Self {
        Self::shared(inner, Arc::new(layer.clone()), budget)
    }

    pub(super) fn shared(inner: S, layer: Arc<PeekLayer>, budget: ConnectionBudget) -> Self {
        Self {
            inner,
            layer,
            budget,
            shared: true,
        }
    }

    inner_accessors!();
}

impl<S, B, RB> Service<Request<B>> for Peek<S>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<RB>> + Clone,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    /// Ready when the inner service is ready; the ready instance is the one
    /// the call uses once the messages are read.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let wanted =
            self.layer.max_messages > 0 && self.layer.when.as_ref().is_none_or(|when| when(&parts));
        let req = Request::from_parts(parts, body);
        if !wanted {
            // Nothing to peek: call the (ready) inner service at once, with
            // no clone and no buffering.
            let req = req.map(ReplayBody::passthrough);
            return ResponseFuture::calling(self.inner.call(req));
        }
        let budget =
            (self.layer.budget_from)(req.extensions()).unwrap_or_else(|| self.budget.clone());
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(ready, req, &self.layer, budget)
    }
}

#[cfg(test)]
mod tests;
