//! The ADS client: one `StreamAggregatedResources` stream per process
//! (state of the world), every subscription on it, ACK or NACK for each
//! response, reconnection with gRPC's backoff, and the view calls read
//! rebuilt after every change. While the control plane is away the last
//! good resources stay in force.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    google::rpc::Status,
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, info, warn};

mod publish;

use super::{
    bootstrap::Bootstrap,
    cache::Cache,
    resources::{self, Assignment, ClusterRes},
    view::{ClusterView, Lookup, View},
};
use crate::{
    config::{UpstreamConfig, XdsConfig},
    stats::Counters,
    telemetry::metrics::Metrics,
};

/// gRPC's reconnect backoff: 1 s, ×1.6, at most 120 s, ±20 % jitter.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MULTIPLIER: f64 = 1.6;
const BACKOFF_MAX: Duration = Duration::from_secs(120);
const BACKOFF_JITTER: f64 = 0.2;
/// How long dialling the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often timers (does-not-exist, idle authorities) are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How long endpoints that left an assignment stay open: calls that
/// picked the old view may still reach them.
const ENDPOINT_LINGER: Duration = Duration::from_secs(2);

/// What the client task and the routing side share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) view: ArcSwap<View>,
    /// Bumped at each new view; calls waiting for resources watch it.
    pub(crate) changed: tokio::sync::watch::Sender<u64>,
    pub(crate) connected: AtomicBool,
    /// The control plane answered at least once (for `/ready`).
    pub(crate) answered: AtomicBool,
    /// Listener names by authority, with when each was last used (secs
    /// since `epoch`); only in authority mode.
    pub(crate) authorities: Mutex<HashMap<String, Arc<AtomicU64>>>,
    pub(crate) epoch: Instant,
    /// Woken when an authority is added.
    pub(crate) subscribe: tokio::sync::Notify,
    pub(crate) config: XdsConfig,
    pub(crate) status: Mutex<Status_>,
    pub(crate) origin: String,
    pub(crate) server: String,
}

/// What `/config` shows of xDS.
#[derive(Debug, Default)]
pub(crate) struct Status_ {
    pub(crate) versions: [String; 4],
    pub(crate) last_nack: Option<String>,
    pub(crate) lines: Vec<String>,
}

/// Why an authority cannot be subscribed.
#[derive(Debug)]
pub(crate) struct TooMany(pub(crate) usize);

impl Shared {
    pub(crate) fn new(bootstrap: &Bootstrap, config: XdsConfig) -> Self {
        Self {
            view: ArcSwap::from_pointee(View::default()),
            changed: tokio::sync::watch::channel(0).0,
            connected: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            authorities: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            subscribe: tokio::sync::Notify::new(),
            config,
            status: Mutex::new(Status_::default()),
            origin: bootstrap.origin.clone(),
            server: bootstrap.server_uri.clone(),
        }
    }

    pub(crate) fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Whether `/ready` may say ready: the control plane answered; in
    /// authority mode, where nothing is asked before the first call, the
    /// stream to it is open.
    pub(crate) fn ready(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
            || (self.config.listener.is_none() && self.connected.load(Ordering::Relaxed))
    }

    /// Closes every cluster's connections once their calls are done (the
    /// drain).
    pub(crate) fn close(&self) {
        for c in self.view.load().clusters.values() {
            if let Lookup::Ready(c) = c {
                c.groups.close();
            }
        }
    }

    /// Subscribes to Listener `name` (an authority), or notes its use.
    pub(crate) fn want(&self, name: &str) -> Result<(), TooMany> {
        let mut all = self.authorities.lock().expect("xds authorities lock");
        if let Some(used) = all.get(name) {
            used.store(self.now_secs(), Ordering::Relaxed);
            return Ok(());
        }
        if all.len() >= self.config.max_authorities {
            return Err(TooMany(self.config.max_authorities));
        }
        all.insert(name.to_owned(), Arc::new(AtomicU64::new(self.now_secs())));
        drop(all);
        self.subscribe.notify_one();
        Ok(())
    }
}

/// A cluster's groups and what they were built from.
struct Built {
    res: Arc<ClusterRes>,
    assignment: Arc<Assignment>,
    view: Arc<ClusterView>,
}

