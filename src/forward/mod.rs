//! The endpoint client: one upstream h2 stream per call, on the
//! connection slot the balancer checked out for it.
//!
//! Request headers go out at once; response headers come back the moment
//! the upstream sends them; DATA and trailers pass frame by frame in both
//! directions under end-to-end flow control; END_STREAM and RST_STREAM
//! cross in both directions. Nothing is decoded, and nothing here knows of
//! groups, routes, config or telemetry: it is handed a connection and
//! pumps frames.
//!
//! Header hygiene (RFC 9113 §8.2.2) is h2's: it refuses connection-specific
//! fields and `te` other than `trailers` as malformed in every header block
//! it receives, from either side, so none reaches this module.
//!
//! While waiting for response headers, the call's own future also pumps the
//! request body, so a unary call needs no task of its own. Only a call whose
//! client is still sending when the headers arrive gets one spawned pump,
//! which ends with the request side of the call.

mod replay;
mod stream;

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sluice_layers::BoxError;

use self::stream::RequestPump;
pub(crate) use self::{
    replay::{Budget, Limits, Replay},
    stream::{Outcome, ResponseBody},
};
use crate::upstream::{Checkout, UpstreamError};

/// A call handed to the forwarder: the request, and the stream slot on an
/// upstream connection it goes out on.
#[derive(Debug)]
pub(crate) struct Call<B> {
    pub(crate) request: Request<Replay<B>>,
    pub(crate) checkout: Checkout,
    /// Told how the call ends, once it is committed.
    pub(crate) outcome: Option<Arc<dyn Outcome>>,
    /// The route's `max_stream_age`.
    pub(crate) max_age: Option<std::time::Duration>,
}

/// What one attempt of a call came to.
#[derive(Debug)]
pub(crate) enum Attempt<B> {
    /// Response headers that are not a trailers-only answer: the call is
    /// committed to this attempt, and its request body goes on to it.
    Committed(Response<ResponseBody>),
    /// A trailers-only answer (a status and nothing else); the request
    /// body is back, for another attempt.
    TrailersOnly(Response<ResponseBody>, Option<Replay<B>>),
    /// No response: the stream failed before its headers; the request
    /// body is back, and whether the upstream never processed the stream
    /// (REFUSED_STREAM, or above a GOAWAY's last stream id).
    Failed {
        error: ForwardError,
        body: Option<Replay<B>>,
        unprocessed: bool,
    },
}

/// Why a call could not be carried through, with the side that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ForwardError {
    /// The connection broke between the checkout and the request.
    #[error(transparent)]
    Send(#[from] UpstreamError),
    /// The upstream connection broke before the response headers came.
    #[error("upstream connection lost before the response: {0}")]
    UpstreamLost(#[source] h2::Error),
    /// The upstream reset the stream (RST_STREAM): passed on to the client
    /// as a reset with the same reason.
    #[error("upstream reset the call: {0}")]
    UpstreamReset(#[source] h2::Error),
}

/// Request-body pumps running on tasks of their own (streaming requests
/// whose client was still sending when the response headers came): a
/// count the process reads, so that a pump left running shows.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pumps(Arc<AtomicUsize>);

impl Pumps {
    pub(crate) fn running(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One running pump, counted while held.
#[derive(Debug)]
pub(crate) struct PumpHeld(Arc<AtomicUsize>);

impl PumpHeld {
    fn hold(pumps: &Pumps) -> Self {
        pumps.0.fetch_add(1, Ordering::Relaxed);
        Self(pumps.0.clone())
    }
}

impl Drop for PumpHeld {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The forwarder: each [`Call`] goes out on its slot. It holds no
/// resource of its own; the balancer awaits [`Forward::send`] inside its
/// own future (one boxed future per call, not two).
#[derive(Clone, Debug, Default)]
pub(crate) struct Forward {
    pumps: Pumps,
}

impl Forward {
    pub(crate) fn new(pumps: Pumps) -> Self {
        Self { pumps }
    }

    /// Sends `call` and waits for its response headers (the forwarding
    /// future itself: no `async` wrapper to copy it into).
    pub(crate) fn send<B>(&self, call: Call<B>) -> impl Future<Output = Attempt<B>> + Send + '_
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        forward(&self.pumps, call)
    }
}

async fn forward<B>(pumps: &Pumps, call: Call<B>) -> Attempt<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Call {
        request,
        checkout,
        outcome,
        max_age,
    } = call;
    let (mut parts, body) = request.into_parts();
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
    // The request's extensions end here, as they would with the request;
    // their map (allocated by the layers above) is kept, empty, for the
    // response, so that what the layers above note on the response costs
    // no new map per call.
    let mut extensions = std::mem::take(&mut parts.extensions);
    extensions.clear();
    let head = Request::from_parts(parts, ());
    let (mut response, tx, lease) = match checkout.send(head, end_of_stream) {
        Ok(sent) => sent,
        Err(e) => {
            // Nothing went out: the stream was never opened.
            return Attempt::Failed {
                error: ForwardError::Send(e),
                body: Some(body),
                unprocessed: true,
            };
        }
    };

    let mut pump = RequestPump::new(body, tx, lease.load().clone(), cut_reason);
    if end_of_stream {
        pump = pump.already_done();
    }
    let mut pumping = !end_of_stream;
    // Drive the request body while waiting for the response headers.
    let response = poll_fn(|cx| {
        if pumping && Pin::new(&mut pump).poll(cx).is_ready() {
            pumping = false;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    let response = match response {
        Ok(response) => response,
        Err(e) => {
            let unprocessed = (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
                || (e.is_go_away() && e.is_remote());
            // A refused stream that is not sent again passes to the client
            // as the same reset, which gRPC clients retry transparently.
            let error = if e.is_reset() && e.is_remote() {
                ForwardError::UpstreamReset(e)
            } else {
                ForwardError::UpstreamLost(e)
            };
            return Attempt::Failed {
                error,
                body: pump.into_body(),
                unprocessed,
            };
        }
    };
    let (mut parts, recv) = response.into_parts();
    if parts.extensions.is_empty() {
        parts.extensions = extensions;
    }
    // Headers that end the stream are all the answer there is: a
    // trailers-only status, or (without `grpc-status`) an HTTP error from
    // something in between, which gRPC reads as a status too.
    let trailers_only = recv.is_end_stream();
    let body = ResponseBody::new(recv, lease);
    if trailers_only {
        return Attempt::TrailersOnly(Response::from_parts(parts, body), pump.into_body());
    }
    if let Some(body) = pump.body_mut() {
        body.commit();
    }
    if !pump.is_done() && pumping {
        // The client is still sending (client or bidi streaming): the rest
        // of the request body gets its own task, which ends with the
        // request side of the call whichever way that ends.
        pump.held = Some(PumpHeld::hold(pumps));
        tokio::spawn(pump);
    }
    Attempt::Committed(Response::from_parts(parts, body.with(outcome, max_age)))
}
