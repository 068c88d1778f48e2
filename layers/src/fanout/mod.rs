//! Middleware that sends one call to many destinations: fan-out (Talos's
//! one-to-many) and mirror (Gitaly's primary and secondaries).
//!
//! [`Fanout`] acts on the [`Route`] a [`Direct`](crate::direct::Direct)
//! above it put in the request's extensions. A [`Route::One`] call passes
//! through untouched. For a [`Route::FanOut`] or [`Route::Mirror`], the
//! inner service is called once per destination, with a request whose
//! extensions hold that destination alone as a [`Route::One`] (so a
//! [`DeadlineLayer`](crate::deadline::DeadlineLayer) below caps each
//! destination by its own timeout, and a forwarder below sends it there).
//!
//! Every destination gets the request bytes as the client sent them: the
//! client's body is read once, and each frame's `Bytes` is shared by
//! reference count through a queue of `queue` frames per destination. The
//! client's deadline (its `grpc-timeout` header) and cancellation apply to
//! every destination: dropping the response future or body cancels them
//! all.
//!
//! # Fan-out
//!
//! Whether a method streams is not visible on the wire (every gRPC request
//! and response is a stream of messages), so the route's [`Mode`] says how
//! answers are put together:
//!
//! - [`Mode::Merge`] (unary replies of the form `message R { repeated X
//!   messages = 1; }`): each destination's reply is read whole (within
//!   [`FanoutLayer::max_reply_bytes`], all destinations together;
//!   RESOURCE_EXHAUSTED beyond), and its entries are concatenated into one
//!   reply, in the route's order ([`Mode::MergeByArrival`]: as they
//!   arrived). Each entry gets the destination's `common.Metadata`
//!   appended at the wire level ([`AppendInfo`]); a destination that
//!   failed becomes an entry holding only that metadata, with the error
//!   and status. A reply that is not a list of field-1 entries fails the
//!   call with INTERNAL naming the destination, or, with
//!   [`Malformed::PassThrough`], is added unenriched and reported as
//!   [`Outcome::Malformed`]. Destinations are asked for uncompressed
//!   replies (`grpc-accept-encoding: identity`); a compressed reply is
//!   never rewritten, and counts as a failed destination.
//! - [`Mode::Interleave`] (server-streaming and bidi): every message of
//!   every destination is forwarded as it arrives, with the metadata
//!   appended to it (a message that is not protobuf fails that
//!   destination, or passes unenriched). Each destination has its own
//!   queue of `queue` messages: a slow destination holds back no other, and
//!   a client that stops reading stalls them all (nothing is buffered past
//!   the queues). The response headers are those of the first destination
//!   to send headers; the others' are dropped.
//!
//! The call ends OK unless every destination failed
//! ([`FanoutLayer::fail_when_any`]: unless any failed); then it carries the
//! first failure's code. The trailer `fanout-status`
//! ([`FanoutLayer::status_trailer`] renames it) lists each destination's
//! status (`node-1=OK, node-2=UNAVAILABLE`).
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderName, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use sluice_layers::direct::{Destination, FanOut, Mode, Route};
//! use sluice_layers::fanout::{FanoutLayer, RequestBody};
//! use sluice_layers::grpc::{framing, status, wire};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! // Each destination answers R { messages: [X { 2: "<its name>" }] }.
//! let upstreams = tower::service_fn(|req: Request<RequestBody<Full<Bytes>>>| async move {
//!     let route = req.extensions().get::<Route>().cloned().expect("one destination");
//!     let name = route.destinations().next().expect("one").name().to_owned();
//!     let mut entry = Vec::new();
//!     wire::put_len_field(&mut entry, 2, name.as_bytes());
//!     let mut reply = Vec::new();
//!     wire::put_len_field(&mut reply, 1, &entry);
//!     let body = Full::new(framing::encode(&reply))
//!         .with_trailers(std::future::ready(Some(Ok(status::trailers(status::Code::Ok, "")))));
//!     Ok::<_, sluice_layers::BoxError>(Response::new(body))
//! });
//! let svc = ServiceBuilder::new().layer(FanoutLayer::new()).service(upstreams);
//!
//! let route = FanOut::new(
//!     vec![Destination::new("nodes").with_endpoint("a"), Destination::new("nodes").with_endpoint("b")],
//!     Mode::Merge,
//! );
//! let mut req = Request::new(Full::new(framing::encode(b"")));
//! req.extensions_mut().insert(Route::FanOut(route));
//! let res = svc.oneshot(req).await?;
//! let body = res.into_body().collect().await?;
//! assert_eq!(status::code_of(body.trailers().expect("trailers")), Some(status::Code::Ok));
//! let bytes = body.to_bytes();
//! let entries = wire::repeated_entries(&bytes[framing::PREFIX_LEN..], 1).expect("a list");
//! assert_eq!(entries.len(), 2);
//! // Field 1 of each entry is the metadata: hostname = the destination.
//! let host = |e: &[u8]| wire::find(e, &"1.1".parse().unwrap()).and_then(|v| v.as_str().map(str::to_owned));
//! assert_eq!(host(entries[0]).as_deref(), Some("a"));
//! assert_eq!(host(entries[1]).as_deref(), Some("b"));
//! # Ok(())
//! # }
//! ```
//!
//! # Mirror
//!
//! A [`Route::Mirror`] sends every request message to the primary and to
//! each [`Secondary`](crate::direct::Secondary); the client gets the primary's answer, frame by
//! frame; the secondaries' replies are read and dropped. Each secondary
//! has a queue of `queue` frames and an [`Overflow`](crate::direct::Overflow) policy:
//! [`Overflow::Block`](crate::direct::Overflow::Block) (the slowest destination paces the client, as
//! Praefect does) or [`Overflow::Drop`](crate::direct::Overflow::Drop) (a secondary that falls behind is
//! cancelled and reported [`Outcome::Dropped`]; the primary is never slowed
//! by it). With [`OnError::Fail`](crate::direct::OnError::Fail) a secondary's failure turns an OK
//! primary's status into INTERNAL naming it (the primary's trailers then
//! wait for every secondary); with [`OnError::Swallow`](crate::direct::OnError::Swallow) it is only
//! reported. When the primary fails, the client gets its answer as it is.
//!
//! The reporter ([`FanoutLayer::on_report`]) is the finalizer: it runs
//! once per call, after the last destination ended, however the call
//! ended (a client's cancel included), with every destination's
//! [`Outcome`].
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use bytes::Bytes;
//! use http::{HeaderName, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use sluice_layers::direct::{Destination, Mirror, Overflow, Route, Secondary};
//! use sluice_layers::fanout::{FanoutLayer, Outcome, RequestBody};
//! use sluice_layers::grpc::{framing, status};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! let upstreams = tower::service_fn(|req: Request<RequestBody<Full<Bytes>>>| async move {
//!     let route = req.extensions().get::<Route>().cloned().expect("one destination");
//!     let name = route.destinations().next().expect("one").target().to_owned();
//!     let code = if name == "replica" { status::Code::Unavailable } else { status::Code::Ok };
//!     let body = Full::new(framing::encode(name.as_bytes()))
//!         .with_trailers(std::future::ready(Some(Ok(status::trailers(code, "down")))));
//!     Ok::<_, sluice_layers::BoxError>(Response::new(body))
//! });
//! let reports = Arc::new(Mutex::new(Vec::new()));
//! let seen = reports.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(FanoutLayer::new().on_report(move |r| seen.lock().unwrap().push(r.clone())))
//!     .service(upstreams);
//!
//! let route = Mirror::new(
//!     Destination::new("primary"),
//!     vec![Secondary::new(Destination::new("replica")).overflow(Overflow::Drop)],
//! );
//! let mut req = Request::new(Full::new(framing::encode(b"write")));
//! req.extensions_mut().insert(Route::Mirror(route));
//! let res = svc.oneshot(req).await?;
//! let body = res.into_body().collect().await?;
//! assert_eq!(status::code_of(body.trailers().expect("trailers")), Some(status::Code::Ok));
//! assert_eq!(&body.to_bytes()[framing::PREFIX_LEN..], b"primary");
//! # tokio::task::yield_now().await; // the report waits for the secondary
//! # while reports.lock().unwrap().is_empty() { tokio::task::yield_now().await; }
//! let reports = reports.lock().unwrap();
//! assert_eq!(reports[0].destinations[0].1, Outcome::Ok);
//! assert!(matches!(reports[0].destinations[1].1, Outcome::Failed { code: status::Code::Unavailable, .. }));
//! # Ok(())
//! # }
//! ```
//!
//! # Readiness and runtime
//!
//! [`Fanout`] is ready when its inner service is, and calls it directly
//! for a one-destination call. For several destinations it calls a clone
//! of the inner service per destination, after driving that clone's
//! readiness inside the call. Those calls run as tokio tasks (one per
//! destination, one reading the client's body), so the layer needs a tokio
//! runtime; they are cancelled with the call.
//!
//! # Memory
//!
//! Per call with N destinations: the request frames in flight, at most
//! `N × queue` frames (shared `Bytes`, so bounded by the client's flow
//! control window); in merge mode the replies, at most `max_reply_bytes`
//! in all, plus the merged copy; in interleave mode at most `N × (queue +
//! 1)` messages of up to `max_message_bytes` each.

