//! Merge mode: every destination's unary reply, concatenated into one.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::Poll,
};

use bytes::Bytes;
use futures_util::{StreamExt, stream::FuturesUnordered};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, request::Parts};
use http_body::Body;
use tower_service::Service;

use super::{
    Malformed as OnMalformed, RequestBody, ResponseBody, Settings,
    call::{self, Next, Reply},
    report::{Outcome, Report},
    tee::{self, Outlet},
};
use crate::{
    BoxError,
    direct::{FanOut, Mode},
    grpc::{
        framing,
        status::{self, Code},
    },
};

/// One destination's reply, read whole.
struct Collected {
    index: usize,
    headers: Option<HeaderMap>,
    messages: Vec<framing::Message>,
    outcome: Outcome,
}

pub(super) async fn merge<S, B, RB>(
    svc: S,
    parts: Parts,
    mut body: B,
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
    // The destinations and the request pump are driven by this future
    // itself, no task each: dropping it (the client cancelled) drops them,
    // which cancels every destination.
    let budget = Arc::new(AtomicUsize::new(settings.max_reply_bytes));
    let (early, complete) = tee::prefetch(&mut body);
    let mut outlets = Vec::with_capacity(destinations.len());
    // Only the destinations that were woken are polled again.
    let mut calls = FuturesUnordered::new();
    for (index, destination) in destinations.iter().enumerate() {
        let (tx, tee) = tee::split(&early, complete, settings.queue);
        outlets.extend(tx.map(Outlet::new));
        // Merging rewrites the reply, so it must arrive uncompressed.
        let req = call::request(&parts, destination, route.stripped(), tee, true);
        calls.push(collect(
            index,
            svc.clone(),
            req,
            settings.clone(),
            budget.clone(),
        ));
    }
    // A request that was all there needs no pump.
    let mut pump = (!complete).then(|| Box::pin(tee::pump(body, outlets)));

    let mut replies: Vec<Option<Collected>> = (0..names.len()).map(|_| None).collect();
    let mut arrival = Vec::with_capacity(names.len());
    std::future::poll_fn(|cx| {
        if let Some(p) = pump.as_mut()
            && p.as_mut().poll(cx).is_ready()
        {
            pump = None;
        }
        while let Poll::Ready(next) = calls.poll_next_unpin(cx) {
            let Some(c) = next else {
                return Poll::Ready(());
            };
            arrival.push(c.index);
            let index = c.index;
            replies[index] = Some(c);
        }
        Poll::Pending
    })
    .await;
    // The request pump, if the client is still sending, is cut off here.
    drop(pump);

    let order: Vec<usize> = if route.mode() == Mode::MergeByArrival {
        arrival
    } else {
        (0..names.len()).collect()
    };
    let mut outcomes: Vec<Outcome> = replies
        .iter()
        .map(|r| r.as_ref().map_or(Outcome::Cancelled, |c| c.outcome.clone()))
        .collect();
    let over_budget = outcomes.iter().any(|o| {
        matches!(
            o,
            Outcome::Failed {
                code: Code::ResourceExhausted,
                ..
            }
        )
    });
    let mut merged = Vec::new();
    let mut head = None;
    for &i in &order {
        let name = &names[i];
        let Some(reply) = replies[i].take() else {
            continue;
        };
        if head.is_none() && !outcomes[i].is_failure() {
            head = reply.headers;
        }
        for message in &reply.messages {
            if message.compressed {
                outcomes[i] = Outcome::Failed {
                    code: Code::Internal,
                    message: "the reply is compressed; a merge does not rewrite compressed replies"
                        .to_owned(),
                };
                break;
            }
            if let Err(e) = settings
                .append
                .merge_entries(&mut merged, &message.payload, name)
            {
                match settings.malformed {
                    OnMalformed::Fail => {
                        outcomes[i] = Outcome::Failed {
                            code: Code::Internal,
                            message: e.to_string(),
                        };
                        settings.report(Report {
                            mirror: false,
                            route: route.name().map(Arc::from),
                            destinations: names.iter().cloned().zip(outcomes).collect(),
                        });
                        return status::trailers_only(Code::Internal, &e.to_string());
                    }
                    OnMalformed::PassThrough => {
                        merged.extend_from_slice(&message.payload);
                        outcomes[i] = Outcome::Malformed;
                    }
                }
            }
        }
        if let Outcome::Failed { code, message } = &outcomes[i] {
            settings
                .append
                .error_entry(&mut merged, name, *code, message);
        }
    }
    let report = |outcomes: &[Outcome]| {
        settings.report(Report {
            mirror: false,
            route: route.name().map(Arc::from),
            destinations: names
                .iter()
                .cloned()
                .zip(outcomes.iter().cloned())
                .collect(),
        });
    };
    if over_budget || merged.len() > settings.max_reply_bytes {
        report(&outcomes);
        return status::trailers_only(
            Code::ResourceExhausted,
            &format!(
                "the merged reply is over {} bytes (max_reply_bytes)",
                settings.max_reply_bytes
            ),
        );
    }
    let (code, message) = call::call_status(&names, &outcomes, settings.fail_when_any);
    report(&outcomes);
    if code != Code::Ok {
        let mut res = status::trailers_only::<ResponseBody<RB>>(code, &message);
        if let Some(summary) = call::summary(&names, &outcomes) {
            res.headers_mut().insert(settings.summary.clone(), summary);
        }
        return res;
    }
    let mut res = Response::new(ResponseBody::merged(
        Some(framing::encode(&merged)),
        Some(trailers(&names, &outcomes, &settings.summary)),
    ));
    if let Some(mut headers) = head {
        headers.remove(http::header::CONTENT_LENGTH);
        headers.remove("grpc-encoding");
        *res.headers_mut() = headers;
    } else {
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(crate::grpc::CONTENT_TYPE),
        );
    }
    res
}

/// OK trailers with the summary under `key`.
pub(super) fn trailers(names: &[Arc<str>], outcomes: &[Outcome], key: &HeaderName) -> HeaderMap {
    let mut t = status::trailers(Code::Ok, "");
    if let Some(summary) = call::summary(names, outcomes) {
        t.insert(key.clone(), summary);
    }
    t
}

async fn collect<S, B, RB>(
    index: usize,
    svc: S,
    req: Request<RequestBody<B>>,
    settings: Arc<Settings>,
    budget: Arc<AtomicUsize>,
) -> Collected
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    let res = match call::call(svc, req, &settings).await {
        Ok(res) => res,
        Err(outcome) => {
            return Collected {
                index,
                headers: None,
                messages: Vec::new(),
                outcome,
            };
        }
    };
    let (headers, mut reply) = Reply::new(res, settings.max_reply_bytes);
    let mut messages = Vec::new();
    let outcome = loop {
        match reply.next().await {
            Next::Message(m) => {
                let took = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(m.payload.len())
                });
                if took.is_err() {
                    break Outcome::Failed {
                        code: Code::ResourceExhausted,
                        message: format!(
                            "the replies are over {} bytes (max_reply_bytes)",
                            settings.max_reply_bytes
                        ),
                    };
                }
                messages.push(m);
            }
            Next::End(outcome) => break outcome,
        }
    };
    Collected {
        index,
        headers: Some(headers),
        messages,
        outcome,
    }
}
