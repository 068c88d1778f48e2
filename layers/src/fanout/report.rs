//! What a fan-out or mirror reports about each destination when the call
//! is over.

use std::sync::Arc;

use crate::grpc::status::Code;

/// The end of one destination's part in a call.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It answered OK.
    Ok,
    /// It failed, or answered a status other than OK.
    Failed {
        /// The status code (UNAVAILABLE for an upstream that could not be
        /// reached, INTERNAL for a reply sluice could not use).
        code: Code,
        /// What went wrong.
        message: String,
    },
    /// It answered OK with a reply that was not in the expected layout,
    /// passed on unenriched.
    Malformed,
    /// A mirror secondary whose queue was full in `drop` mode: cancelled.
    Dropped,
    /// The call ended (the client cancelled, the primary finished or
    /// failed) before this destination did.
    Cancelled,
}

impl Outcome {
    /// The outcome as a metric label: `ok`, `failed`, `malformed`,
    /// `dropped` or `cancelled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed { .. } => "failed",
            Self::Malformed => "malformed",
            Self::Dropped => "dropped",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the destination counts as failed for the call's status.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Ok | Self::Malformed)
    }

    /// The code it ended with (OK for `Ok` and `Malformed`).
    pub fn code(&self) -> Code {
        match self {
            Self::Ok | Self::Malformed => Code::Ok,
            Self::Failed { code, .. } => *code,
            Self::Dropped | Self::Cancelled => Code::Cancelled,
        }
    }
}

/// Every destination's outcome, handed to the layer's reporter once per
/// fan-out or mirror call, after the last destination has ended, however
/// the call ended (a mirror's finalizer).
#[derive(Clone, Debug)]
pub struct Report {
    /// `true` for a mirror, `false` for a fan-out.
    pub mirror: bool,
    /// The route's name, if it has one.
    pub route: Option<Arc<str>>,
    /// Each destination's name and outcome, in the route's order (a
    /// mirror's primary first).
    pub destinations: Vec<(Arc<str>, Outcome)>,
}

/// The reporter a [`FanoutLayer`](super::FanoutLayer) calls.
pub(super) type Reporter = Arc<dyn Fn(&Report) + Send + Sync>;