/// The client task's state.
pub(crate) struct Client {
    shared: Arc<Shared>,
    bootstrap: Bootstrap,
    cache: Cache,
    built: HashMap<String, Built>,
    template: UpstreamConfig,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
}

impl Client {
    pub(crate) fn new(
        shared: Arc<Shared>,
        bootstrap: Bootstrap,
        template: UpstreamConfig,
        counters: Arc<Counters>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut cache = Cache::default();
        if let Some(listener) = &shared.config.listener {
            cache.roots.insert(listener.clone());
        }
        cache.resubscribe();
        Self {
            shared,
            bootstrap,
            cache,
            built: HashMap::new(),
            template,
            counters,
            metrics,
        }
    }

    /// Runs until aborted: a stream, and after it ends a backoff, again.
    pub(crate) async fn run(mut self) {
        self.publish();
        let mut backoff = BACKOFF_INITIAL;
        loop {
            let answered = match self.stream().await {
                Ok(answered) => answered,
                Err((answered, e)) => {
                    warn!(server = %self.shared.server, error = %e, "xDS stream to the control plane ended; the last good configuration stays in force");
                    answered
                }
            };
            self.shared.connected.store(false, Ordering::Relaxed);
            self.metrics.xds_connected(false);
            self.cache.disconnected();
            if answered {
                backoff = BACKOFF_INITIAL;
            }
            let jitter = 1.0 + BACKOFF_JITTER * (2.0 * random_unit() - 1.0);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = backoff.mul_f64(BACKOFF_MULTIPLIER).min(BACKOFF_MAX);
        }
    }

