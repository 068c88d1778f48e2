//! Sending a call more than once: transparent retry (always on), a
//! route's `retry` (one attempt after another) and its `hedge` (attempts
//! side by side), all from the request kept in a [`Replay`] until the call
//! is committed.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, request::Parts};
use http_body::Body;
use sluice_layers::{
    BoxError,
    grpc::{
        status::{self, Code},
        timeout,
    },
};
use tokio::time::Instant;

use super::{BalanceError, Endpoint, Way, policy};
use crate::{
    config::{HedgeConfig, RetryConfig},
    forward::{Attempt, Call, Forward, ForwardError, Limits, Replay, ResponseBody},
};

/// The metadata key A6 numbers a call's earlier attempts in.
const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// A call's head, kept to send again: the request's own head goes with
/// the first attempt.
struct Head {
    spare: Parts,
    /// When the call's deadline (its forwarded `grpc-timeout`) ends.
    deadline: Option<Instant>,
}

impl Head {
    fn keep(parts: &Parts) -> Self {
        let mut spare = Request::new(()).into_parts().0;
        spare.method = parts.method.clone();
        spare.uri = parts.uri.clone();
        spare.version = parts.version;
        spare.headers = parts.headers.clone();
        if let Some(cut) = parts.extensions.get::<sluice_layers::fanout::CutOff>() {
            spare.extensions.insert(*cut);
        }
        Self {
            deadline: Self::deadline_of(&parts.headers),
            spare,
        }
    }

    /// When the deadline of a call with `headers` ends: measured from
    /// when the balancer took the call, before it waited for an endpoint.
    fn deadline_of(headers: &http::HeaderMap) -> Option<Instant> {
        timeout::from_headers(headers).map(|t| Instant::now() + t)
    }

    /// The head of a later attempt: `previous` attempts went before it
    /// (none counted for a transparent retry), and its `grpc-timeout` is
    /// what is left of the call's.
    fn again(&self, previous: u32) -> Parts {
        let mut parts = Request::new(()).into_parts().0;
        parts.method = self.spare.method.clone();
        parts.uri = self.spare.uri.clone();
        parts.version = self.spare.version;
        parts.headers = self.spare.headers.clone();
        if let Some(cut) = self.spare.extensions.get::<sluice_layers::fanout::CutOff>() {
            parts.extensions.insert(*cut);
        }
        if previous > 0 {
            parts
                .headers
                .insert(PREVIOUS_ATTEMPTS, HeaderValue::from(previous));
        }
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            parts.headers.insert(
                timeout::GRPC_TIMEOUT,
                timeout::encode(left.max(Duration::from_millis(1))),
            );
        }
        parts
    }

    /// Whether waiting `wait` leaves time before the deadline.
    fn leaves_time(&self, wait: Duration) -> bool {
        self.deadline.is_none_or(|d| Instant::now() + wait < d)
    }
}

/// One attempt after another: the first at once, another when the last
/// failed before it was committed, for as long as the route's `retry`
/// (or, once, a transparent retry) allows.
pub(super) async fn sequential<B>(
    forward: &Forward,
    way: &Way<'_>,
    req: Request<B>,
    limits: &Limits,
    retry: Option<&RetryConfig>,
) -> Result<(Response<ResponseBody>, Arc<Endpoint>), BoxError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (endpoint, parts, head, body) = start(way, req, limits).await?;
    let request = Request::from_parts(parts, body);
    send_from(forward, way, request, head, endpoint, retry).await
}

/// What every call's attempts start from: its deadline (measured before
/// the wait for an endpoint), its first endpoint, its head kept for
/// another attempt, and its body made replayable.
async fn start<B>(
    way: &Way<'_>,
    req: Request<B>,
    limits: &Limits,
) -> Result<(Arc<Endpoint>, Parts, Head, Replay<B>), BoxError> {
    let deadline = Head::deadline_of(req.headers());
    let endpoint = way.first(super::Head::of(&req)).await?;
    let (parts, body) = req.into_parts();
    let mut head = Head::keep(&parts);
    head.deadline = deadline;
    Ok((endpoint, parts, head, Replay::new(body, limits.clone())))
}

