//! What every destination of a fan-out or mirror does: build its request,
//! call the inner service, and read its reply message by message.

use std::{pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, request::Parts};
use http_body::Body;
use tower_service::Service;

use super::{RequestBody, Settings, report::Outcome, tee::Tee};
use crate::{
    BoxError,
    direct::{Destination, Route},
    grpc::{
        framing::{Message, MessageDecoder},
        status::{self, Code},
    },
};

const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// The request for `destination`: the client's head (less `strip`), its
/// route narrowed to that destination, and its copy of the body. With
/// `identity`, the destination is asked not to compress its reply.
pub(super) fn request<B>(
    parts: &Parts,
    destination: &Destination,
    strip: &[HeaderName],
    tee: Tee,
    identity: bool,
) -> Request<RequestBody<B>> {
    let mut req =
        Request::new(RequestBody::tee(tee).with_first_message(destination.first_message()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    for key in strip {
        req.headers_mut().remove(key);
    }
    if identity {
        req.headers_mut()
            .insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    req.extensions_mut().insert(Route::One(destination.clone()));
    req
}

/// Calls a clone of the inner service once it is ready.
pub(super) async fn call<S, B, RB>(
    mut svc: S,
    req: Request<RequestBody<B>>,
    settings: &Settings,
) -> Result<Response<RB>, Outcome>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    let failed = |e: S::Error| {
        let (code, message) = (settings.classify)(&e.into());
        Outcome::Failed { code, message }
    };
    std::future::poll_fn(|cx| svc.poll_ready(cx))
        .await
        .map_err(failed)?;
    svc.call(req).await.map_err(failed)
}

/// The status in `headers` (trailers, or the head of a trailers-only
/// answer), as an outcome; `None` without `grpc-status`.
pub(super) fn outcome_of(headers: &HeaderMap) -> Option<Outcome> {
    let code = status::code_of(headers)?;
    if code == Code::Ok {
        return Some(Outcome::Ok);
    }
    let message = headers
        .get(status::GRPC_MESSAGE)
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(Outcome::Failed { code, message })
}

/// What a destination's reply yields next.
pub(super) enum Next {
    Message(Message),
    /// The reply is over; `Ok` or its failure.
    End(Outcome),
}

/// Reads a reply's messages and its final status.
pub(super) struct Reply<RB> {
    body: RB,
    decoder: MessageDecoder,
    end: Option<Outcome>,
}

impl<RB> Reply<RB>
where
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    /// The reply of `res`: a trailers-only answer ends at once.
    pub(super) fn new(res: Response<RB>, max_message: usize) -> (HeaderMap, Self) {
        let (parts, body) = res.into_parts();
        let end = outcome_of(&parts.headers);
        let reply = Self {
            body,
            decoder: MessageDecoder::new(max_message),
            end,
        };
        (parts.headers, reply)
    }

    /// Whether the head carried the status (trailers-only).
    pub(super) fn is_trailers_only(&self) -> bool {
        self.end.is_some()
    }

    pub(super) async fn next(&mut self) -> Next {
        loop {
            if let Some(end) = self.end.take() {
                return Next::End(end);
            }
            match self.decoder.next_message() {
                Ok(Some(m)) => return Next::Message(m),
                Ok(None) => {}
                Err(e) => {
                    return Next::End(Outcome::Failed {
                        code: Code::ResourceExhausted,
                        message: e.to_string(),
                    });
                }
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.decoder.push(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.end = Some(outcome_of(&trailers).unwrap_or_else(no_status));
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    return Next::End(Outcome::Failed {
                        code: Code::Unavailable,
                        message: format!("the reply broke off: {e}"),
                    });
                }
                None => return Next::End(no_status()),
            }
        }
    }
}

fn no_status() -> Outcome {
    Outcome::Failed {
        code: Code::Internal,
        message: "the reply ended without a grpc-status".to_owned(),
    }
}

/// The default classifier: the error's text, as UNAVAILABLE (most errors
/// of a sub-call are an upstream that cannot be reached).
pub(super) fn unavailable(e: &BoxError) -> (Code, String) {
    (Code::Unavailable, e.to_string())
}

/// The trailer summarising each destination's status:
/// `name=CODE, name=CODE` (names that are not header-safe are skipped).
pub(super) fn summary(names: &[Arc<str>], outcomes: &[Outcome]) -> Option<HeaderValue> {
    let text: Vec<String> = names
        .iter()
        .zip(outcomes)
        .filter(|(n, _)| {
            n.bytes()
                .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
        })
        .map(|(n, o)| format!("{n}={}", o.code().name()))
        .collect();
    HeaderValue::try_from(text.join(", ")).ok()
}

/// The status of a call whose destinations ended with `outcomes`: OK
/// unless the rule says the failures fail it; then the first failure's
/// code with every failure named.
pub(super) fn call_status(
    names: &[Arc<str>],
    outcomes: &[Outcome],
    fail_when_any: bool,
) -> (Code, String) {
    let failed: Vec<(&Arc<str>, &Outcome)> = names
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| o.is_failure())
        .collect();
    let fails = if fail_when_any {
        !failed.is_empty()
    } else {
        !outcomes.is_empty() && failed.len() == outcomes.len()
    };
    if !fails {
        return (Code::Ok, String::new());
    }
    let code = failed.first().map_or(Code::Unknown, |(_, o)| o.code());
    let what: Vec<String> = failed
        .iter()
        .map(|(n, o)| match o {
            Outcome::Failed { message, .. } => format!("{n}: {message}"),
            other => format!("{n}: {}", other.as_str()),
        })
        .collect();
    let lead = if failed.len() == outcomes.len() {
        "every destination failed"
    } else {
        "a destination failed"
    };
    (code, format!("{lead}: {}", what.join("; ")))
}
