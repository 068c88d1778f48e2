//! Config → the tower stack each call runs through, outermost first.

use std::sync::Arc;

use sluice_layers::{
    deadline::{Deadline, DeadlineLayer},
    direct::{Direct, DirectLayer},
    drain::{Drain, DrainLayer, Watch},
    enrich::{Enrich, EnrichLayer},
    fanout::{Fanout, FanoutLayer, Malformed},
    peek::{Peek, PeekLayer},
};
use tower::{ServiceBuilder, util::Either};

use tower_http::{
    classify::{GrpcErrorsAsFailures, SharedClassifier},
    request_id::{MakeRequestId, RequestId, SetRequestId, SetRequestIdLayer},
    trace::Trace,
};

use crate::{
    balance::{Balance, Groups},
    config::{Config, DEFAULT_GROUP, FailWhen, MalformedConfig},
    forward::Forward,
    rescue::Rescue,
    route::RouteTable,
    stats::Counters,
    telemetry::{
        access::AccessLog,
        calls::CallMetrics,
        metrics::{Metrics, RefusalReason},
        trace,
    },
    via::Via,
    xds::XdsRoute,
};

/// The proxy's own texts and names: the layers' defaults name no product;
/// sluice's say where the answer came from.
const DRAINING_MESSAGE: &str = "sluice is draining: retry on another instance";
const EXPIRED_MESSAGE: &str = "sluice is shutting down: drain deadline reached";
const DEADLINE_MESSAGE: &str = "deadline exceeded (grpc-timeout) at sluice";
const FANOUT_STATUS_TRAILER: &str = "sluice-fanout-status";

/// `x-request-id` for calls without one, when `[enrich] request_id`.
type Ids<S> = Either<SetRequestId<S, MakeId>, S>;

/// The stack between the server and the upstream.
pub(crate) type Stack = Trace<
    CallMetrics<
        Rescue<
            Drain<
                Enrich<
                    Ids<
                        Peek<Direct<XdsRoute<Via<Fanout<Deadline<Balance<Forward>>>>>, RouteTable>>,
                    >,
                >,
            >,
        >,
    >,
    SharedClassifier<GrpcErrorsAsFailures>,
    trace::MakeSpan,
    (),
    (),
    (),
    trace::OnEos,
    trace::OnFailure,
>;

/// What every stack of one sluice shares, whatever config it was built
/// from: a config reload builds a new stack over the same parts.
#[derive(Clone, Debug)]
pub(crate) struct Parts {
    pub(crate) groups: Arc<Groups>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) drain: Watch,
    pub(crate) metrics: Arc<Metrics>,
    /// The process's access-log writer, started the first time a config
    /// turns `log.access` on.
    pub(crate) access: Arc<std::sync::OnceLock<AccessLog>>,
    /// The xDS client's state, when xDS is on.
    pub(crate) xds: Option<Arc<crate::xds::Shared>>,
}

/// The stack for `config` over `parts`.
pub(crate) fn build(config: &Config, parts: &Parts) -> Stack {
    let Parts {
        groups,
        counters,
        drain,
        metrics,
        access,
        xds,
    } = parts.clone();
    let members: crate::route::Members = {
        let groups = groups.clone();
        Arc::new(move |name: &str| {
            groups
                .group(name)
                .map(|g| g.endpoint_names())
                .unwrap_or_default()
        })
    };
    let routes = match &xds {
        // The calls no file route takes are xDS's.
        Some(_) => RouteTable::leaving(
            config,
            members,
            sluice_layers::direct::Route::to(crate::xds::XDS_TARGET),
        ),
        None => RouteTable::with_members(config, members),
    };
    // One writer thread for the process's access log, when it is on.
    let access = config.log.access.then(|| {
        access
            .get_or_init(|| AccessLog::start(config.log.format, metrics.access_log_dropped.clone()))
            .clone()
    });
    let peek_max_bytes = config.routing.peek_max_bytes.0 as usize;
    let limits = crate::forward::Limits {
        per_call: config.retry.buffer_per_call.0 as usize,
        total: config.retry.buffer_total.0 as usize,
        budget: counters.retry_buffer.clone(),
    };
    ServiceBuilder::new()
        // A DEBUG span per call: method, upstream, grpc-status, duration.
        .layer(trace::layer())
        // Count every call (refusals included) by service, method and
        // status, with latency, messages and bytes each way.
        .layer_fn(|inner| {
            CallMetrics::new(
                inner,
                metrics.calls.clone(),
                metrics.refusals.clone(),
                access.clone(),
            )
        })
        // The one place errors become gRPC statuses (or, for an upstream
        // reset, stay errors that the server turns into RST_STREAM). What
        // must not be forwarded at all (non-gRPC HTTP/2, calls past
        // server.max_in_flight) the server refuses before the stack.
        .layer_fn(|inner| Rescue::new(inner, metrics.clone()))
        // Hold the drain open until each call's body ends; at the drain
        // deadline, end open calls with UNAVAILABLE. Calls that arrive
        // while draining are admitted: they were opened before the client
        // saw the final GOAWAY, which promised to process them; later ones
        // h2 refuses itself (REFUSED_STREAM, retried by clients).
        .layer(
            DrainLayer::new(drain)
                .admit_while_draining(true)
                .message(DRAINING_MESSAGE)
                .expiry_message(EXPIRED_MESSAGE),
        )
        // Strip the keys a client must not set, then add this hop's
        // (static values, forwarded, x-forwarded-for): before routing, so
        // no route matches a spoofed key.
        .layer(enrich_layer(config))
        // A generated x-request-id for a call that has none (tower-http).
        .option_layer(
            config
                .enrich
                .request_id
                .then(|| SetRequestIdLayer::x_request_id(MakeId::new())),
        )
        // Read the first request message of a call that a route on message
        // contents could still match (and nothing of any other call); it
        // is replayed to the upstream untouched.
        .layer({
            let which = routes.clone();
            PeekLayer::new()
                .max_messages(usize::from(routes.needs_peek()))
                .max_bytes(peek_max_bytes)
                .max_bytes_per_connection(config.routing.peek_max_bytes_per_connection.0 as usize)
                .max_wait(config.routing.peek_timeout)
                .when(move |parts| which.wants_peek(parts))
        })
        // Pick each call's upstream group from the config's routes, or
        // refuse it with the status the route names.
        .layer(DirectLayer::new(routes))
        // The calls the file's routes leave to xDS: their Listener, route
        // and cluster; a call whose resources have not arrived waits.
        .layer_fn(|inner| XdsRoute::new(inner, xds.clone()))
        // Append this instance to sluice-via; a call that already carries
        // it (a routing loop) gets ABORTED.
        .layer_fn(|inner| Via::new(inner, metrics.clone()))
        // Carry out fan-out and mirror routes: the layers below run once
        // per destination, each with its own deadline cap.
        .layer(fanout_layer(config, metrics.clone()))
        // Enforce grpc-timeout over the whole call, body included: at the
        // deadline the client gets DEADLINE_EXCEEDED and dropping the
        // forwarder's future or body cancels the upstream stream.
        .layer({
            let metrics = metrics.clone();
            DeadlineLayer::new()
                .message(DEADLINE_MESSAGE)
                .offset(config.routing.deadline_offset)
                .on_expire(move || metrics.refused(RefusalReason::deadline))
        })
        // Pick each call's endpoint in the group its route names (the
        // default group without one) and check out a stream slot on one of
        // its connections; one other endpoint when that dial fails.
        .layer_fn(|inner| Balance::new(inner, &groups, DEFAULT_GROUP, limits.clone()))
        // One upstream h2 stream per call on that slot, frames both ways.
        .service(Forward::new(counters.pumps.clone()))
}