mod append;
mod body;
mod call;
mod first;
mod interleave;
mod merge;
mod mirror;
mod report;
mod tee;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderName, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use self::report::Reporter;
pub use self::{
    append::{AppendInfo, MalformedReply},
    body::{RequestBody, ResponseBody},
    report::{Outcome, Report},
    tee::TeeError,
};
use crate::{
    BoxError,
    direct::{Mode, Route},
    grpc::status::Code,
};

/// The trailer that lists each destination's status by default (see
/// [`FanoutLayer::status_trailer`]).
pub const DEFAULT_STATUS_TRAILER: &str = "fanout-status";

/// The default queue per destination: 16 frames or messages, Praefect's.
pub const DEFAULT_QUEUE: usize = 16;

/// The default budget of a merged reply: 4 MiB, gRPC's default maximum
/// message size, past which a client would refuse the reply anyway.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 4 << 20;

/// The default largest message an interleaved destination may send: 4 MiB,
/// gRPC's default maximum message size.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Marks the request of a mirror secondary, which the fan-out may cut off
/// (when the secondary falls behind in `drop` mode, or the call ends).
///
/// A forwarder that resets such a request stream should say
/// `INTERNAL_ERROR`, not `CANCEL`: hyper (and so tonic) servers read a
/// request stream reset with `CANCEL` or `NO_ERROR` as a clean end, so a
/// client-streaming handler would take a cut-off copy for the whole
/// request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutOff;

