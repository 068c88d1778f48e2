//! The frame forwarder: one upstream h2 stream per downstream call.
//!
//! Request headers go out at once; response headers come back the moment
//! the upstream sends them; DATA and trailers pass frame by frame in both
//! directions under end-to-end flow control; END_STREAM and RST_STREAM
//! cross in both directions. Nothing is decoded.
//!
//! Header hygiene (RFC 9113 §8.2.2) is h2's: it refuses connection-specific
//! fields and `te` other than `trailers` as malformed in every header block
//! it receives, from either side, so none reaches this module.
//!
//! While waiting for response headers, the call's own future also pumps the
//! request body, so a unary call needs no task of its own. Only a call whose
//! client is still sending when the headers arrive gets one spawned pump,
//! which ends with the request side of the call.

mod stream;

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sluice_layers::{BoxError, grpc::status::Code};
use tower::Service;

use self::stream::RequestPump;
pub(crate) use self::stream::ResponseBody;
use crate::{
    stats::{Counters, Gauge, Kind},
    telemetry::metrics::RefusalReason,
    upstream::{Groups, UpstreamError},
};
use sluice_layers::direct::Route;

/// Why a call could not be forwarded, with the side that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ForwardError {
    /// No upstream stream could be opened.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream connection broke before the response headers came.
    #[error("upstream connection lost before the response: {0}")]
    UpstreamLost(#[source] h2::Error),
    /// The upstream reset the stream (RST_STREAM): passed on to the client
    /// as a reset with the same reason.
    #[error("upstream reset the call: {0}")]
    UpstreamReset(#[source] h2::Error),
    /// The director chose a route this forwarder cannot follow: a fan-out
    /// or mirror route, or a group that does not exist. Routes read from a
    /// config never do (the config checks its groups, and its routes have
    /// one destination); a director of a library user can.
    #[error("cannot follow the route: {0}")]
    Unroutable(String),
    /// No strategy of the group found an endpoint for this call.
    #[error("no endpoint of upstream group {0:?} matches this call")]
    NoEndpoint(String),
}

impl ForwardError {
    /// The status a client gets for this error and the reason sluice counts
    /// it under, or `None` when the error is to be passed on as an
    /// RST_STREAM (an upstream reset).
    pub(crate) fn status(&self) -> Option<(Code, RefusalReason)> {
        Some(match self {
            Self::UpstreamReset(_) => return None,
            Self::Upstream(UpstreamError::Refused(_)) | Self::Unroutable(_) => {
                (Code::Internal, RefusalReason::internal)
            }
            Self::Upstream(_) | Self::UpstreamLost(_) => {
                (Code::Unavailable, RefusalReason::upstream_unavailable)
            }
            Self::NoEndpoint(_) => (Code::Unavailable, RefusalReason::no_endpoint),
        })
    }
}

/// The forwarder service: each call goes to an endpoint of the group its
/// [`Route`] names (the default target without one): the endpoint the
/// route names, or one the group's strategies pick.
///
/// Always ready: a call waits for an upstream connection inside its future,
/// and fails with UNAVAILABLE if none can be had.
#[derive(Clone, Debug)]
pub(crate) struct Forward {
    groups: Arc<Groups>,
    counters: Arc<Counters>,
    /// The group of a call without a route.
    default_target: Arc<str>,
}

impl Forward {
    pub(crate) fn new(
        groups: Arc<Groups>,
        counters: Arc<Counters>,
        default_target: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            groups,
            counters,
            default_target: default_target.into(),
        }
    }
}

impl<B> Service<Request<B>> for Forward
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = ForwardError;
    // Boxed: the future of an `async fn` cannot be named. One allocation
    // per call; the call's whole state lives in it.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ForwardError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ForwardError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(forward(
            self.groups.clone(),
            self.counters.clone(),
            self.default_target.clone(),
            req,
        ))
    }
}

async fn forward<B>(
    groups: Arc<Groups>,
    counters: Arc<Counters>,
    default_target: Arc<str>,
    req: Request<B>,
) -> Result<Response<ResponseBody>, ForwardError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let route = parts.extensions.remove::<Route>();
    let (target, endpoint_id) = match &route {
        None => (&*default_target, None),
        Some(Route::One(destination)) => {
            if let Some(edits) = destination.edits() {
                edits.apply(&mut parts.headers);
            }
            (destination.target(), destination.endpoint())
        }
        Some(_) => {
            return Err(ForwardError::Unroutable(
                "a fan-out or mirror route reached the forwarder; a FanoutLayer above carries those out"
                    .to_owned(),
            ));
        }
    };
    let group = groups
        .get(target)
        .ok_or_else(|| ForwardError::Unroutable(format!("no upstream group named {target:?}")))?;
    let mut endpoint = match endpoint_id {
        Some(id) => group
            .find(id)
            .ok_or_else(|| ForwardError::NoEndpoint(format!("{target}: no endpoint {id:?}")))?,
        None => group.pick_or_wait(&parts).await.ok_or_else(|| {
            let waited = group.wait();
            ForwardError::NoEndpoint(if waited.is_zero() {
                target.to_owned()
            } else {
                format!("{target} (waited {waited:?} for one to connect)")
            })
        })?,
    };
    let checkout = match endpoint.pool().checkout().await {
        Ok(checkout) => checkout,
        // Nothing was sent: another endpoint of the group gets one try
        // (not when the route named this one).
        Err(e) => match group
            .pick(&parts, Some(&endpoint))
            .filter(|_| group.len() > 1 && endpoint_id.is_none())
        {
            Some(other) => {
                tracing::debug!(error = %e, "endpoint unreachable; trying another in its group");
                endpoint = other;
                endpoint.pool().checkout().await?
            }
            None => return Err(e.into()),
        },
    };
    crate::telemetry::trace::record_upstream(endpoint.address());
    let end_of_stream = body.is_end_stream();
    // A copy the fan-out may cut off is reset as an error, never as a
    // CANCEL a hyper server would read as the request's end.
    let cut_reason = if parts
        .extensions
        .get::<sluice_layers::fanout::CutOff>()
        .is_some()
    {
        h2::Reason::INTERNAL_ERROR
    } else {
        h2::Reason::CANCEL
    };
    let head = Request::from_parts(parts, ());
    let sent = tokio::time::Instant::now();
    let (mut response, tx, lease) = endpoint.pool().send(checkout, head, end_of_stream)?;

    let mut pump =
        (!end_of_stream).then(|| RequestPump::new(body, tx, lease.load().clone(), cut_reason));
    // Drive the request body while waiting for the response headers.
    let response = poll_fn(|cx| {
        if let Some(pump) = pump.as_mut() {
            let _ = Pin::new(pump).poll(cx);
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    if let Some(mut pump) = pump.filter(|p| !p.is_done()) {
        // The client is still sending (client or bidi streaming): the rest
        // of the request body gets its own task, which ends with the
        // request side of the call whichever way that ends.
        pump.gauge = Some(Gauge::hold(&counters, Kind::RequestPump));
        tokio::spawn(pump);
    }
    let response = response.map_err(|e| {
        if e.is_reset() && e.is_remote() {
            ForwardError::UpstreamReset(e)
        } else {
            ForwardError::UpstreamLost(e)
        }
    })?;
    endpoint.observe(sent.elapsed());
    let (parts, recv) = response.into_parts();
    Ok(Response::from_parts(parts, ResponseBody::new(recv, lease)))
}