/// The fan-out layer from `[fanout]`: its outcomes become metrics and a
/// log line per mirrored call (the mirror's finalizer).
fn fanout_layer(config: &Config, metrics: Arc<Metrics>) -> FanoutLayer {
    let f = &config.fanout;
    FanoutLayer::new()
        .status_trailer(http::HeaderName::from_static(FANOUT_STATUS_TRAILER))
        .queue(f.queue)
        .max_reply_bytes(f.max_reply_bytes.0 as usize)
        .max_message_bytes(f.max_message_bytes.0 as usize)
        .metadata_field(f.metadata_field)
        .malformed(match f.malformed {
            MalformedConfig::Fail => Malformed::Fail,
            MalformedConfig::Pass => Malformed::PassThrough,
        })
        .fail_when_any(f.fail_when == FailWhen::Any)
        .secondary_grace(f.secondary_grace)
        .classify(|e| match crate::rescue::status_of(e) {
            Some((code, _)) => (code, e.to_string()),
            // An upstream reset.
            None => (
                sluice_layers::grpc::status::Code::Unavailable,
                e.to_string(),
            ),
        })
        .on_report(move |report| metrics.fanout_report(report))
}

/// `[enrich]` as a layer (an empty one passes calls untouched).
fn enrich_layer(config: &Config) -> EnrichLayer {
    let e = &config.enrich;
    // validate() checked every key and value.
    let name = |k: &str| http::HeaderName::try_from(k.to_ascii_lowercase()).ok();
    let mut layer = EnrichLayer::new();
    for k in e.strip.iter().filter_map(|k| name(k)) {
        layer = layer.strip(k);
    }
    for p in &e.strip_prefixes {
        layer = layer.strip_prefix(p.as_str());
    }
    for k in e.remove.iter().filter_map(|k| name(k)) {
        layer = layer.remove(k);
    }
    for (k, v) in &e.set {
        if let (Some(k), Ok(v)) = (name(k), http::HeaderValue::try_from(v.as_str())) {
            layer = layer.set(k, v);
        }
    }
    for (k, v) in &e.append {
        if let (Some(k), Ok(v)) = (name(k), http::HeaderValue::try_from(v.as_str())) {
            layer = layer.append(k, v);
        }
    }
    if e.forwarded {
        layer = layer.forwarded();
    }
    if e.x_forwarded_for {
        layer = layer.x_forwarded_for();
    }
    if let Some(key) = config.client_id_key().and_then(name) {
        layer = layer.client_id(key);
    }
    layer
}

/// Request ids: this process's random prefix and a counter, unique
/// without a lock or a random number per call. One pointer, as every
/// connection's stack holds a copy.
#[derive(Clone, Debug)]
pub(crate) struct MakeId(Arc<(u64, std::sync::atomic::AtomicU64)>);

impl MakeId {
    fn new() -> Self {
        let prefix = std::hash::BuildHasher::hash_one(
            &std::hash::RandomState::new(),
            (std::process::id(), std::time::SystemTime::now()),
        );
        Self(Arc::new((prefix, std::sync::atomic::AtomicU64::new(0))))
    }
}

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let (prefix, next) = &*self.0;
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        http::HeaderValue::try_from(format!("{prefix:016x}-{n:x}"))
            .ok()
            .map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds a copy of the stack (in its task, next to
    /// its h2 state), so each byte here is a byte per idle connection.
    /// 232 was its size before the balancer, live config and xDS layers
    /// came; layers keep their settings behind a pointer to stay within it.
    #[test]
    fn a_connection_s_copy_of_the_stack_stays_small() {
        let size = std::mem::size_of::<crate::live::Live<Stack>>();
        assert!(size <= 232, "a connection's stack is {size} bytes");
    }
}
