//! Per-call metrics: calls by service, method and gRPC status, latency,
//! request and response messages and bytes.
//!
//! The outermost layer of the stack, so it sees every call, refusals
//! included. A call is recorded once, when its response body ends or is
//! dropped: that is when a gRPC call ends.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll, ready},
    time::Instant,
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};
use sluice_layers::grpc::{
    framing::MessageCounter,
    status::{self, Code},
};
use tower::Service;

mod body;

use self::body::{AccessCall, Call, MeteredRequest, MeteredResponse};
use super::{
    access::{AccessLog, Entry},
    refusals::{RefusalReason, Refusals},
};

/// Distinct `/service/method` paths tracked; calls to further paths are
/// counted as service `other`, so a client inventing method names cannot
/// grow sluice's memory or the scrape without bound.
const MAX_TRACKED_PATHS: usize = 1000;

/// A label value shared by reference count, so labelling a call allocates
/// nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Label(Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    service: Label,
    method: Label,
}

/// Calls by the upstream group they went to, and their status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamLabels {
    route: Label,
    group: Label,
    grpc_code: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CallLabels {
    service: Label,
    method: Label,
    grpc_code: Label,
}

/// The per-call metric families.
#[derive(Debug)]
pub(crate) struct CallFamilies {
    pub(crate) calls: Family<CallLabels, Counter>,
    pub(crate) duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pub(crate) request_messages: Family<MethodLabels, Counter>,
    pub(crate) response_messages: Family<MethodLabels, Counter>,
    pub(crate) request_bytes: Family<MethodLabels, Counter>,
    pub(crate) response_bytes: Family<MethodLabels, Counter>,
    /// Calls by upstream group (the groups of the config: bounded).
    pub(crate) upstream_calls: Family<UpstreamLabels, Counter>,
    /// Per route and group, `upstream_calls` by gRPC code, resolved on
    /// first use.
    groups: Mutex<GroupCounters>,
    paths: Mutex<HashMap<Box<str>, Arc<Handles>>>,
    /// Where calls to paths beyond [`MAX_TRACKED_PATHS`] are counted.
    other: std::sync::OnceLock<Arc<Handles>>,
}

/// `upstream_calls` counters by route, then group: names from the config
/// (or the control plane), never from a client, so they are hashed with
/// FNV-1a rather than SipHash (two lookups per call).
type GroupCounters = HashMap<Arc<str>, HashMap<Arc<str>, [OnceLock<Counter>; 17], Fnv>, Fnv>;

/// FNV-1a, for short keys a client does not choose.
#[derive(Clone, Copy, Debug)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Fnv = std::hash::BuildHasherDefault<Fnv1a>;

/// Pre-resolved handles for one path.
#[derive(Debug)]
struct Handles {
    labels: MethodLabels,
    /// `calls_total` per gRPC code, resolved on first use.
    codes: [OnceLock<Counter>; 17],
    duration: Histogram,
    request_messages: Counter,
    response_messages: Counter,
    request_bytes: Counter,
    response_bytes: Counter,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~65 s in doublings: sidecar hops to long streams.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_25, 2.0, 19,
    ))
}

/// The route label of a call sent without a named route: one shared
/// empty string, not an allocation per call.
fn no_route() -> Arc<str> {
    static NO_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    NO_ROUTE.clone()
}

fn code_label(code: Code) -> Label {
    thread_local! {
        static LABELS: Vec<Label> = (0..17)
            .filter_map(Code::from_i32)
            .map(|c| Label(Arc::from(c.name())))
            .collect();
    }
    LABELS.with(|labels| labels[usize::try_from(code.as_i32()).unwrap_or(2)].clone())
}

// === impl CallFamilies ===

impl CallFamilies {
    pub(crate) fn new() -> Self {
        let duration = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        Self {
            calls: Family::default(),
            duration,
            request_messages: Family::default(),
            response_messages: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            upstream_calls: Family::default(),
            groups: Mutex::default(),
            paths: Mutex::default(),
            other: std::sync::OnceLock::new(),
        }
    }

    /// The `upstream_calls` counters of `route` and `group`, one per gRPC
    /// code.
    /// Counts a call of `route` to `group` that ended with `code` (its
    /// `slot`): one lock and two lookups by reference, no allocation once
    /// the pair was seen.
    fn count_upstream(&self, route: &Arc<str>, group: &Arc<str>, slot: usize, code: Code) {
        let mut groups = self.groups.lock().expect("metrics lock");
        let by_group = match groups.get_mut(&**route) {
            Some(g) => g,
            None => groups.entry(route.clone()).or_default(),
        };
        let codes = match by_group.get(&**group) {
            Some(c) => c,
            None => by_group.entry(group.clone()).or_default(),
        };
        codes[slot]
            .get_or_init(|| {
                self.upstream_calls
                    .get_or_create(&UpstreamLabels {
                        route: Label(route.clone()),
                        group: Label(group.clone()),
                        grpc_code: code_label(code),
                    })
                    .clone()
            })
            .inc();
    }