    /// One ADS stream, until it fails: whether a response arrived on it.
    async fn stream(&mut self) -> Result<bool, (bool, String)> {
        let scheme = if self.bootstrap.tls { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!(
            "{scheme}://{}",
            self.bootstrap.server_uri
        ))
        .map_err(|e| (false, e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
        if self.bootstrap.tls {
            endpoint = endpoint
                .tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots())
                .map_err(|e| (false, e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| (false, e.to_string()))?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
        let mut node = Some(self.bootstrap.node.clone());
        // Every subscription, on the new stream.
        let wanted = self.cache.resubscribe();
        for (i, type_url) in resources::TYPES.iter().enumerate() {
            self.send(&tx, type_url, &wanted[i], &mut node, None, true);
        }
        let mut responses = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| (false, e.to_string()))?
            .into_inner();
        self.shared.connected.store(true, Ordering::Relaxed);
        self.metrics.xds_connected(true);
        info!(server = %self.shared.server, "xDS stream to the control plane open");
        let mut answered = false;
        let mut tick = tokio::time::interval(TICK.min(self.shared.config.resource_timeout / 2));
        loop {
            tokio::select! {
                message = responses.message() => match message {
                    Ok(Some(response)) => {
                        answered = true;
                        self.on_response(&tx, response, &mut node);
                    }
                    Ok(None) => return Err((answered, "the control plane closed the stream".to_owned())),
                    Err(status) => return Err((answered, status.to_string())),
                },
                () = self.shared.subscribe.notified() => self.on_change(&tx, &mut node),
                _ = tick.tick() => {
                    let expired = self.cache.expire(Instant::now(), self.shared.config.resource_timeout);
                    let idle = self.sweep_idle();
                    if expired || idle {
                        self.on_change(&tx, &mut node);
                    }
                }
            }
        }
    }

    /// Sends the request for `type_url` if its names changed (or `force`).
    fn send(
        &mut self,
        tx: &mpsc::Sender<DiscoveryRequest>,
        type_url: &str,
        names: &BTreeSet<String>,
        node: &mut Option<envoy_types::pb::envoy::config::core::v3::Node>,
        error: Option<Status>,
        force: bool,
    ) {
        let state = self.cache.state(type_url);
        if !force && error.is_none() && state.sent == *names {
            return;
        }
        if names.is_empty() && state.sent.is_empty() && error.is_none() {
            return;
        }
        let request = DiscoveryRequest {
            version_info: state.version.clone(),
            node: node.take(),
            resource_names: names.iter().cloned().collect(),
            type_url: type_url.to_owned(),
            response_nonce: state.nonce.clone(),
            error_detail: error,
            ..DiscoveryRequest::default()
        };
        // The queue holds a few requests; a control plane that reads none
        // of them ends the stream (the send fails, the stream is retried).
        if tx.try_send(request).is_err() {
            debug!("xDS request queue full; the stream will be restarted");
            return;
        }
        self.cache.state_mut(type_url).sent = names.clone();
        self.cache.requested(type_url, Instant::now());
    }

    fn on_response(
        &mut self,
        tx: &mpsc::Sender<DiscoveryRequest>,
        response: DiscoveryResponse,
        node: &mut Option<envoy_types::pb::envoy::config::core::v3::Node>,
    ) {
        let type_url = response.type_url.clone();
        if !resources::TYPES.contains(&type_url.as_str()) {
            debug!(%type_url, "ignoring a response of a type sluice did not ask for");
            return;
        }
        let decoded = response
            .resources
            .iter()
            .map(|any| resources::decode(&type_url, any, &self.bootstrap))
            .collect();
        let applied = self.cache.apply(&type_url, decoded);
        let short = resources::short(&type_url);
        self.cache
            .state_mut(&type_url)
            .nonce
            .clone_from(&response.nonce);
        let error = if applied.errors.is_empty() {
            self.cache
                .state_mut(&type_url)
                .version
                .clone_from(&response.version_info);
            self.metrics.xds_update(short, &response.version_info);
            info!(r#type = short, version = %response.version_info, changed = ?applied.changed, "xDS update applied");
            None
        } else {
            let message = applied.errors.join("; ");
            self.metrics.xds_nack(short);
            warn!(r#type = short, version = %response.version_info, error = %message, "xDS resources refused (NACK); their last good versions stay");
            self.shared
                .status
                .lock()
                .expect("xds status lock")
                .last_nack = Some(format!(
                "{short} version {}: {message}",
                response.version_info
            ));
            Some(Status {
                code: 3, // INVALID_ARGUMENT
                message,
                details: Vec::new(),
            })
        };
        self.shared.answered.store(true, Ordering::Relaxed);
        // Calls see the new resources before the control plane sees the
        // ACK: whoever waits for the ACK knows the change is in force.
        let wanted = self.cache.resubscribe();
        self.publish();
        let i = resources::TYPES
            .iter()
            .position(|t| *t == type_url)
            .unwrap_or(0);
        self.send(tx, &type_url, &wanted[i], node, error, true);
        for (j, t) in resources::TYPES.iter().enumerate() {
            if j != i {
                self.send(tx, t, &wanted[j], node, None, false);
            }
        }
    }

    /// Roots changed (an authority arrived, or timers fired).
    fn on_change(
        &mut self,
        tx: &mpsc::Sender<DiscoveryRequest>,
        node: &mut Option<envoy_types::pb::envoy::config::core::v3::Node>,
    ) {
        if self.shared.config.listener.is_none() {
            let names: Vec<String> = self
                .shared
                .authorities
                .lock()
                .expect("xds authorities lock")
                .keys()
                .cloned()
                .collect();
            self.cache.roots = names.into_iter().collect();
        }
        let wanted = self.cache.resubscribe();
        for (i, t) in resources::TYPES.iter().enumerate() {
            self.send(tx, t, &wanted[i], node, None, false);
        }
        self.publish();
    }

    /// Drops authorities unused for `idle_unsubscribe`; says whether any.
    fn sweep_idle(&self) -> bool {
        if self.shared.config.listener.is_some() {
            return false;
        }
        let now = self.shared.now_secs();
        let idle = self.shared.config.idle_unsubscribe.as_secs();
        let mut all = self
            .shared
            .authorities
            .lock()
            .expect("xds authorities lock");
        let before = all.len();
        all.retain(|_, used| now.saturating_sub(used.load(Ordering::Relaxed)) < idle);
        before != all.len()
    }
}

/// A number in [0, 1), good enough for jitter.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(std::time::SystemTime::now()) % 1_000_000) as f64 / 1_000_000.0
}
