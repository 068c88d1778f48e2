//! Errors of the drain.

/// The grace period ran out with calls still in flight.
#[derive(Debug, thiserror::Error)]
#[error("drain timed out with {in_flight} calls in flight")]
pub struct DrainTimedOut {
    in_flight: usize,
}

impl DrainTimedOut {
    pub(super) fn new(in_flight: usize) -> Self {
        Self { in_flight }
    }

    /// Guards (calls, connections) still held when the grace period ran out.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}
