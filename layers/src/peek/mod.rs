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
//!   hold.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
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

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

pub use self::{body::ReplayBody, future::ResponseFuture};
use crate::BoxError;

/// Messages peeked by default: the first one, which is what directors
/// route on (Gitaly's `StreamPeeker` reads exactly one).
pub const DEFAULT_MAX_MESSAGES: usize = 1;
/// Bytes a call may make the peek hold by default: 64 KiB, far above the
/// request messages routing looks at, small enough that 10 000 calls peeking
/// at once stay under 1 GiB.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;

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
#[derive(Clone, Copy, Debug)]
pub struct PeekLayer {
    max_messages: usize,
    max_bytes: usize,
}

/// Middleware that reads the first messages of each request body and
/// replays them to the inner service.
///
/// See the [module docs](crate::peek) for an example.
#[derive(Clone, Debug)]
pub struct Peek<S> {
    inner: S,
    layer: PeekLayer,
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
    /// Peeks [`DEFAULT_MAX_MESSAGES`] within [`DEFAULT_MAX_BYTES`].
    pub const fn new() -> Self {
        Self {
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
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
            layer: *self,
        }
    }
}

// === impl Peek ===

impl<S> Peek<S> {
    /// Wraps `inner` with the default limits.
    pub fn new(inner: S) -> Self {
        PeekLayer::new().layer(inner)
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
        if self.layer.max_messages == 0 {
            // Nothing to peek: call the (ready) inner service at once, with
            // no clone and no buffering.
            let req = req.map(ReplayBody::passthrough);
            return ResponseFuture::calling(self.inner.call(req));
        }
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(ready, req, self.layer.max_messages, self.layer.max_bytes)
    }
}

#[cfg(test)]
mod tests;