/// [`sequential`] from a request already made replayable (and perhaps
/// read ahead), with its head kept and its first endpoint chosen.
async fn send_from<B>(
    forward: &Forward,
    way: &Way<'_>,
    mut request: Request<Replay<B>>,
    head: Head,
    mut endpoint: Arc<Endpoint>,
    retry: Option<&RetryConfig>,
) -> Result<(Response<ResponseBody>, Arc<Endpoint>), BoxError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    // Attempts that count against `max_attempts`.
    let mut counted = 0u32;
    let mut transparent = false;
    // Retries since the last pushback: the backoff's exponent (A6 starts
    // it again after a pushback).
    let mut backoffs = 0u32;
    // The last attempt's answer, kept while the next is dialled: if no
    // connection can be had, the client gets this answer, not the dial's.
    let mut last: Option<Result<Response<ResponseBody>, ForwardError>> = None;
    loop {
        let checkout = match way.checkout(super::Head::of(&request), &mut endpoint).await {
            Ok(checkout) => checkout,
            Err(e) => {
                return match last {
                    Some(answer) => answer_of(answer, endpoint),
                    None => Err(e.into()),
                };
            }
        };
        drop(last.take());
        let sent = Instant::now();
        let attempt = forward
            .send(Call {
                request,
                checkout,
                outcome: way.judge(&endpoint),
                max_age: way.max_age,
            })
            .await;
        counted += 1;
        let (code, answer, body, unprocessed) = match attempt {
            Attempt::Committed(res) => {
                endpoint.observe(sent.elapsed());
                if retry.is_some() {
                    way.group.attempted(Some(false));
                }
                return Ok((res, endpoint));
            }
            Attempt::TrailersOnly(res, body) => {
                endpoint.observe(sent.elapsed());
                let code = code_of_answer(&res);
                if way.group.judges() {
                    way.group.ended(&endpoint, code);
                }
                (code, Ok(res), body, false)
            }
            Attempt::Failed {
                error,
                body,
                unprocessed,
            } => {
                if way.group.judges() && !unprocessed {
                    way.group.ended(&endpoint, None);
                }
                (None, Err(error), body, unprocessed)
            }
        };
        // What the retry policy makes of the answer: a status it retries
        // (no status counts as UNAVAILABLE; an upstream reset is passed
        // on), for the throttle too.
        let retryable_code = match (code, &answer) {
            (_, _) if unprocessed => None,
            (Some(code), _) => Some(code),
            (None, Err(ForwardError::UpstreamReset(_))) => None,
            (None, _) => Some(Code::Unavailable),
        };
        if let Some(r) = retry {
            way.group.attempted(match retryable_code {
                Some(Code::Ok) => Some(false),
                Some(c) if r.retryable_codes.contains(&c) => Some(true),
                _ => None,
            });
        }
        let Some(mut body) = body.filter(|b| b.replayable()) else {
            return answer_of(answer, endpoint);
        };
        tried.push(endpoint.clone());
        let wait = if unprocessed && !transparent {
            // The upstream never saw it: once more, whatever the policy,
            // not counted as an attempt.
            transparent = true;
            counted -= 1;
            Some(Duration::ZERO)
        } else {
            match (retry, retryable_code) {
                (Some(r), Some(c)) => retry_wait(r, &answer, c, counted, backoffs, way, &head).map(
                    |(wait, pushed)| {
                        backoffs = if pushed { 0 } else { backoffs + 1 };
                        wait
                    },
                ),
                _ => None,
            }
        };
        let Some(wait) = wait else {
            return answer_of(answer, endpoint);
        };
        let Some(again) = way.again(super::Head::of_parts(&head.spare), &tried) else {
            return answer_of(answer, endpoint);
        };
        tracing::debug!(
            attempt = counted + 1,
            ?code,
            endpoint = %again.label(),
            ?wait,
            "sending the call again"
        );
        last = Some(answer);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        body.rewind();
        endpoint = again;
        request = Request::from_parts(head.again(counted), body);
    }
}

