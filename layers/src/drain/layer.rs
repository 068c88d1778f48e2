use std::{borrow::Cow, sync::Arc};

use tower_layer::Layer;

use super::{Drain, ExpiryMessage, Settings, Watch};

/// [`Layer`] that applies [`Drain`] middleware.
///
/// See the [module docs](crate::drain) for an example.
#[derive(Clone, Debug)]
pub struct DrainLayer {
    watch: Watch,
    settings: Arc<Settings>,
}

// === impl DrainLayer ===

impl DrainLayer {
    /// Creates a layer that refuses new calls once `watch` observes a drain.
    pub fn new(watch: Watch) -> Self {
        Self {
            watch,
            settings: Arc::default(),
        }
    }

    /// Admits (and guards) calls that arrive while draining instead of
    /// refusing them; they still end with `UNAVAILABLE` if they outlive the
    /// grace period.
    ///
    /// For servers whose transport already bounds which calls can arrive
    /// once the drain began: an HTTP/2 server that sends GOAWAY in two
    /// steps has promised to process every stream the client opened before
    /// it saw the final GOAWAY, and refuses later ones itself
    /// (REFUSED_STREAM, which gRPC clients retry transparently). Refusing
    /// the streams in between with `UNAVAILABLE` would fail calls that
    /// clients without a retry policy cannot recover.
    #[must_use]
    pub fn admit_while_draining(mut self, admit: bool) -> Self {
        Arc::make_mut(&mut self.settings).admit = admit;
        self
    }

    /// Sets the `grpc-message` of the `UNAVAILABLE` sent to a call refused
    /// while draining (default: [`DEFAULT_MESSAGE`](super::DEFAULT_MESSAGE)).
    #[must_use]
    pub fn message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        Arc::make_mut(&mut self.settings).message = message.into();
        self
    }

    /// Sets the `grpc-message` of the `UNAVAILABLE` that ends a call still
    /// open when [`Signal::drain_within`](super::Signal::drain_within)'s
    /// grace period runs out, trailers-only or in the body's trailers
    /// (default: [`DEFAULT_EXPIRY_MESSAGE`](super::DEFAULT_EXPIRY_MESSAGE)).
    ///
    /// ```
    /// use sluice_layers::drain::{self, DrainLayer};
    ///
    /// let (_signal, watch) = drain::channel();
    /// // A proxy names itself, so that the client knows which hop went away.
    /// let layer = DrainLayer::new(watch)
    ///     .message("my-proxy is draining: retry on another instance")
    ///     .expiry_message("my-proxy is shutting down: drain deadline reached");
    /// ```
    #[must_use]
    pub fn expiry_message(mut self, message: impl Into<Arc<str>>) -> Self {
        Arc::make_mut(&mut self.settings).expiry_message = ExpiryMessage(Some(message.into()));
        self
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Drain::with_settings(inner, self.watch.clone(), self.settings.clone())
    }
}
