use std::{sync::Arc, time::Duration};

use tower_layer::Layer;

use super::{Deadline, Expiry};

/// [`Layer`] that applies [`Deadline`] middleware.
///
/// See the [module docs](crate::deadline) for an example.
#[derive(Clone, Default)]
pub struct DeadlineLayer {
    offset: Duration,
    expiry: Expiry,
}

impl std::fmt::Debug for DeadlineLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineLayer")
            .field("offset", &self.offset)
            .field("on_expire", &self.expiry.has_on_expire())
            .field("message", &self.expiry.message())
            .finish()
    }
}

// === impl DeadlineLayer ===

impl DeadlineLayer {
    /// Creates a layer that enforces each call's `grpc-timeout`.
    pub const fn new() -> Self {
        Self {
            offset: Duration::ZERO,
            expiry: Expiry::NONE,
        }
    }

    /// Forwards `grpc-timeout` reduced by `offset`, so the next hop gives up
    /// before this one and its answer (not this hop's timer) reaches the
    /// client. This hop still enforces the full budget.
    #[must_use]
    pub const fn offset(mut self, offset: Duration) -> Self {
        self.offset = offset;
        self
    }

    /// Calls `f` each time a deadline ends a response that had already
    /// begun (its body ends with `DEADLINE_EXCEEDED` trailers). An answer
    /// given before the response began is marked instead, with
    /// [`Answered::Deadline`](crate::grpc::status::Answered) in its
    /// extensions. Meant for counting; `f` runs inside a body's poll.
    #[must_use]
    pub fn on_expire(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.expiry.settings_mut().on_expire = Some(Arc::new(f));
        self
    }

    /// Sets the `grpc-message` of the `DEADLINE_EXCEEDED` a fired deadline
    /// answers with, trailers-only or in the body's trailers (default:
    /// [`DEFAULT_MESSAGE`](super::DEFAULT_MESSAGE), which names no one). It is percent-encoded on
    /// the wire.
    ///
    /// ```
    /// use sluice_layers::deadline::DeadlineLayer;
    ///
    /// // A proxy names itself, so that the client can tell whose clock ran out.
    /// let layer = DeadlineLayer::new().message("deadline exceeded (grpc-timeout) at my-proxy");
    /// ```
    #[must_use]
    pub fn message(mut self, message: impl Into<Arc<str>>) -> Self {
        self.expiry.settings_mut().message = Some(message.into());
        self
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline::with(inner, self.offset, self.expiry.clone())
    }
}
