//! Middleware that decides where each gRPC call goes.
//!
//! A [`Director`] sees the call's head (method, metadata, `:authority`) and
//! the messages a [`PeekLayer`](crate::peek::PeekLayer) above it peeked,
//! and returns a [`Route`] or a [`Refusal`]. [`Direct`] puts the route in
//! the request's extensions for the layer that acts on it (a forwarder,
//! a fan-out), or answers the refusal as a trailers-only gRPC status. The
//! call itself passes through untouched.
//!
//! A [`Route`] names one destination, several (fan-out), or a primary plus
//! secondaries (mirror); each [`Destination`] may carry a replacement for
//! the first request message (Gitaly rewrites the repository field per node
//! this way; see [`ReplayBody::replace_first_message`](crate::peek::ReplayBody::replace_first_message)).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, request::Parts};
//! use http_body_util::Empty;
//! use sluice_layers::direct::{DirectLayer, Refusal, Route};
//! use sluice_layers::grpc::status::{self, Code};
//! use sluice_layers::peek::PeekedMessage;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! let director = |parts: &Parts, _peeked: &[PeekedMessage]| {
//!     match parts.uri.path() {
//!         p if p.starts_with("/billing.") => Ok(Route::to("billing")),
//!         p if p.starts_with("/admin.") => Err(Refusal::new(Code::PermissionDenied, "not from here")),
//!         _ => Ok(Route::to("default")),
//!     }
//! };
//! let mut svc = ServiceBuilder::new()
//!     .layer(DirectLayer::new(director))
//!     .service_fn(|req: Request<Empty<Bytes>>| async move {
//!         let route = req.extensions().get::<Route>().expect("directed");
//!         let target = route.destinations().next().expect("one").target().to_owned();
//!         let mut res = Response::new(Empty::<Bytes>::new());
//!         res.headers_mut().insert("x-target", target.parse()?);
//!         Ok::<_, sluice_layers::BoxError>(res)
//!     });
//!
//! let req = Request::post("/billing.Invoices/Get").body(Empty::new())?;
//! let res = svc.ready().await?.call(req).await?;
//! assert_eq!(res.headers()["x-target"], "billing");
//!
//! let req = Request::post("/admin.Users/Delete").body(Empty::new())?;
//! let res = svc.ready().await?.call(req).await?;
//! assert_eq!(status::code_of(res.headers()), Some(Code::PermissionDenied));
//! # Ok(())
//! # }
//! ```
//!
//! # Readiness
//!
//! [`Direct`] has one inner service and is ready when it is. Driving several
//! destinations is the job of the layer that acts on the route: sluice's
//! forwarder reports ready at once and waits for each destination's
//! connection inside the call.

mod route;

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response, request::Parts};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use self::route::{
    Destination, Edits, FanOut, Mirror, Mode, OnError, Overflow, Route, Secondary,
};
use crate::{
    grpc::status::{self, Code},
    peek::{Peeked, PeekedMessage},
};

/// Decides where a call goes.
pub trait Director {
    /// The route for the call with head `parts` and peeked messages
    /// `peeked` (empty without a [`PeekLayer`](crate::peek::PeekLayer)).
    ///
    /// # Errors
    ///
    /// A [`Refusal`], answered as a trailers-only gRPC status.
    fn direct(&mut self, parts: &Parts, peeked: &[PeekedMessage]) -> Result<Route, Refusal>;
}

impl<F> Director for F
where
    F: FnMut(&Parts, &[PeekedMessage]) -> Result<Route, Refusal>,
{
    fn direct(&mut self, parts: &Parts, peeked: &[PeekedMessage]) -> Result<Route, Refusal> {
        self(parts, peeked)
    }
}

/// A director's refusal: the status the client gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    code: Code,
    message: Cow<'static, str>,
}

/// [`Layer`] that applies [`Direct`] middleware.
///
/// See the [module docs](crate::direct) for an example.
#[derive(Clone, Debug)]
pub struct DirectLayer<D> {
    director: D,
}

/// Middleware that routes each call with a [`Director`].
///
/// See the [module docs](crate::direct) for an example.
#[derive(Clone, Debug)]
pub struct Direct<S, D> {
    inner: S,
    director: D,
}

// === impl Refusal ===

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The status message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

// === impl DirectLayer ===

impl<D> DirectLayer<D> {
    /// A layer routing with `director` (a [`Director`] or a closure).
    pub fn new(director: D) -> Self {
        Self { director }
    }
}

impl<S, D: Clone> Layer<S> for DirectLayer<D> {
    type Service = Direct<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        Direct {
            inner,
            director: self.director.clone(),
        }
    }
}

// === impl Direct ===

impl<S, D> Direct<S, D> {
    /// Wraps `inner`.
    pub fn new(inner: S, director: D) -> Self {
        Self { inner, director }
    }

    inner_accessors!();
}

