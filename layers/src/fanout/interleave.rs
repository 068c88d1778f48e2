//! Interleave mode: every message of every destination, forwarded as it
//! arrives, each with the destination's metadata appended.
//!
//! Each destination has its own queue of `queue` messages, so one slow
//! destination holds back no other; a client that stops reading fills
//! every queue, and then every destination waits (flow control end to
//! end). The first destination to answer with response headers gives the
//! client its headers; the others' are dropped.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, request::Parts};
use http_body::{Body, Frame};
use tokio::{sync::mpsc, task::JoinSet};
use tower_service::Service;

use super::{
    Malformed as OnMalformed, RequestBody, ResponseBody, Settings,
    call::{self, Next, Reply},
    merge::trailers,
    report::{Outcome, Report},
    tee::{self, Outlet},
};
use crate::{
    BoxError,
    direct::FanOut,
    grpc::{
        framing::{self, PREFIX_LEN},
        status::{self, Code},
        wire,
    },
};

/// What a destination's task sends the client's body.
#[derive(Debug)]
enum Event {
    Headers(HeaderMap),
    /// A framed message, ready to send.
    Message(Bytes),
    End(Outcome),
}

/// The client's body of an interleaved fan-out.
#[derive(Debug)]
pub(super) struct Interleaved {
    queues: Vec<Option<mpsc::Receiver<Event>>>,
    outcomes: Vec<Option<Outcome>>,
    names: Vec<Arc<str>>,
    /// Where the next poll starts, so every destination gets its turn.
    next: usize,
    route: Option<Arc<str>>,
    settings: Arc<Settings>,
    done: bool,
    /// Messages that came before any destination's headers (the error
    /// messages of destinations that failed first), sent first. At most
    /// one per destination: a task sends no other message before headers.
    early: std::collections::VecDeque<Bytes>,
    /// The destinations' tasks and the request pump: dropped with the
    /// body, which cancels them.
    _tasks: JoinSet<()>,
}

pub(super) async fn interleave<S, B, RB>(
    svc: S,
    parts: Parts,
    body: B,
    route: FanOut,
    settings: Arc<Settings>,
) -> Response<ResponseBody<RB>>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<BoxError>,
{
    let destinations = route.destinations();
    let names: Vec<Arc<str>> = destinations.iter().map(|d| Arc::from(d.name())).collect();
    let mut tasks = JoinSet::new();
    let mut outlets = Vec::with_capacity(destinations.len());
    let mut queues = Vec::with_capacity(destinations.len());
    for (destination, name) in destinations.iter().zip(&names) {
        let (tx, tee) = tee::channel(settings.queue);
        outlets.push(Outlet::new(tx));
        let req = call::request(&parts, destination, route.stripped(), tee, false);
        let (events, queue) = mpsc::channel(settings.queue.max(1));
        queues.push(Some(queue));
        tasks.spawn(stream(
            svc.clone(),
            req,
            name.clone(),
            settings.clone(),
            events,
        ));
    }
    tasks.spawn(tee::pump(body, outlets));
    let mut body = Interleaved {
        outcomes: vec![None; names.len()],
        queues,
        names,
        next: 0,
        route: route.name().map(Arc::from),
        settings,
        done: false,
        early: std::collections::VecDeque::new(),
        _tasks: tasks,
    };
    let headers = std::future::poll_fn(|cx| body.poll_headers(cx)).await;
    let outcomes_known = body.queues.iter().all(Option::is_none);
    if headers.is_none() && outcomes_known && body.early.is_empty() {
        // Every destination ended without headers or a message: the
        // status alone, by the rule merge follows.
        let outcomes = body.finish();
        let (code, message) =
            call::call_status(&body.names, &outcomes, body.settings.fail_when_any);
        let mut res = status::trailers_only::<ResponseBody<RB>>(code, &message);
        if let Some(summary) = call::summary(&body.names, &outcomes) {
            res.headers_mut()
                .insert(body.settings.summary.clone(), summary);
        }
        return res;
    }
    // Headers from a destination, or (when none sent any) plain gRPC
    // headers, so that the error messages of the destinations that failed
    // reach the client before the status.
    let headers = headers.unwrap_or_else(|| {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(crate::grpc::CONTENT_TYPE),
        );
        h
    });
    let mut res = Response::new(ResponseBody::interleaved(body));
    *res.headers_mut() = headers;
    res
}

