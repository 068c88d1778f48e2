//! One endpoint of a group: its connection pool, its latency estimate,
//! its health, and the names strategies find it by.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::{EndpointConfig, HostPort, UpstreamConfig},
    stats::Counters,
    tls::{TlsError, client::ClientTls},
    upstream::{Connector, Pool},
};

/// Latency assumed for an endpoint with no observation yet: 30 ms,
/// linkerd's default RTT.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade: 10 s, linkerd's decay.
const DECAY: Duration = Duration::from_secs(10);
/// How long a tunnel's connection may idle before the pool lets it go: a
/// year. The agent dialled it; closing it idle would only make the agent
/// dial again.
const TUNNEL_IDLE: Duration = Duration::from_secs(365 * 24 * 3600);

/// One endpoint: its pool, its latency estimate, and what strategies match
/// it by.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// The address it was configured or resolved as.
    pub(super) address: HostPort,
    pool: Pool,
    rtt: Mutex<PeakEwma>,
    /// The last health check's verdict (true without health checking).
    pub(super) healthy: AtomicBool,
    /// Lowercased names `dest-host` matches: the host, the name it was
    /// resolved from, and the configured ids.
    pub(super) ids: Box<[String]>,
    /// The first id the config gave it, as written.
    configured_id: Option<String>,
    /// Its address as text (`host:port`), which a fan-out may name it by
    /// (an agent: its id); what calls record as the endpoint they reached.
    label: Arc<str>,
    pub(super) default_route: bool,
    /// The config entry it was made from (none for an agent): a reload
    /// keeps the endpoint, connections and all, only for the same entry.
    pub(super) source: Option<EndpointConfig>,
    /// Its share in a weighted group (an xDS cluster's); 1 elsewhere.
    pub(super) weight: u32,
    /// What outlier detection counts of its calls, and whether it is
    /// ejected.
    pub(super) outlier: super::outlier::Record,
}

#[derive(Debug)]
struct PeakEwma {
    nanos: f64,
    at: Instant,
}

/// What every endpoint of a group is dialled with.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) upstream: UpstreamConfig,
    pub(super) tls: Option<Arc<ClientTls>>,
}

impl Settings {
    /// `upstream`, with TLS material read for `key` (the config key) if
    /// it asks for TLS.
    pub(super) fn new(key: &str, upstream: UpstreamConfig) -> Result<Self, TlsError> {
        let tls = match &upstream.tls {
            Some(t) => Some(Arc::new(ClientTls::new(format!("{key}.tls"), t)?)),
            None => None,
        };
        Ok(Self { upstream, tls })
    }
}

/// What the hub knows of an agent that dialled in.
#[derive(Debug)]
pub(crate) struct AgentEndpoint<'a> {
    /// Its id.
    pub(crate) id: &'a str,
    /// Every name `dest-host` finds it by (its id first).
    pub(crate) ids: Vec<String>,
    pub(crate) default_route: bool,
    /// Where its tunnel comes from.
    pub(crate) peer: SocketAddr,
}

// === impl Endpoint ===

impl Endpoint {
    /// The endpoint for `e`, at `resolved` when a name was resolved.
    pub(super) fn configured(
        settings: &Settings,
        counters: &Arc<Counters>,
        e: &EndpointConfig,
        resolved: Option<SocketAddr>,
    ) -> Self {
        let address = match resolved {
            Some(addr) => HostPort::from(addr),
            None => e.address().clone(),
        };
        let mut upstream = settings.upstream.clone();
        upstream.address = address.clone();
        let connector = settings
            .tls
            .as_ref()
            .map_or_else(Connector::default, |tls| {
                Connector::tls(tls.clone(), e.address().host())
            });
        let mut ids = vec![e.address().host().to_ascii_lowercase()];
        if resolved.is_some() {
            ids.push(address.host().to_ascii_lowercase());
        }
        let mut default_route = false;
        let mut configured_id = None;
        if let EndpointConfig::Detailed {
            ids: more,
            default_route: dr,
            ..
        } = e
        {
            ids.extend(more.iter().map(|i| i.to_ascii_lowercase()));
            configured_id = more.first().cloned();
            default_route = *dr;
        }
        let label = Arc::from(address.to_string());
        let mut endpoint = Self::new(
            address,
            Pool::new(upstream, connector, counters.clone()),
            ids,
            configured_id,
            label,
            default_route,
        );
        endpoint.source = Some(e.clone());
        endpoint
    }

