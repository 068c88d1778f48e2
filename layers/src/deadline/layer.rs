use tower_layer::Layer;

use super::Deadline;

/// [`Layer`] that applies [`Deadline`] middleware.
///
/// See the [module docs](crate::deadline) for an example.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer {
    _priv: (),
}

// === impl DeadlineLayer ===

impl DeadlineLayer {
    /// Creates a layer that enforces each call's `grpc-timeout`.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline::new(inner)
    }
}
