//! Middleware that enforces a gRPC call's `grpc-timeout` on the whole call:
//! the wait for response headers *and* the response body, where streams live.
//!
//! A call whose request carries a valid `grpc-timeout` gets a timer. If the
//! timer fires before the response headers, [`Deadline`] answers with a
//! trailers-only `DEADLINE_EXCEEDED` and drops the inner future. If it fires
//! while the response body is still streaming, the body ends with trailers
//! `grpc-status: 4` instead, and the inner body is dropped. Either way the
//! inner service sees its work dropped, which is how a proxy cancels the
//! upstream call. Calls without a valid `grpc-timeout` pass through with no
//! timer and no allocation.
//!
//! The header itself is left in place, so the next hop enforces the same
//! deadline.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use sluice_layers::deadline::DeadlineLayer;
//! use sluice_layers::grpc::status::{self, Code};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! let mut svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new())
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         // An upstream that takes a minute to answer.
//!         tokio::time::sleep(Duration::from_secs(60)).await;
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//!     });
//! let req = Request::builder().header("grpc-timeout", "100m").body(Full::default())?;
//! let res = svc.ready().await?.call(req).await?;
//! assert_eq!(status::code_of(res.headers()), Some(Code::DeadlineExceeded));
//! # Ok(())
//! # }
//! ```
//!
//! # Readiness
//!
//! [`Deadline`] is ready when its inner service is ready; the timer starts in
//! `call`.

mod layer;
mod service;

pub mod body;
pub mod future;
#[cfg(test)]
mod tests;

pub use self::{layer::DeadlineLayer, service::Deadline};

/// What [`DeadlineLayer::on_expire`] calls.
type OnExpire = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The `grpc-message` sent when a deadline fires, unless
/// [`DeadlineLayer::message`] sets another.
pub const DEFAULT_MESSAGE: &str = "deadline exceeded (grpc-timeout)";

/// What a call does when its deadline fires: shared by the future and the
/// body, cloned only for calls that have a timer. One pointer (`None`:
/// nothing set), as a server holds one copy of its stack per connection.
#[derive(Clone, Default)]
struct Expiry(Option<std::sync::Arc<ExpirySettings>>);

#[derive(Clone, Default)]
struct ExpirySettings {
    on_expire: Option<OnExpire>,
    /// `None`: [`DEFAULT_MESSAGE`].
    message: Option<std::sync::Arc<str>>,
}

impl Expiry {
    const NONE: Self = Self(None);

    fn message(&self) -> &str {
        self.0
            .as_ref()
            .and_then(|e| e.message.as_deref())
            .unwrap_or(DEFAULT_MESSAGE)
    }

    fn expired(&self) {
        if let Some(f) = self.0.as_ref().and_then(|e| e.on_expire.as_ref()) {
            f();
        }
    }

    fn settings_mut(&mut self) -> &mut ExpirySettings {
        std::sync::Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }

    fn has_on_expire(&self) -> bool {
        self.0.as_ref().is_some_and(|e| e.on_expire.is_some())
    }
}