/// How long mirror secondaries may run on once the primary has ended
/// (and how long an `OnError::Fail` secondary may hold the primary's
/// trailers) by default: 30 s, sluice's drain deadline. Past it they are
/// cancelled and reported so; without the bound, a secondary that never
/// answers would hold a task and a stream per call forever.
pub const DEFAULT_SECONDARY_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What a reply that does not have the expected layout does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Malformed {
    /// It fails the call (merge) or its destination (interleave) with
    /// INTERNAL naming the destination.
    #[default]
    Fail,
    /// It passes through unenriched and is reported as
    /// [`Outcome::Malformed`].
    PassThrough,
}

type Classifier = Arc<dyn Fn(&BoxError) -> (Code, String) + Send + Sync>;

/// What every fan-out and mirror call of a layer shares.
pub(crate) struct Settings {
    queue: usize,
    max_reply_bytes: usize,
    max_message_bytes: usize,
    append: AppendInfo,
    malformed: Malformed,
    fail_when_any: bool,
    secondary_grace: std::time::Duration,
    reporter: Option<Reporter>,
    classify: Classifier,
    /// The trailer (or trailers-only header) that lists each
    /// destination's status.
    summary: HeaderName,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("queue", &self.queue)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("append", &self.append)
            .field("malformed", &self.malformed)
            .field("fail_when_any", &self.fail_when_any)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl Settings {
    fn report(&self, report: Report) {
        if let Some(reporter) = &self.reporter {
            reporter(&report);
        }
    }
}

/// [`Layer`] that applies [`Fanout`] middleware.
///
/// See the [module docs](crate::fanout) for examples.
#[derive(Clone, Debug)]
pub struct FanoutLayer {
    settings: Arc<Settings>,
}

/// Middleware that carries out fan-out and mirror routes.
///
/// See the [module docs](crate::fanout) for examples.
#[derive(Clone, Debug)]
pub struct Fanout<S> {
    inner: S,
    settings: Arc<Settings>,
}

// === impl FanoutLayer ===

impl Default for FanoutLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl FanoutLayer {
    /// A layer with the defaults: queues of [`DEFAULT_QUEUE`], merged
    /// replies up to [`DEFAULT_MAX_REPLY_BYTES`], metadata in field 1,
    /// malformed replies failing, OK unless every destination failed.
    pub fn new() -> Self {
        Self {
            settings: Arc::new(Settings {
                queue: DEFAULT_QUEUE,
                max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
                append: AppendInfo::default(),
                malformed: Malformed::Fail,
                fail_when_any: false,
                secondary_grace: DEFAULT_SECONDARY_GRACE,
                reporter: None,
                classify: Arc::new(call::unavailable),
                summary: HeaderName::from_static(DEFAULT_STATUS_TRAILER),
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Arc::try_unwrap(self.settings).unwrap_or_else(|shared| Settings {
            queue: shared.queue,
            max_reply_bytes: shared.max_reply_bytes,
            max_message_bytes: shared.max_message_bytes,
            append: shared.append,
            malformed: shared.malformed,
            fail_when_any: shared.fail_when_any,
            secondary_grace: shared.secondary_grace,
            reporter: shared.reporter.clone(),
            classify: shared.classify.clone(),
            summary: shared.summary.clone(),
        });
        f(&mut settings);
        Self {
            settings: Arc::new(settings),
        }
    }

    /// Frames (request) and messages (interleaved replies) queued per
    /// destination.
    #[must_use]
    pub fn queue(self, n: usize) -> Self {
        self.with(|s| s.queue = n.max(1))
    }

    /// The budget of a merged reply, all destinations together.
    #[must_use]
    pub fn max_reply_bytes(self, n: usize) -> Self {
        self.with(|s| s.max_reply_bytes = n)
    }

    /// The largest message an interleaved destination may send.
    #[must_use]
    pub fn max_message_bytes(self, n: usize) -> Self {
        self.with(|s| s.max_message_bytes = n)
    }

    /// The field number the metadata is appended as (1 by default, Talos's
    /// `metadata = 1`).
    #[must_use]
    pub fn metadata_field(self, field: u32) -> Self {
        self.with(|s| s.append = AppendInfo::new(field))
    }

    /// What a reply in the wrong layout does.
    #[must_use]
    pub fn malformed(self, malformed: Malformed) -> Self {
        self.with(|s| s.malformed = malformed)
    }

    /// Fails the call when any destination fails, rather than only when
    /// every one does.
    #[must_use]
    pub fn fail_when_any(self, yes: bool) -> Self {
        self.with(|s| s.fail_when_any = yes)
    }

    /// How long mirror secondaries may run on after the primary ended
    /// (default [`DEFAULT_SECONDARY_GRACE`]).
    #[must_use]
    pub fn secondary_grace(self, grace: std::time::Duration) -> Self {
        self.with(|s| s.secondary_grace = grace)
    }

    /// Calls `f` once per fan-out or mirror call with every destination's
    /// outcome, after the last one ended (the finalizer).
    #[must_use]
    pub fn on_report(self, f: impl Fn(&Report) + Send + Sync + 'static) -> Self {
        self.with(|s| s.reporter = Some(Arc::new(f)))
    }

    /// Names the trailer that lists each destination's status (default
    /// [`DEFAULT_STATUS_TRAILER`]); a trailers-only answer carries it as a
    /// header.
    ///
    /// ```
    /// use sluice_layers::fanout::FanoutLayer;
    ///
    /// let layer = FanoutLayer::new()
    ///     .status_trailer(http::HeaderName::from_static("my-proxy-fanout-status"));
    /// ```
    #[must_use]
    pub fn status_trailer(self, name: HeaderName) -> Self {
        self.with(|s| s.summary = name)
    }

    /// How an error of the inner service becomes a destination's status
    /// (by default UNAVAILABLE with the error's text).
    #[must_use]
    pub fn classify(self, f: impl Fn(&BoxError) -> (Code, String) + Send + Sync + 'static) -> Self {
        self.with(|s| s.classify = Arc::new(f))
    }
}

impl<S> Layer<S> for FanoutLayer {
    type Service = Fanout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fanout {
            inner,
            settings: self.settings.clone(),
        }
    }
}

// === impl Fanout ===

impl<S> Fanout<S> {
    /// Wraps `inner` with the defaults of [`FanoutLayer::new`].
    pub fn new(inner: S) -> Self {
        FanoutLayer::new().layer(inner)
    }

    /// Returns a [`FanoutLayer`] (same as [`FanoutLayer::new`]).
    pub fn layer() -> FanoutLayer {
        FanoutLayer::new()
    }

    inner_accessors!();
}

impl<S, B, RB> Service<Request<B>> for Fanout<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let many = matches!(
            req.extensions().get::<Route>(),
            Some(Route::FanOut(_) | Route::Mirror(_))
        );
        if !many {
            let first = match req.extensions().get::<Route>() {
                Some(Route::One(d)) => d.first_message().cloned(),
                _ => None,
            };
            let req = req.map(|b| RequestBody::direct(b).with_first_message(first.as_ref()));
            return ResponseFuture {
                state: State::One {
                    fut: self.inner.call(req),
                },
            };
        }
        let (mut parts, body) = req.into_parts();
        let route = parts.extensions.remove::<Route>();
        let svc = self.inner.clone();
        let settings = self.settings.clone();
        // Boxed: several destinations are off the hot path.
        let fut: BoxFuture<RB> =
            match route {
                Some(Route::FanOut(f)) if f.mode() == Mode::Interleave => Box::pin(async move {
                    Ok(interleave::interleave(svc, parts, body, f, settings).await)
                }),
                Some(Route::FanOut(f)) => {
                    Box::pin(async move { Ok(merge::merge(svc, parts, body, f, settings).await) })
                }
                Some(Route::Mirror(m)) => Box::pin(mirror::mirror(svc, parts, body, m, settings)),
                _ => unreachable!("checked above"),
            };
        ResponseFuture {
            state: State::Many { fut },
        }
    }
}

type BoxFuture<RB> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<RB>>, BoxError>> + Send>>;

pin_project! {
    /// Response future of [`Fanout`].
    pub struct ResponseFuture<F, RB> {
        #[pin]
        state: State<F, RB>,
    }
}

impl<F, RB> fmt::Debug for ResponseFuture<F, RB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, RB> {
        One { #[pin] fut: F },
        Many { fut: BoxFuture<RB> },
    }
}

impl<F, RB, E> Future for ResponseFuture<F, RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::One { fut } => fut.poll(cx).map(|r| {
                r.map(|res| res.map(ResponseBody::direct))
                    .map_err(Into::into)
            }),
            StateProj::Many { fut } => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests;
