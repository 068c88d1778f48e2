//! Mirror: every request frame to the primary and every secondary; the
//! primary's answer to the client; each secondary's reply read and
//! dropped; a report with every outcome when the last one ends.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, request::Parts};
use http_body::{Body, Frame};
use tokio::task::{AbortHandle, JoinSet};
use tower_service::Service;

use super::{
    RequestBody, ResponseBody, Settings,
    call::{self, Next, Reply},
    report::{Outcome, Report},
    tee::{self, Outlet},
};
use crate::{
    BoxError,
    direct::{Mirror, OnError, Overflow},
    grpc::status::{self, Code},
};

type Slot = Arc<Mutex<Option<Outcome>>>;

/// Everything a mirrored call owns besides the primary's body: the
/// secondaries, the request pump and the outcomes. Dropping it before the
/// primary ended (a cancel) cancels them all; after, the secondaries
/// finish on their own. Either way the report is made once all are done.
#[derive(Debug)]
struct Calls {
    secondaries: JoinSet<()>,
    slots: Vec<Slot>,
    /// Per secondary: whether its failure fails the call.
    fail: Vec<bool>,
    pump: AbortHandle,
    names: Vec<Arc<str>>,
    primary: Option<Outcome>,
    route: Option<Arc<str>>,
    settings: Arc<Settings>,
    reported: bool,
    /// Already moved into a task that waits for the secondaries.
    detached: bool,
}

/// The client's body of a mirrored call: the primary's, frame by frame.
#[derive(Debug)]
pub(super) struct MirrorBody<B> {
    inner: B,
    calls: Option<Calls>,
    /// The primary's trailers, held while secondaries whose failure fails
    /// the call are still running.
    held: Option<HeaderMap>,
    /// How long the held trailers may wait.
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

pub(super) async fn mirror<S, B, RB>(
    svc: S,
    parts: Parts,
    body: B,
    route: Mirror,
    settings: Arc<Settings>,
) -> Result<Response<ResponseBody<RB>>, BoxError>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<BoxError>,
{
    let mut names = vec![Arc::<str>::from(route.primary().name())];
    let (ptx, primary_tee) = tee::channel(settings.queue);
    let mut outlets = vec![Outlet::new(ptx)];
    let mut secondaries = JoinSet::new();
    let mut slots = Vec::new();
    let mut fail = Vec::new();
    for secondary in route.secondaries() {
        let destination = secondary.destination();
        names.push(Arc::from(destination.name()));
        let (tx, tee) = tee::channel(settings.queue);
        let mut req = call::request(&parts, destination, &[], tee, false);
        req.extensions_mut().insert(super::CutOff);
        let slot: Slot = Arc::default();
        let task = secondaries.spawn(discard(svc.clone(), req, slot.clone(), settings.clone()));
        outlets.push(match secondary.overflow_policy() {
            Overflow::Drop => Outlet::dropping(tx, slot.clone(), task),
            _ => Outlet::new(tx),
        });
        slots.push(slot);
        fail.push(secondary.error_policy() == OnError::Fail);
    }
    let pump = tokio::spawn(tee::pump(body, outlets)).abort_handle();
    let mut calls = Calls {
        secondaries,
        slots,
        fail,
        pump,
        names,
        primary: None,
        route: route.name().map(Arc::from),
        settings: settings.clone(),
        reported: false,
        detached: false,
    };
    let req = call::request(&parts, route.primary(), &[], primary_tee, false);
    let mut svc = svc;
    let ready: Result<(), BoxError> = std::future::poll_fn(|cx| svc.poll_ready(cx))
        .await
        .map_err(Into::into);
    let answer: Result<Response<RB>, BoxError> = match ready {
        Ok(()) => svc.call(req).await.map_err(Into::into),
        Err(e) => Err(e),
    };
    match answer {
        Ok(res) => {
            let (mut head, inner) = res.into_parts();
            // A trailers-only answer is the primary's whole outcome.
            calls.primary = call::outcome_of(&head.headers);
            let mut ended = calls.primary.is_some();
            let mut held = None;
            if calls.primary == Some(Outcome::Ok) && calls.fail.iter().any(|f| *f) {
                // An OK that a failing secondary may still turn into
                // INTERNAL: the status moves to trailers, which wait.
                held = Some(take_status(&mut head.headers));
                ended = false;
            }
            Ok(Response::from_parts(
                head,
                ResponseBody::mirror(MirrorBody {
                    inner,
                    calls: Some(calls),
                    held,
                    grace: None,
                    ended,
                }),
            ))
        }
        Err(e) => {
            // Returned as it is (Praefect does the same); the secondaries
            // are cancelled and the report made.
            let (code, message) = (settings.classify)(&e);
            calls.primary = Some(Outcome::Failed { code, message });
            calls.cancel();
            Err(e)
        }
    }
}

/// The status headers of a trailers-only head, taken out as trailers.
fn take_status(headers: &mut HeaderMap) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    for key in [
        status::GRPC_STATUS,
        status::GRPC_MESSAGE,
        "grpc-status-details-bin",
    ] {
        if let Some(v) = headers.remove(key) {
            trailers.insert(key, v);
        }
    }
    trailers
}

