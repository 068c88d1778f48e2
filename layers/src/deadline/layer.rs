use std::time::Duration;

use tower_layer::Layer;

use super::Deadline;

/// [`Layer`] that applies [`Deadline`] middleware.
///
/// See the [module docs](crate::deadline) for an example.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer {
    offset: Duration,
}

// === impl DeadlineLayer ===

impl DeadlineLayer {
    /// Creates a layer that enforces each call's `grpc-timeout`.
    pub const fn new() -> Self {
        Self {
            offset: Duration::ZERO,
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
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline::with_offset(inner, self.offset)
    }
}
