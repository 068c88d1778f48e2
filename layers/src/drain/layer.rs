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
    admit: bool,
}

// === impl DrainLayer ===

impl DrainLayer {
    /// Creates a layer that refuses new calls once `watch` observes a drain.
    pub fn new(watch: Watch) -> Self {
        Self {
            watch,
            message: Cow::Borrowed(DEFAULT_MESSAGE),
            admit: false,
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
        self.admit = admit;
        self
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
        Drain::with_options(inner, self.watch.clone(), self.message.clone(), self.admit)
    }
}
