//! Config → the tower stack each call runs through, outermost first.

use std::sync::Arc;

use sluice_layers::{
    deadline::{Deadline, DeadlineLayer},
    drain::{Drain, DrainLayer, Watch},
};
use tower::ServiceBuilder;

use crate::{forward::Forward, stats::Counters, upstream::Pool};

/// The stack between the server and the upstream.
pub(crate) type Stack = Drain<Deadline<Forward>>;

pub(crate) fn build(pool: Pool, counters: Arc<Counters>, drain: Watch) -> Stack {
    ServiceBuilder::new()
        // Once draining, refuse new calls with UNAVAILABLE (clients retry
        // elsewhere); hold the drain open until each admitted call's body
        // ends; at the drain deadline, end open calls with UNAVAILABLE.
        .layer(DrainLayer::new(drain))
        // Enforce grpc-timeout over the whole call, body included: at the
        // deadline the client gets DEADLINE_EXCEEDED and dropping the
        // forwarder's future or body cancels the upstream stream.
        .layer(DeadlineLayer::new())
        // One upstream h2 stream per call.
        .service(Forward::new(pool, counters))
}
