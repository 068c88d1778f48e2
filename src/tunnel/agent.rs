//! The agent: keeps tunnels to the hubs its [`Tracker`] wants, and serves
//! each one as a downstream HTTP/2 connection through the normal stack,
//! forwarding to the local upstream.
//!
//! Every dial holds a lease, released on every path when its task ends
//! (a failed connect or handshake, a duplicate claim, a tunnel that
//! closed), after a backoff with jitter when the dial failed. When the
//! drain begins no more dials are made, and each tunnel's connection gets
//! GOAWAY like any downstream connection: the hub prefers other agents
//! for new calls and the calls in flight finish.

use std::{
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sluice_layers::drain::Watch;
use tokio::{task::JoinSet, time::Instant};
use tower::Service;
use tracing::{debug, info, warn};

use super::{
    handshake::{self, AgentHello, Identifiers},
    tracker::{Instance, Lease, Tracker},
};
use crate::{
    config::{AgentConfig, HostPort},
    proto::flow::RecvBody,
    proto::transport::Stream,
    server::{self, CallService, ListenerSettings},
    tls::client::ClientTls,
};

/// How long a tunnel to an older hub generation keeps taking calls once
/// the new tunnels are claimed: the new hubs add the agent to their group
/// only after a round trip on the new tunnel.
const SURPLUS_GRACE: Duration = Duration::from_secs(1);

/// How long the answer to a hub's re-home request waits for the agent to
/// hold every tunnel it wants elsewhere (the hub gives its clients GOAWAY
/// only after the answer); below the hub's own bound,
/// [`REHOME_GRACE`](super::hub::REHOME_GRACE).
const REHOME_ANSWER_WAIT: Duration = Duration::from_secs(4);

/// What every tunnel task of the agent shares.
#[derive(Debug)]
struct Dialer {
    hello: AgentHello,
    config: AgentConfig,
    /// Consecutive failed dials, for the backoff.
    failures: AtomicU32,
    /// TLS to the hubs, when `tunnel.agent.tls` is set.
    tls: Option<Arc<ClientTls>>,
}

impl Dialer {
    /// Connects to `hub`, with TLS when configured, by `deadline`.
    async fn dial(&self, hub: &HostPort, deadline: Instant) -> Result<Stream, String> {
        let plain = tokio::time::timeout_at(
            deadline,
            Stream::connect(crate::upstream::transport_target(hub)),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let Some(tls) = &self.tls else {
            return Ok(plain);
        };
        match tokio::time::timeout_at(deadline, tls.connect(plain, hub.host())).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err("TLS handshake timed out".to_owned()),
        }
    }
}

/// Keeps the agent's tunnels until the drain begins; then waits for them
/// to close.
pub(crate) async fn run<S>(
    config: AgentConfig,
    tls: Option<Arc<ClientTls>>,
    tracker: Arc<Tracker>,
    shared: Arc<ListenerSettings>,
    svc: S,
    watch: Watch,
) where
    S: CallService + Send + Sync + 'static,
    S::Err: Send,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Error: Send,
{
    let i = &config.identifiers;
    let dialer = Arc::new(Dialer {
        hello: AgentHello {
            id: config.id.clone(),
            identifiers: Identifiers {
                host: i.host.clone(),
                ipv4: i.ipv4.clone(),
                ipv6: i.ipv6.clone(),
                default_route: i.default_route,
            },
            versions: handshake::VERSIONS.to_vec(),
            token: config.token.clone(),
            discover: false,
        },
        failures: AtomicU32::new(0),
        tls,
        config,
    });
    let draining = watch.clone().signaled();
    tokio::pin!(draining);
    let mut tunnels = JoinSet::new();
    let mut next = 0usize;
    // Asks a hub (the next address) which hubs exist, now and then: how an
    // agent holding every tunnel it wants hears of a new generation, and
    // how known hubs stay known past the expiry.
    let mut discover = tokio::time::interval(dialer.config.discovery_interval);
    discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    discover.tick().await;
    loop {
        let changed = tracker.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        while let Some(lease) = tracker.try_acquire() {
            let hubs = &dialer.config.hubs;
            let hub = hubs[next % hubs.len()].clone();
            next = next.wrapping_add(1);
            let task = tunnels.spawn(tunnel(
                lease,
                hub,
                dialer.clone(),
                tracker.clone(),
                shared.clone(),
                svc.clone(),
                watch.clone(),
            ));
            if task.is_finished() {
                // A runtime shutting down drops what is spawned at once,
                // and the lease with it, which would grant the next lease
                // at once: this loop would spin (and allocate) forever,
                // and the runtime's shutdown would never end.
                return;
            }
        }
        tokio::select! {
            _ = &mut draining => break,
            () = &mut changed => {}
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
            _ = discover.tick() => {
                let hubs = &dialer.config.hubs;
                let hub = hubs[next % hubs.len()].clone();
                next = next.wrapping_add(1);
                tunnels.spawn(discovery(hub, dialer.clone(), tracker.clone()));
            }
        }
    }
    info!("draining: no more tunnel dials");
    while tunnels.join_next().await.is_some() {}
}

/// One dial: connect, handshake, claim, then serve the tunnel until it
/// closes. The lease goes with the task.
async fn tunnel<S>(
    mut lease: Lease,
    hub: HostPort,
    dialer: Arc<Dialer>,
    tracker: Arc<Tracker>,
    shared: Arc<ListenerSettings>,
    svc: S,
    watch: Watch,
) where
    S: CallService,
    S::Err: Send + 'static,
    S::ResBody: Send + 'static,
{
    let deadline = Instant::now() + dialer.config.handshake_timeout;
    let dialled = async {
        let mut io = dialer.dial(&hub, deadline).await?;
        let answer = handshake::agent(&mut io, &dialer.hello, &hub.to_string(), deadline)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((io, answer))
    };
    let (io, answer) = match dialled.await {
        Ok(ok) => ok,
        Err(reason) => {
            warn!(%hub, %reason, "tunnel dial failed");
            tracker.dial_failed();
            // The lease is held through the backoff: it is what paces
            // the dials.
            if !watch.is_draining() {
                backoff(&dialer).await;
            }
            return;
        }
    };
    let instance = Instance {
        name: answer.hub.name.clone(),
        id: answer.instance.clone(),
    };
    let name = instance.name.clone();
    tracker.track(std::iter::once(answer.hub.clone()).chain(answer.hubs.iter().cloned()));
    tracker.heard(&instance);
    if !lease.claim(&instance) {
        debug!(%hub, hub_name = %name, instance = %instance.id, "already holding a tunnel to this hub process; closing and dialling again");
        // The same address may lead there again: backed off like a
        // failure (the lease paces the dials), with the duplicate closed
        // first.
        drop(io);
        if !watch.is_draining() {
            backoff(&dialer).await;
        }
        return;
    }
    let opened = Instant::now();
    info!(%hub, hub_name = %name, instance = %instance.id, version = answer.version, "tunnel open");
    // The tunnel has a drain of its own, begun by the process's drain or
    // once the tunnels wanted are held elsewhere (a newer hub generation,
    // or another process of a hub that drains: make-before-break):
    // GOAWAY, then the calls on it finish. The process's drain waits for
    // it through `held`.
    let held = watch.guard();
    let (signal, own) = sluice_layers::drain::channel();
    let mut signal = Some(signal);
    let control = Control {
        inner: svc,
        tracker: tracker.clone(),
        instance: Arc::new(instance.clone()),
        key: Arc::from(answer.control_key.as_str()),
    };
    {
        // Scoped: the connection and the drain watch (which holds a
        // guard of the process's drain) end here, before any backoff.
        let serve = server::serve_tunnel(io, shared, control, own);
        tokio::pin!(serve);
        let draining = watch.clone().signaled();
        tokio::pin!(draining);
        // When the tunnel was found surplus: it drains SURPLUS_GRACE later
        // if it still is then (the new tunnel may have died meanwhile).
        // The grace lets the new hub take the new tunnel in (its first
        // PING) before this one stops taking calls.
        let mut surplus_since: Option<Instant> = None;
        loop {
            let changed = tracker.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if signal.is_some() && surplus_since.is_none() && tracker.is_surplus(&instance) {
                surplus_since = Some(Instant::now());
            }
            let grace_over = async {
                match surplus_since {
                    Some(since) => tokio::time::sleep_until(since + SURPLUS_GRACE).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut serve => break,
                _ = &mut draining, if signal.is_some() => {
                    if let Some(signal) = signal.take() {
                        tokio::spawn(signal.drain());
                    }
                }
                () = grace_over => {
                    surplus_since = None;
                    if tracker.is_surplus(&instance)
                        && let Some(signal) = signal.take()
                    {
                        info!(%hub, hub_name = %name, instance = %instance.id, "this hub is no longer wanted (an older generation, or draining) and the tunnels wanted are open; closing this one");
                        tokio::spawn(signal.drain());
                    }
                }
                () = &mut changed => {}
            }
        }
    }
    // The claim goes with the tunnel, at once: the next dial may reach
    // the same hub again (restarted, or back from a drain), and must not
    // be refused as a duplicate of a tunnel that is gone. The lease
    // itself paces the redial through the backoff, if there is one.
    drop(held);
    lease.unclaim();
    // A tunnel closed on purpose (this agent drained it, or the hub asked
    // it to re-home) or one that lasted is no failure; only one the hub
    // or the network cut short is backed off, so a hub that closes at
    // once is not dialled again at once, forever.
    let on_purpose = signal.is_none() || tracker.is_draining(&instance);
    if on_purpose || opened.elapsed() >= dialer.config.backoff_max {
        dialer.failures.store(0, Ordering::Relaxed);
    } else if !watch.is_draining() {
        backoff(&dialer).await;
    }
    info!(%hub, hub_name = %name, instance = %instance.id, "tunnel closed");
}

/// The agent's end of a tunnel's control requests: the hub's re-home
/// request, carrying the key the hub gave this tunnel (which no client of
/// the hub knows), is answered here once the agent holds the tunnels it
/// wants elsewhere (at most [`REHOME_ANSWER_WAIT`]); every other call goes
/// to the stack.
#[derive(Clone, Debug)]
struct Control<S> {
    inner: S,
    tracker: Arc<Tracker>,
    instance: Arc<Instance>,
    key: Arc<str>,
}

type ControlBody<B> = http_body_util::Either<B, http_body_util::Empty<Bytes>>;

fn passed<B>(res: Response<B>) -> Response<ControlBody<B>> {
    res.map(http_body_util::Either::Left)
}

impl<S, B> Service<Request<RecvBody>> for Control<S>
where
    S: Service<Request<RecvBody>, Response = Response<B>>,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ControlBody<B>>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        futures_util::future::MapOk<S::Future, fn(Response<B>) -> Response<ControlBody<B>>>,
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RecvBody>) -> Self::Future {
        use futures_util::TryFutureExt;
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let is_control = req.uri().path() == handshake::REHOME_PATH
            && !self.key.is_empty()
            && header(handshake::CONTROL_KEY).is_some_and(|k| handshake::key_matches(&self.key, k));
        if !is_control {
            let passed: fn(Response<B>) -> Response<ControlBody<B>> = passed::<B>;
            return futures_util::future::Either::Left(self.inner.call(req).map_ok(passed));
        }
        // A hub speaks only for itself: its name, and its process when it
        // says which.
        let me = &self.instance;
        let this_process = header(handshake::INSTANCE).is_none_or(|i| i == me.id);
        let rehome = header("sluice-hub-draining") == Some(me.name.as_str()) && this_process;
        let tracker = self.tracker.clone();
        if rehome {
            info!(hub_name = %me.name, instance = %me.id, "the hub drains: re-homing");
            tracker.forget(me);
        }
        // Control requests are rare: boxed.
        futures_util::future::Either::Right(Box::pin(async move {
            if rehome {
                rehomed(&tracker, REHOME_ANSWER_WAIT).await;
            }
            let mut res =
                Response::new(http_body_util::Either::Right(http_body_util::Empty::new()));
            let headers = res.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", http::HeaderValue::from_static("0"));
            Ok(res)
        }))
    }
}