    /// An endpoint for an agent's tunnel `stream`, not yet in any group
    /// ([`Group::insert`](super::Group::insert) adds it once its connection
    /// works).
    pub(crate) fn agent(
        agent: &AgentEndpoint<'_>,
        stream: crate::proto::transport::Stream,
        upstream: &UpstreamConfig,
        counters: &Arc<Counters>,
    ) -> Arc<Self> {
        let mut upstream = upstream.clone();
        upstream.address = HostPort::from(agent.peer);
        upstream.max_connections = 1;
        upstream.idle_timeout = TUNNEL_IDLE;
        // Pinged idle or not (see Pool): a silent agent is gone within
        // interval + timeout.
        upstream.keepalive_interval = crate::config::DEFAULT_KEEPALIVE_INTERVAL;
        upstream.tls = None;
        Arc::new(Self::new(
            upstream.address.clone(),
            Pool::new(upstream, Connector::tunnel(stream), counters.clone()),
            agent.ids.iter().map(|i| i.to_ascii_lowercase()).collect(),
            Some(agent.id.to_owned()),
            Arc::from(agent.id),
            agent.default_route,
        ))
    }

    fn new(
        address: HostPort,
        pool: Pool,
        ids: Vec<String>,
        configured_id: Option<String>,
        label: Arc<str>,
        default_route: bool,
    ) -> Self {
        Self {
            address,
            pool,
            rtt: Mutex::new(PeakEwma {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
            }),
            healthy: AtomicBool::new(true),
            ids: ids.into_boxed_slice(),
            configured_id,
            label,
            default_route,
            source: None,
            weight: 1,
            outlier: super::outlier::Record::default(),
        }
    }

    /// The address it was configured or resolved as.
    pub(crate) fn address(&self) -> &HostPort {
        &self.address
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What calls record as the endpoint they reached: its address, or an
    /// agent's id.
    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Whether it answers to `id`: its label, or one of its ids
    /// (case-insensitive).
    pub(super) fn is(&self, id: &str) -> bool {
        &*self.label == id || self.ids.iter().any(|i| i.eq_ignore_ascii_case(id))
    }

    /// What a fan-out calls it: its first configured id, else its address.
    pub(super) fn name(&self) -> String {
        self.configured_id
            .clone()
            .unwrap_or_else(|| self.label.to_string())
    }

    /// Whether the endpoint should be avoided: its last dial failed, or it
    /// failed its last health check.
    pub(crate) fn unusable(&self) -> bool {
        self.pool.is_failing() || !self.healthy.load(Ordering::Relaxed)
    }

    /// Records how long the upstream took to answer (response headers).
    pub(crate) fn observe(&self, rtt: Duration) {
        let sample = rtt.as_nanos() as f64;
        let now = Instant::now();
        let mut ewma = self.rtt.lock().expect("rtt lock");
        if sample > ewma.nanos {
            // Peak: a slow answer counts at once.
            ewma.nanos = sample;
        } else {
            let elapsed = now.saturating_duration_since(ewma.at).as_secs_f64();
            let keep = (-elapsed / DECAY.as_secs_f64()).exp();
            ewma.nanos = ewma.nanos * keep + sample * (1.0 - keep);
        }
        ewma.at = now;
    }

    /// What P2C compares: latency × (calls in flight + 1).
    pub(super) fn cost(&self) -> f64 {
        let rtt = self.rtt.lock().expect("rtt lock").nanos;
        rtt * (self.pool.in_flight() as f64 + 1.0)
    }
}