/// How long to wait before retrying a call whose attempt `counted` ended
/// with `code`, and whether that is the server's pushback; or `None` not
/// to retry: the code is not retryable, the attempts are spent, the
/// group's throttle is low, the server's pushback says no, or the wait
/// would outlive the deadline. `backoffs` retries have backed off since
/// the last pushback.
fn retry_wait(
    retry: &RetryConfig,
    answer: &Result<Response<ResponseBody>, ForwardError>,
    code: Code,
    counted: u32,
    backoffs: u32,
    way: &Way<'_>,
    head: &Head,
) -> Option<(Duration, bool)> {
    if !retry.retryable_codes.contains(&code) || counted >= retry.max_attempts {
        return None;
    }
    if !way.group.may_retry() {
        tracing::debug!(group = %way.group.name(), "retry throttled");
        return None;
    }
    let wait = match answer
        .as_ref()
        .ok()
        .and_then(|r| policy::pushback(r.headers()))
    {
        Some(Some(wait)) => (wait, true),
        Some(None) => return None,
        None => (policy::backoff(retry, backoffs + 1), false),
    };
    head.leaves_time(wait.0).then_some(wait)
}

/// The status of an answer without a body: its `grpc-status`, else what
/// gRPC makes of its HTTP status (a proxy's 503 is UNAVAILABLE).
fn code_of_answer<B>(res: &Response<B>) -> Option<Code> {
    if let Some(code) = status::code_of(res.headers()) {
        return Some(code);
    }
    Some(match res.status().as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    })
}

fn answer_of(
    answer: Result<Response<ResponseBody>, ForwardError>,
    endpoint: Arc<Endpoint>,
) -> Result<(Response<ResponseBody>, Arc<Endpoint>), BoxError> {
    match answer {
        Ok(res) => Ok((res, endpoint)),
        Err(e) => Err(e.into()),
    }
}

/// How long a hedged call waits for its whole request at least (a hedge
/// delay of zero sends every attempt at once, which needs the request in
/// hand): the DATA of a unary call comes right after its HEADERS.
const WHOLE_REQUEST_WAIT: Duration = Duration::from_millis(50);