impl<S, D, B, RB> Service<Request<B>> for Direct<S, D>
where
    S: Service<Request<B>, Response = Response<RB>>,
    D: Director,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let decision = {
            let peeked = parts
                .extensions
                .get::<Peeked>()
                .map_or(&[][..], Peeked::messages);
            self.director.direct(&parts, peeked)
        };
        match decision {
            Ok(route) => {
                parts.extensions.insert(route);
                ResponseFuture {
                    state: State::Called {
                        fut: self.inner.call(Request::from_parts(parts, body)),
                    },
                }
            }
            Err(refusal) => ResponseFuture {
                state: State::Refused {
                    res: Some(status::answer(
                        status::Answered::Refused,
                        refusal.code,
                        &refusal.message,
                    )),
                },
            },
        }
    }
}

pin_project! {
    /// Response future of [`Direct`]: the inner call, or a refusal.
    #[derive(Debug)]
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, B> {
        Called { #[pin] fut: F },
        Refused { res: Option<Response<B>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut } => fut.poll(cx),
            StateProj::Refused { res } => {
                Poll::Ready(Ok(res.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{Empty, Full};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::{grpc::wire, peek::PeekLayer};

    fn grpc(payload: &[u8]) -> Full<Bytes> {
        let mut m = vec![0];
        m.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
        m.extend_from_slice(payload);
        Full::new(Bytes::from(m))
    }

    #[tokio::test]
    async fn the_director_sees_the_peeked_first_message_and_its_route_reaches_inner() {
        // Route on field 1 (a string) of the first message, as config routes do.
        let path: wire::FieldPath = "1".parse().expect("path");
        let director = move |_: &Parts, peeked: &[PeekedMessage]| {
            let tenant = peeked
                .first()
                .and_then(|m| wire::find(m.payload(), &path))
                .and_then(|v| v.as_str().map(str::to_owned));
            match tenant.as_deref() {
                Some("acme") => Ok(Route::FanOut(FanOut::new(
                    vec![Destination::new("a"), Destination::new("b")],
                    Mode::Merge,
                ))),
                Some(_) => Ok(Route::to("shared")),
                None => Err(Refusal::new(Code::InvalidArgument, "no tenant")),
            }
        };
        let svc = ServiceBuilder::new()
            .layer(PeekLayer::new())
            .layer(DirectLayer::new(director))
            .service(service_fn(|req: Request<_>| async move {
                let route = req.extensions().get::<Route>().cloned().expect("routed");
                let names: Vec<String> = route
                    .destinations()
                    .map(|d| d.target().to_owned())
                    .collect();
                let mut res = Response::new(Empty::<Bytes>::new());
                res.headers_mut()
                    .insert("x-targets", names.join(",").parse().expect("header"));
                Ok::<_, Infallible>(res)
            }));
        // field 1 = "acme"
        let res = svc
            .clone()
            .oneshot(Request::new(grpc(b"\x0a\x04acme")))
            .await
            .expect("ok");
        assert_eq!(res.headers()["x-targets"], "a,b");
        let res = svc
            .clone()
            .oneshot(Request::new(grpc(b"\x0a\x05other")))
            .await
            .expect("ok");
        assert_eq!(res.headers()["x-targets"], "shared");
        // Malformed message: no match, and the director refuses.
        let res = svc
            .oneshot(Request::new(grpc(b"\x0a\xff")))
            .await
            .expect("ok");
        assert_eq!(status::code_of(res.headers()), Some(Code::InvalidArgument));
    }

    #[tokio::test]
    async fn a_refusal_never_reaches_the_inner_service() {
        let director =
            |_: &Parts, _: &[PeekedMessage]| Err(Refusal::new(Code::Unimplemented, "no route"));
        let svc = DirectLayer::new(director).layer(service_fn(|_: Request<Empty<Bytes>>| async {
            panic!("a refused call reached the inner service");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }));
        let res = svc
            .oneshot(Request::new(Empty::new()))
            .await
            .expect("a refusal is a response");
        assert_eq!(status::code_of(res.headers()), Some(Code::Unimplemented));
        assert_eq!(res.headers()["grpc-message"], "no route");
    }

    #[test]
    fn mirror_routes_list_the_primary_first() {
        let route = Route::Mirror(Mirror::new(
            Destination::new("p"),
            vec![
                Destination::new("s1")
                    .with_first_message(Bytes::from_static(b"x"))
                    .into(),
                Secondary::new(Destination::new("s2")).overflow(Overflow::Drop),
            ],
        ));
        let names: Vec<&str> = route.destinations().map(Destination::target).collect();
        assert_eq!(names, ["p", "s1", "s2"]);
        assert_eq!(
            route
                .destinations()
                .nth(1)
                .and_then(Destination::first_message),
            Some(&Bytes::from_static(b"x"))
        );
    }
}
