//! Middleware that refuses new gRPC calls once a drain has begun, and keeps
//! the drain open until every call already in flight has finished,
//! including its response body (where gRPC streams live).
//!
//! A drain starts with [`Signal::drain`] or [`Signal::drain_within`]. From
//! then on [`Drain`] answers each new call with a trailers-only
//! `UNAVAILABLE` (never an HTTP error or a reset, so clients retry it
//! elsewhere), and [`Watch::signaled`] resolves so that connection tasks can
//! send GOAWAY. The drain completes when the last [`Guard`] is released: each
//! call holds one until its response body ends or is dropped, and
//! connection tasks hold one while they close. With
//! [`Signal::drain_within`], calls still open when the grace period runs out
//! end at once with `UNAVAILABLE` trailers saying the server is shutting
//! down.
//!
//! Everything else passes through untouched: headers, DATA, trailers and
//! errors of the calls that were let in.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Empty;
//! use sluice_layers::drain::{self, DrainLayer};
//! use sluice_layers::grpc::status::{self, Code};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! let (signal, watch) = drain::channel();
//! let mut svc = ServiceBuilder::new()
//!     .layer(DrainLayer::new(watch.clone()))
//!     .service_fn(|_req: Request<Empty<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
//!     });
//!
//! // Before the drain the call reaches the service.
//! let res = svc.ready().await?.call(Request::new(Empty::new())).await?;
//! assert_eq!(status::code_of(res.headers()), None);
//! drop(res); // the call ends: its guard is released
//!
//! // Once draining, calls are refused and the service is never called.
//! signal.drain().await;
//! assert!(watch.is_draining());
//! let res = svc.ready().await?.call(Request::new(Empty::new())).await?;
//! assert_eq!(status::code_of(res.headers()), Some(Code::Unavailable));
//! # Ok(())
//! # }
//! ```
//!
//! # Readiness
//!
//! While not draining, [`Drain`] is ready when its inner service is ready.
//! Once draining, it is always ready and refuses in `call`, like
//! `tower::load_shed`, so refusals are immediate even if the inner service
//! is saturated.

mod layer;
mod service;
mod signal;

pub mod body;
pub mod error;
pub mod future;
#[cfg(test)]
mod tests;

pub use self::{
    layer::DrainLayer,
    service::Drain,
    signal::{Guard, Signal, Watch},
};

/// The `grpc-message` of a call refused while draining, unless
/// [`DrainLayer::message`] sets another.
pub const DEFAULT_MESSAGE: &str = "the server is draining: retry on another instance";

/// The `grpc-message` of a call cut off when the drain's grace period runs
/// out, unless [`DrainLayer::expiry_message`] sets another.
pub const DEFAULT_EXPIRY_MESSAGE: &str = "the server is shutting down: drain deadline reached";

/// The text a call cut off at the drain deadline ends with; cloned per call
/// admitted, so an `Arc` (`None`: [`DEFAULT_EXPIRY_MESSAGE`]).
#[derive(Clone, Debug, Default)]
struct ExpiryMessage(Option<std::sync::Arc<str>>);

impl ExpiryMessage {
    fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or(DEFAULT_EXPIRY_MESSAGE)
    }
}

/// What a [`DrainLayer`]'s builder sets, shared by every [`Drain`] it
/// makes.
#[derive(Clone, Debug)]
struct Settings {
    message: std::borrow::Cow<'static, str>,
    expiry_message: ExpiryMessage,
    admit: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            message: std::borrow::Cow::Borrowed(DEFAULT_MESSAGE),
            expiry_message: ExpiryMessage::default(),
            admit: false,
        }
    }
}

/// Creates a drain channel: one [`Signal`] to start the drain, and a
/// cloneable [`Watch`] for every connection task and [`DrainLayer`].
pub fn channel() -> (Signal, Watch) {
    signal::channel()
}