/// A secondary: its reply read to the end and dropped, its outcome in
/// `slot`.
async fn discard<S, B, RB>(
    svc: S,
    req: Request<RequestBody<B>>,
    slot: Slot,
    settings: Arc<Settings>,
) where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    let outcome = match call::call(svc, req, &settings).await {
        Err(outcome) => outcome,
        Ok(res) => {
            // Messages are not kept: any size is fine.
            let (_, mut reply) = Reply::new(res, usize::MAX);
            loop {
                if let Next::End(outcome) = reply.next().await {
                    break outcome;
                }
            }
        }
    };
    slot.lock().expect("outcome lock").get_or_insert(outcome);
}

impl Calls {
    /// Outcomes of the secondaries so far (cancelled where none).
    fn outcomes(&self) -> Vec<Outcome> {
        self.slots
            .iter()
            .map(|s| {
                s.lock()
                    .expect("outcome lock")
                    .clone()
                    .unwrap_or(Outcome::Cancelled)
            })
            .collect()
    }

    fn report(&self) {
        let mut destinations = vec![(
            self.names[0].clone(),
            self.primary.clone().unwrap_or(Outcome::Cancelled),
        )];
        destinations.extend(self.names[1..].iter().cloned().zip(self.outcomes()));
        self.settings.report(Report {
            mirror: true,
            route: self.route.clone(),
            destinations,
        });
    }

    /// The first failed secondary whose failure fails the call.
    fn failing(&self) -> Option<(Arc<str>, String)> {
        self.outcomes()
            .into_iter()
            .zip(&self.fail)
            .zip(&self.names[1..])
            .find_map(|((o, fail), name)| match o {
                Outcome::Failed { message, .. } if *fail => Some((name.clone(), message)),
                _ => None,
            })
    }
}

impl Calls {
    /// Stops everything still running and reports.
    fn cancel(&mut self) {
        if self.reported {
            return;
        }
        self.pump.abort();
        self.secondaries.abort_all();
        self.reported = true;
        self.report();
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        // Cancelled (the primary never ended), nothing left to wait for,
        // already waited on once, or no runtime: everything stops now.
        if self.primary.is_none() || self.secondaries.is_empty() || self.detached {
            self.cancel();
            return;
        }
        let Ok(runtime) = runtime else {
            self.cancel();
            return;
        };
        // The primary answered: the secondaries finish on their own (each
        // bounded by its deadline), and the report waits for them.
        let mut rest = Self {
            secondaries: std::mem::take(&mut self.secondaries),
            slots: std::mem::take(&mut self.slots),
            fail: std::mem::take(&mut self.fail),
            pump: self.pump.clone(),
            names: std::mem::take(&mut self.names),
            primary: self.primary.take(),
            route: self.route.take(),
            settings: self.settings.clone(),
            reported: false,
            detached: true,
        };
        self.reported = true;
        let grace = rest.settings.secondary_grace;
        runtime.spawn(async move {
            // Bounded: a secondary that never answers is cancelled (and
            // reported so) `secondary_grace` after the primary ended.
            let _ = tokio::time::timeout(grace, async {
                while rest.secondaries.join_next().await.is_some() {}
            })
            .await;
            rest.cancel();
        });
    }
}

impl<B> MirrorBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Whether nothing follows: the primary's answer was trailers-only (or
    /// it is over). Said up front so that a trailers-only answer stays one
    /// HEADERS frame with END_STREAM, as the primary sent it, and not
    /// headers plus an empty DATA frame, which gRPC clients read as a
    /// missing status.
    pub(super) fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_none()
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(trailers) = self.held.take() {
                let Some(calls) = self.calls.as_mut() else {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                };
                // Wait for every secondary before the end of the call, at
                // most `secondary_grace`; then the ones left are cancelled.
                while let Poll::Ready(Some(_)) = calls.secondaries.poll_join_next(cx) {}
                if !calls.secondaries.is_empty() {
                    let grace = calls.settings.secondary_grace;
                    let timer = self
                        .grace
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(grace)));
                    if timer.as_mut().poll(cx).is_pending() {
                        self.held = Some(trailers);
                        return Poll::Pending;
                    }
                    calls.secondaries.abort_all();
                }
                let mut trailers = trailers;
                if calls.primary == Some(Outcome::Ok)
                    && let Some((name, message)) = calls.failing()
                {
                    status::insert(
                        &mut trailers,
                        Code::Internal,
                        &format!("mirror destination {name} failed: {message}"),
                    );
                }
                self.ended = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
            let calls = self.calls.as_mut();
            match frame {
                Some(Ok(frame)) => match frame.into_trailers() {
                    Ok(trailers) => {
                        if let Some(calls) = calls {
                            calls.primary =
                                Some(call::outcome_of(&trailers).unwrap_or(Outcome::Failed {
                                    code: Code::Internal,
                                    message: "no grpc-status".to_owned(),
                                }));
                            if calls.fail.iter().any(|f| *f) {
                                self.held = Some(trailers);
                                continue;
                            }
                        }
                        self.ended = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    if let Some(calls) = calls {
                        let (code, message) = (calls.settings.classify)(&e);
                        calls.primary = Some(Outcome::Failed { code, message });
                    }
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    if let Some(calls) = calls {
                        calls.primary.get_or_insert(Outcome::Ok);
                    }
                    self.ended = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}