/// How long after a new tunnel is claimed its hub is taken to list the
/// agent: the hub adds it after one HTTP/2 round trip on the tunnel.
const TAKEN_IN: Duration = Duration::from_millis(250);

/// Waits until the agent holds every tunnel it wants (and the hubs had
/// time to take them in), at most `limit`.
async fn rehomed(tracker: &Tracker, limit: Duration) {
    let wait = async {
        loop {
            let changed = tracker.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if tracker.is_complete() {
                tokio::time::sleep(TAKEN_IN).await;
                return;
            }
            changed.await;
        }
    };
    if tokio::time::timeout(limit, wait).await.is_err() {
        debug!("answering the re-home request before every tunnel wanted is open");
    }
}

/// One discovery: the handshake with `sluice-discover`, whose 204 answer
/// lists the hubs that exist; no tunnel.
async fn discovery(hub: HostPort, dialer: Arc<Dialer>, tracker: Arc<Tracker>) {
    let deadline = Instant::now() + dialer.config.handshake_timeout;
    let hello = AgentHello {
        discover: true,
        ..dialer.hello.clone()
    };
    let asked = async {
        let mut io = dialer.dial(&hub, deadline).await?;
        handshake::agent(&mut io, &hello, &hub.to_string(), deadline)
            .await
            .map_err(|e| e.to_string())
    };
    match asked.await {
        Ok(answer) => {
            let instance = Instance {
                name: answer.hub.name.clone(),
                id: answer.instance,
            };
            tracker.track(std::iter::once(answer.hub).chain(answer.hubs));
            tracker.heard(&instance);
        }
        Err(reason) => debug!(%hub, %reason, "hub discovery failed"),
    }
}

/// Waits `backoff_min × 2^failures` (at most `backoff_max`), with full
/// jitter between half and all of it, and counts the failure.
async fn backoff(dialer: &Dialer) {
    let failures = dialer.failures.fetch_add(1, Ordering::Relaxed);
    let c = &dialer.config;
    let full = c
        .backoff_min
        .saturating_mul(1 << failures.min(20))
        .min(c.backoff_max);
    let random = std::hash::RandomState::new().hash_one(failures);
    let jitter = 0.5 + (random % 1000) as f64 / 2000.0;
    tokio::time::sleep(Duration::from_secs_f64(full.as_secs_f64() * jitter)).await;
}
