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

mod stream;

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sluice_layers::BoxError;
use tower::Service;

use self::stream::RequestPump;
pub(crate) use self::stream::ResponseBody;
use crate::upstream::{Checkout, UpstreamError};

/// A call handed to the forwarder: the request, and the stream slot on an
/// upstream connection it goes out on.
#[derive(Debug)]
pub(crate) struct Call<B> {
    pub(crate) request: Request<B>,
    pub(crate) checkout: Checkout,
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

/// The forwarder service: each [`Call`] goes out on its slot.
///
/// Always ready: it holds no resource of its own.
#[derive(Clone, Debug, Default)]
pub(crate) struct Forward {
    pumps: Pumps,
}

impl Forward {
    pub(crate) fn new(pumps: Pumps) -> Self {
        Self { pumps }
    }
}

impl<B> Service<Call<B>> for Forward
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

    fn call(&mut self, call: Call<B>) -> Self::Future {
        Box::pin(forward(self.pumps.clone(), call))
    }
}

async fn forward<B>(pumps: Pumps, call: Call<B>) -> Result<Response<ResponseBody>, ForwardError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Call { request, checkout } = call;
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
    let (mut response, tx, lease) = checkout.send(head, end_of_stream)?;

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
        pump.held = Some(PumpHeld::hold(&pumps));
        tokio::spawn(pump);
    }
    let response = response.map_err(|e| {
        if e.is_reset() && e.is_remote() {
            ForwardError::UpstreamReset(e)
        } else {
            ForwardError::UpstreamLost(e)
        }
    })?;
    let (mut parts, recv) = response.into_parts();
    if parts.extensions.is_empty() {
        parts.extensions = extensions;
    }
    Ok(Response::from_parts(parts, ResponseBody::new(recv, lease)))
}
