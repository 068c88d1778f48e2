//! Connections to the upstream: dialled on demand, multiplexed, shared by
//! every call, and replaced when they break.
//!
//! A call takes the least-loaded open connection with a free stream slot:
//! below `max_streams_per_connection` and the upstream's
//! MAX_CONCURRENT_STREAMS. Connections where a call is waiting for the
//! upstream to take more of its upload (its flow-control window is spent,
//! so the upstream stopped reading) are passed over while another can be
//! used or dialled: an upstream that gives a connection no more window
//! than one stream (hyper's default, and so tonic's) lets one unread
//! upload stop every request body on it. Only when no connection has a
//! slot and `max_connections` are open does a call wait, up to
//! `connect_timeout`, for a slot to free.
//!
//! Dials are serialised: callers that waited on a dial share its outcome,
//! so an unreachable upstream costs one connect attempt, not one per call,
//! and every waiting call fails at once with UNAVAILABLE. After consecutive
//! failures, further calls fail fast without dialling for a short backoff.
//!
//! Each connection's receive window is `max_streams_per_connection ×
//! initial_stream_window` unless configured: calls whose clients stop
//! reading hold their stream windows, never the connection's.

mod connect;
mod dial;
mod drive;
mod pool;

use std::{sync::Arc, time::Duration};

pub(crate) use self::{
    connect::{Connector, transport_target},
    pool::{Checkout, ConnLoad, Lease, Pool, SendBlocked, Slot},
};

/// Why no upstream stream could be opened.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum UpstreamError {
    /// Dialling the upstream failed (refused, unreachable, timed out).
    #[error("upstream {target} unreachable: {reason}")]
    Unreachable { target: Arc<str>, reason: Arc<str> },
    /// The connection failed while opening the stream.
    #[error("upstream {target} connection failed: {source}")]
    Connection {
        target: Arc<str>,
        #[source]
        source: Arc<h2::Error>,
    },
    /// h2 refused to send the request head: not the connection's fault.
    #[error("cannot send the request upstream: {0}")]
    Refused(#[source] Arc<h2::Error>),
    /// Every stream slot of every connection stayed taken for the whole
    /// `connect_timeout`.
    #[error("upstream {target}: all {slots} streams busy for {waited:?}")]
    Busy {
        target: Arc<str>,
        slots: usize,
        waited: Duration,
    },
}
