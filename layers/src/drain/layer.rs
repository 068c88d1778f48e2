use std::borrow::Cow;

use tower_layer::Layer;

use super::{Drain, Watch};

/// The default `grpc-message` of a call refused while draining.
pub(super) const DEFAULT_MESSAGE: &str = "sluice is draining: retry on another instance";

/// [`Layer`] that applies [`Drain`] middleware.
///
/// See the [module docs](crate::drain) for an example.
#[derive(Clone, Debug)]
pub struct DrainLayer {
    watch: Watch,
    message: Cow<'static, str>,
}

// === impl DrainLayer ===

impl DrainLayer {
    /// Creates a layer that refuses new calls once `watch` observes a drain.
    pub fn new(watch: Watch) -> Self {
        Self {
            watch,
            message: Cow::Borrowed(DEFAULT_MESSAGE),
        }
    }

    /// Sets the `grpc-message` sent with a refusal (default: "sluice is
    /// draining: retry on another instance").
    #[must_use]
    pub fn message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Drain::with_message(inner, self.watch.clone(), self.message.clone())
    }
}