impl Interleaved {
    /// The first response headers any destination sends; `None` once no
    /// destination can send any (every one ended, or sent a message
    /// first: an error message of a destination that failed before
    /// answering). Messages that come before any headers are kept for the
    /// body, in order.
    fn poll_headers(&mut self, cx: &mut Context<'_>) -> Poll<Option<HeaderMap>> {
        let mut open = false;
        for i in 0..self.queues.len() {
            // Each queue is read until it is empty, so that its waker is
            // registered: an event left behind would never wake us.
            while let Some(queue) = &mut self.queues[i] {
                match queue.poll_recv(cx) {
                    Poll::Ready(Some(Event::Headers(h))) => return Poll::Ready(Some(h)),
                    Poll::Ready(Some(Event::End(o))) => self.end(i, o),
                    Poll::Ready(Some(Event::Message(m))) => self.early.push_back(m),
                    Poll::Ready(None) => self.end(i, Outcome::Cancelled),
                    Poll::Pending => {
                        open = true;
                        break;
                    }
                }
            }
        }
        if open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    /// Whether the body is over (nothing more will be sent).
    pub(super) fn is_end_stream(&self) -> bool {
        self.done
    }

    fn end(&mut self, i: usize, outcome: Outcome) {
        self.queues[i] = None;
        self.outcomes[i].get_or_insert(outcome);
    }

    /// Every outcome (cancelled where none came), reported once.
    fn finish(&mut self) -> Vec<Outcome> {
        self.done = true;
        let outcomes: Vec<Outcome> = self
            .outcomes
            .iter()
            .map(|o| o.clone().unwrap_or(Outcome::Cancelled))
            .collect();
        self.settings.report(Report {
            mirror: false,
            route: self.route.clone(),
            destinations: self
                .names
                .iter()
                .cloned()
                .zip(outcomes.iter().cloned())
                .collect(),
        });
        outcomes
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(m) = self.early.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(m))));
        }
        let n = self.queues.len();
        let mut open = false;
        for k in 0..n {
            let i = (self.next + k) % n;
            while let Some(queue) = &mut self.queues[i] {
                match queue.poll_recv(cx) {
                    Poll::Ready(Some(Event::Message(m))) => {
                        self.next = (i + 1) % n;
                        return Poll::Ready(Some(Ok(Frame::data(m))));
                    }
                    // A later destination's headers: the client has some.
                    Poll::Ready(Some(Event::Headers(_))) => {}
                    Poll::Ready(Some(Event::End(o))) => self.end(i, o),
                    Poll::Ready(None) => self.end(i, Outcome::Cancelled),
                    Poll::Pending => {
                        open = true;
                        break;
                    }
                }
            }
        }
        if open {
            return Poll::Pending;
        }
        let outcomes = self.finish();
        let (code, message) =
            call::call_status(&self.names, &outcomes, self.settings.fail_when_any);
        let mut t = trailers(&self.names, &outcomes, &self.settings.summary);
        if code != Code::Ok {
            status::insert(&mut t, code, &message);
        }
        Poll::Ready(Some(Ok(Frame::trailers(t))))
    }
}

/// One destination of an interleaved fan-out: its reply, message by
/// message, enriched, into its queue.
async fn stream<S, B, RB>(
    svc: S,
    req: Request<RequestBody<B>>,
    name: Arc<str>,
    settings: Arc<Settings>,
    events: mpsc::Sender<Event>,
) where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    let error = |outcome: &Outcome| match outcome {
        Outcome::Failed { code, message } => Some(framing::encode(
            &settings.append.error_message(&name, *code, message),
        )),
        _ => None,
    };
    let res = match call::call(svc, req, &settings).await {
        Ok(res) => res,
        Err(outcome) => {
            if let Some(m) = error(&outcome) {
                let _ = events.send(Event::Message(m)).await;
            }
            let _ = events.send(Event::End(outcome)).await;
            return;
        }
    };
    let (headers, mut reply) = Reply::new(res, settings.max_message_bytes);
    if !reply.is_trailers_only() && events.send(Event::Headers(headers)).await.is_err() {
        return;
    }
    let mut malformed = false;
    let outcome = loop {
        match reply.next().await {
            Next::Message(m) if m.compressed => {
                // Never rewritten: passed on as it came.
                let mut framed = BytesMut::with_capacity(PREFIX_LEN + m.payload.len());
                framed.extend_from_slice(&framing::prefix(true, m.payload.len()));
                framed.extend_from_slice(&m.payload);
                if events.send(Event::Message(framed.freeze())).await.is_err() {
                    return;
                }
            }
            Next::Message(m) => {
                let out = if wire::is_message(&m.payload) {
                    framing::encode(&settings.append.append(&m.payload, &name))
                } else if settings.malformed == OnMalformed::PassThrough {
                    malformed = true;
                    framing::encode(&m.payload)
                } else {
                    break Outcome::Failed {
                        code: Code::Internal,
                        message: format!("{name} sent a message that is not protobuf"),
                    };
                };
                if events.send(Event::Message(out)).await.is_err() {
                    return;
                }
            }
            Next::End(Outcome::Ok) if malformed => break Outcome::Malformed,
            Next::End(outcome) => break outcome,
        }
    };
    if let Some(m) = error(&outcome) {
        let _ = events.send(Event::Message(m)).await;
    }
    let _ = events.send(Event::End(outcome)).await;
}