    fn resolve(&self, labels: MethodLabels) -> Arc<Handles> {
        Arc::new(Handles {
            codes: Default::default(),
            duration: self.duration.get_or_create(&labels).clone(),
            request_messages: self.request_messages.get_or_create(&labels).clone(),
            response_messages: self.response_messages.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&labels).clone(),
            labels,
        })
    }

    fn handles(&self, path: &str) -> Arc<Handles> {
        let mut paths = self.paths.lock().expect("metrics lock");
        if let Some(h) = paths.get(path) {
            return h.clone();
        }
        if paths.len() >= MAX_TRACKED_PATHS {
            return self
                .other
                .get_or_init(|| {
                    self.resolve(MethodLabels {
                        service: Label(Arc::from("other")),
                        method: Label(Arc::from("other")),
                    })
                })
                .clone();
        }
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("unknown", "unknown"));
        let handles = self.resolve(MethodLabels {
            service: Label(Arc::from(service)),
            method: Label(Arc::from(method)),
        });
        paths.insert(path.into(), handles.clone());
        handles
    }
}

/// The per-call metrics middleware.
#[derive(Clone, Debug)]
pub(crate) struct CallMetrics<S> {
    inner: S,
    // Behind a pointer: a server holds one copy of its stack per
    // connection.
    shared: Arc<Recorders>,
}

/// Where [`CallMetrics`] records.
#[derive(Debug)]
struct Recorders {
    families: Arc<CallFamilies>,
    refusals: Refusals,
    /// Set when `log.access` is on.
    access: Option<AccessLog>,
}

impl<S> CallMetrics<S> {
    pub(crate) fn new(
        inner: S,
        families: Arc<CallFamilies>,
        refusals: Refusals,
        access: Option<AccessLog>,
    ) -> Self {
        Self {
            inner,
            shared: Arc::new(Recorders {
                families,
                refusals,
                access,
            }),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CallMetrics<S>
where
    S: Service<Request<MeteredRequest<ReqBody>>, Response = Response<ResBody>>,
{
    type Response = Response<MeteredResponse<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let handles = self.shared.families.handles(req.uri().path());
        let access = self.shared.access.as_ref().map(|log| {
            let header = |name| req.headers().get(name).cloned();
            Box::new(AccessCall {
                log: log.clone(),
                entry: Entry {
                    start: std::time::SystemTime::now(),
                    peer: req
                        .extensions()
                        .get::<sluice_layers::enrich::PeerAddr>()
                        .map(|p| p.0),
                    method: Arc::from(req.uri().path()),
                    authority: req.uri().authority().cloned(),
                    status: 0,
                    message: None,
                    duration: std::time::Duration::ZERO,
                    bytes_in: 0,
                    bytes_out: 0,
                    upstream: None,
                    group: None,
                    route: None,
                    request_id: header("x-request-id"),
                    traceparent: header("traceparent"),
                },
                bytes_in: Arc::default(),
            })
        });
        let bytes_in = access.as_ref().map(|a| a.bytes_in.clone());
        let req = req.map(|body| MeteredRequest {
            body,
            counter: MessageCounter::default(),
            handles: handles.clone(),
            bytes_in,
        });
        ResponseFuture {
            inner: self.inner.call(req),
            call: Some(Call {
                families: self.shared.families.clone(),
                refusals: self.shared.refusals.clone(),
                handles,
                start: Instant::now(),
                code: None,
                group: None,
                access,
                recorded: false,
            }),
        }
    }
}

pin_project! {
    /// Response future of [`CallMetrics`].
    #[derive(Debug)]
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<MeteredResponse<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take().expect("polled after completion");
        match result {
            Ok(res) => {
                // A trailers-only answer carries its status in the headers.
                if let Some(code) = status::code_of(res.headers()) {
                    call.code = Some(code);
                }
                // An answer a layer gave itself is a refusal by its cause.
                if let Some(by) = res.extensions().get::<status::Answered>() {
                    call.refusals.refused(RefusalReason::answered_by(*by));
                }
                if let Some(chosen) = res.extensions().get::<crate::balance::Chosen>() {
                    let route = chosen.route.clone().unwrap_or_else(no_route);
                    call.group = Some((route, chosen.group.clone()));
                    if let Some(access) = call.access.as_mut() {
                        access.entry.upstream = Some(chosen.endpoint.clone());
                        access.entry.group = Some(chosen.group.clone());
                        access.entry.route.clone_from(&chosen.route);
                    }
                }
                if let Some(access) = call.access.as_mut() {
                    access.entry.message = res.headers().get(status::GRPC_MESSAGE).cloned();
                }
                Poll::Ready(Ok(res.map(|body| MeteredResponse {
                    body,
                    counter: MessageCounter::default(),
                    call,
                })))
            }
            Err(e) => {
                // An error here becomes RST_STREAM: the client sees a
                // cancellation or an unavailable upstream.
                call.code = Some(Code::Cancelled);
                Poll::Ready(Err(e))
            }
        }
    }
}