/// Attempts side by side: the first at once, one more every `delay`
/// while none has answered, each to an endpoint not yet tried; the first
/// response headers win and the others are dropped (their streams reset
/// with CANCEL). A further attempt needs the whole request in hand
/// (within the retry buffer), so a call still streaming its request when
/// the delay passes goes on as one attempt.
pub(super) async fn hedged<B>(
    forward: &Forward,
    way: &Way<'_>,
    req: Request<B>,
    limits: &Limits,
    hedge: &HedgeConfig,
) -> Result<(Response<ResponseBody>, Arc<Endpoint>), BoxError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    use futures_util::{FutureExt, StreamExt, stream::FuturesUnordered};

    let (first, parts, head, mut body) = start(way, req, limits).await?;
    // Read the request while it comes, up to the first hedge's delay: a
    // unary call's whole request is in hand at once. What is read is owed
    // to the first attempt whatever happens.
    let whole = tokio::time::timeout(hedge.delay.max(WHOLE_REQUEST_WAIT), body.read_ahead()).await;
    let copy = match whole {
        Ok(Ok(true)) => body.snapshot(),
        // The client's request failed: nothing to send.
        Ok(Err(e)) => return Err(e),
        // Still streaming, or past the buffer: one attempt, with no more
        // than a transparent retry.
        Ok(Ok(false)) | Err(_) => None,
    };
    let Some(copy) = copy else {
        return send_from(
            forward,
            way,
            Request::from_parts(parts, body),
            head,
            first,
            None,
        )
        .await;
    };
    let mut tried = vec![first.clone()];
    let mut running = FuturesUnordered::new();
    let launch = |endpoint: Arc<Endpoint>, parts: Parts, body: Replay<_>| {
        async move {
            let mut endpoint = endpoint;
            let request = Request::from_parts(parts, body);
            let checkout = match way.checkout(super::Head::of(&request), &mut endpoint).await {
                Ok(c) => c,
                Err(e) => return (Err(e), endpoint),
            };
            let sent = Instant::now();
            let attempt = forward
                .send(Call {
                    request,
                    checkout,
                    outcome: way.judge(&endpoint),
                    max_age: way.max_age,
                })
                .await;
            if !matches!(attempt, Attempt::Failed { .. }) {
                endpoint.observe(sent.elapsed());
            }
            (Ok(attempt), endpoint)
        }
        .boxed()
    };
    let mut first_body = copy.snapshot();
    let mut first_parts = Some(parts);
    let mut launched = 0u32;
    let mut last: Option<(Result<Response<ResponseBody>, BoxError>, Arc<Endpoint>)> = None;
    // The next attempt goes at the top of the loop: the first at once, a
    // hedge when the timer fires, the next after a non-fatal answer.
    let mut launch_now = true;
    let mut timer = Box::pin(tokio::time::sleep(hedge.delay));
    loop {
        let may_launch = launched < hedge.max_attempts
            && (launched == 0 || (way.group.may_retry() && head.leaves_time(Duration::ZERO)));
        if launch_now && may_launch {
            launch_now = false;
            let endpoint = if launched == 0 {
                Some(first.clone())
            } else {
                way.again(super::Head::of_parts(&head.spare), &tried)
            };
            let parts = first_parts.take().unwrap_or_else(|| head.again(launched));
            match (endpoint, first_body.take().or_else(|| copy.snapshot())) {
                (Some(endpoint), Some(body)) => {
                    tried.push(endpoint.clone());
                    running.push(launch(endpoint, parts, body));
                    launched += 1;
                    timer.as_mut().reset(Instant::now() + hedge.delay);
                }
                _ => launched = hedge.max_attempts,
            }
            continue;
        }
        if running.is_empty() && !may_launch {
            return match last {
                Some((Ok(res), endpoint)) => Ok((res, endpoint)),
                Some((Err(e), _)) => Err(e),
                None => Err(BalanceError::NoEndpoint(way.target.to_owned()).into()),
            };
        }
        tokio::select! {
            () = &mut timer, if may_launch => launch_now = true,
            Some((outcome, endpoint)) = running.next() => {
                match outcome {
                    Ok(Attempt::Committed(res)) => {
                        way.group.attempted(Some(false));
                        return Ok((res, endpoint));
                    }
                    Ok(Attempt::TrailersOnly(res, _)) => {
                        let code = code_of_answer(&res);
                        if way.group.judges() {
                            way.group.ended(&endpoint, code);
                        }
                        let fatal = !code.is_some_and(|c| hedge.non_fatal_codes.contains(&c));
                        way.group.attempted(match code {
                            Some(Code::Ok) => Some(false),
                            _ if !fatal => Some(true),
                            _ => None,
                        });
                        if fatal {
                            return Ok((res, endpoint));
                        }
                        // Non-fatal: the next hedge goes now, unless the
                        // server's pushback says otherwise.
                        match policy::pushback(res.headers()) {
                            Some(None) => launched = hedge.max_attempts,
                            Some(Some(wait)) => timer.as_mut().reset(Instant::now() + wait),
                            None => launch_now = true,
                        }
                        last = Some((Ok(res), endpoint));
                    }
                    Ok(Attempt::Failed { error, unprocessed, .. }) => {
                        if !unprocessed {
                            if way.group.judges() {
                                way.group.ended(&endpoint, None);
                            }
                            // A reset passes to the client as it is; a
                            // lost connection is UNAVAILABLE, fatal
                            // unless the policy says otherwise.
                            let non_fatal = !matches!(error, ForwardError::UpstreamReset(_))
                                && hedge.non_fatal_codes.contains(&Code::Unavailable);
                            if !non_fatal {
                                return Err(error.into());
                            }
                            way.group.attempted(Some(true));
                        }
                        // Unprocessed, or non-fatal: the next goes now.
                        launch_now = true;
                        last = Some((Err(error.into()), endpoint));
                    }
                    Err(e) => {
                        launch_now = true;
                        last = Some((Err(e.into()), endpoint));
                    }
                }
            }
            else => {}
        }
    }
}
