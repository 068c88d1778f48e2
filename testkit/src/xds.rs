//! A small xDS management server for tests: ADS (state of the world) over
//! the published Envoy types, serving the snapshot a test sets, recording
//! every request (so a test sees ACKs and NACKs), stoppable and
//! restartable on the same port. The builders make the resources the
//! proxyless subset uses, shaped as gRPC's own clients require them (an
//! API listener with the router filter, EDS clusters over ADS).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                CircuitBreakers, Cluster,
                circuit_breakers::Thresholds,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
            },
            core::v3::{
                Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
                SocketAddress, address, config_source::ConfigSourceSpecifier, socket_address,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
                lb_endpoint::HostIdentifier,
            },
            listener::v3::{ApiListener, Listener},
            route::v3::{
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
                route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
                weighted_cluster::ClusterWeight,
            },
        },
        extensions::filters::{
            http::router::v3::Router,
            network::http_connection_manager::v3::{
                HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
                http_filter::ConfigType,
            },
        },
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
        },
    },
    google::protobuf::{Any, UInt32Value},
};
use prost::{Message, Name};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub use envoy_types::pb::envoy::config::core::v3::HealthStatus as Health;

/// The type URLs of the four resource types.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Every resource the server serves, already encoded, by type and name.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    resources: HashMap<&'static str, Vec<(String, Any)>>,
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(mut self, type_url: &'static str, name: &str, any: Any) -> Self {
        let list = self.resources.entry(type_url).or_default();
        list.retain(|(n, _)| n != name);
        list.push((name.to_owned(), any));
        self
    }

    /// Adds (or replaces) a Listener.
    #[must_use]
    pub fn listener(self, l: Listener) -> Self {
        let name = l.name.clone();
        self.add(LISTENER, &name, any(&l))
    }

    /// Adds (or replaces) a RouteConfiguration.
    #[must_use]
    pub fn route(self, r: RouteConfiguration) -> Self {
        let name = r.name.clone();
        self.add(ROUTE, &name, any(&r))
    }

    /// Adds (or replaces) a Cluster.
    #[must_use]
    pub fn cluster(self, c: Cluster) -> Self {
        let name = c.name.clone();
        self.add(CLUSTER, &name, any(&c))
    }

    /// Adds (or replaces) a ClusterLoadAssignment.
    #[must_use]
    pub fn endpoints(self, e: ClusterLoadAssignment) -> Self {
        let name = e.cluster_name.clone();
        self.add(ENDPOINT, &name, any(&e))
    }

    /// Adds a resource of `type_url` named `name` whose bytes are `value`
    /// (a resource that does not decode, for NACK tests).
    #[must_use]
    pub fn raw(self, type_url: &'static str, name: &str, value: Vec<u8>) -> Self {
        self.add(
            type_url,
            name,
            Any {
                type_url: type_url.to_owned(),
                value,
            },
        )
    }

    /// The simplest complete set: Listener `name` whose one route sends
    /// every call to cluster `cluster`, with `endpoints` at priority 0.
    pub fn single(name: &str, cluster: &str, endpoints: &[SocketAddr]) -> Self {
        Self::new()
            .listener(api_listener(name, &format!("{name}-routes")))
            .route(route_config(
                &format!("{name}-routes"),
                "*",
                &[(cluster, 1)],
            ))
            .cluster(eds_cluster(cluster))
            .endpoints(assignment(
                cluster,
                &endpoints
                    .iter()
                    .map(|a| (*a, 1, 0, Health::Healthy))
                    .collect::<Vec<_>>(),
            ))
    }
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// An API listener whose routes come over RDS (ADS), with the router
/// filter gRPC requires.
pub fn api_listener(name: &str, route_config_name: &str) -> Listener {
    let hcm = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config_name.to_owned(),
        })),
        http_filters: vec![HttpFilter {
            name: "router".to_owned(),
            config_type: Some(ConfigType::TypedConfig(any(&Router::default()))),
            ..HttpFilter::default()
        }],
        ..HttpConnectionManager::default()
    };
    Listener {
        name: name.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&hcm)),
        }),
        ..Listener::default()
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..ConfigSource::default()
    }
}

/// A RouteConfiguration with one virtual host for `domain` whose one
/// route (prefix `""`) sends calls to `clusters` by weight.
pub fn route_config(name: &str, domain: &str, clusters: &[(&str, u32)]) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: format!("{name}-vh"),
            domains: vec![domain.to_owned()],
            routes: vec![route("", clusters)],
            ..VirtualHost::default()
        }],
        ..RouteConfiguration::default()
    }
}

/// A route on path prefix `prefix` to `clusters` by weight (one cluster
/// alone is named directly).
pub fn route(prefix: &str, clusters: &[(&str, u32)]) -> Route {
    let specifier = match clusters {
        [(one, _)] => ClusterSpecifier::Cluster((*one).to_owned()),
        many => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|(c, w)| ClusterWeight {
                    name: (*c).to_owned(),
                    weight: Some(UInt32Value { value: *w }),
                    ..ClusterWeight::default()
                })
                .collect(),
            ..WeightedCluster::default()
        }),
    };
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(prefix.to_owned())),
            ..RouteMatch::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(specifier),
            ..RouteAction::default()
        })),
        ..Route::default()
    }
}

/// An EDS cluster over ADS, round robin.
pub fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        ..Cluster::default()
    }
}

/// `eds_cluster` with a circuit breaker of `max_requests`.
pub fn eds_cluster_limited(name: &str, max_requests: u32) -> Cluster {
    Cluster {
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_requests: Some(UInt32Value {
                    value: max_requests,
                }),
                ..Thresholds::default()
            }],
            ..CircuitBreakers::default()
        }),
        ..eds_cluster(name)
    }
}

/// A ClusterLoadAssignment: each endpoint with its locality weight,
/// priority and health (one locality per endpoint).
pub fn assignment(
    cluster: &str,
    endpoints: &[(SocketAddr, u32, u32, HealthStatus)],
) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: endpoints
            .iter()
            .enumerate()
            .map(
                |(i, (addr, weight, priority, health))| LocalityLbEndpoints {
                    locality: Some(Locality {
                        region: "test".to_owned(),
                        zone: format!("z{i}"),
                        sub_zone: String::new(),
                    }),
                    load_balancing_weight: Some(UInt32Value { value: *weight }),
                    priority: *priority,
                    lb_endpoints: vec![LbEndpoint {
                        health_status: *health as i32,
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(Address {
                                address: Some(address::Address::SocketAddress(SocketAddress {
                                    address: addr.ip().to_string(),
                                    port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                        u32::from(addr.port()),
                                    )),
                                    ..SocketAddress::default()
                                })),
                            }),
                            ..Endpoint::default()
                        })),
                        ..LbEndpoint::default()
                    }],
                    ..LocalityLbEndpoints::default()
                },
            )
            .collect(),
        ..ClusterLoadAssignment::default()
    }
}

/// A request the server received: an ACK when `error` is `None` and the
/// nonce answers a response, a NACK otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    pub names: Vec<String>,
    /// The NACK's `error_detail` message.
    pub error: Option<String>,
    /// The node id (first request of a stream).
    pub node: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    snapshot: Snapshot,
    version: u64,
    seen: Vec<Seen>,
    streams: u64,
}

/// The management server.
#[derive(Debug)]
pub struct ControlPlane {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    stop: Option<oneshot::Sender<()>>,
    streams_stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct Ads {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    /// Turns true when the server stops: every stream ends.
    stopped: watch::Receiver<bool>,
}

impl ControlPlane {
    /// Starts a server on `127.0.0.1:0` serving `snapshot`.
    pub async fn start(snapshot: Snapshot) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("address"), snapshot).await
    }

    /// Starts a server on `addr` serving `snapshot`.
    pub async fn start_on(addr: SocketAddr, snapshot: Snapshot) -> Self {
        let state = Arc::new(Mutex::new(State {
            snapshot,
            version: 1,
            ..State::default()
        }));
        let changed = watch::channel(1).0;
        Self::serve(addr, state, changed).await
    }

    async fn serve(
        addr: SocketAddr,
        state: Arc<Mutex<State>>,
        changed: watch::Sender<u64>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the control plane");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let (streams_stop, streams_stopped) = watch::channel(false);
        let svc = AggregatedDiscoveryServiceServer::new(Ads {
            state: state.clone(),
            changed: changed.clone(),
            stopped: streams_stopped,
        });
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            state,
            changed,
            stop: Some(stop),
            streams_stop,
            task: Some(task),
        }
    }

    /// Serves `snapshot` from now on, as a new version, to every stream.
    pub fn set(&self, snapshot: Snapshot) -> u64 {
        let version = {
            let mut state = self.state.lock().expect("state");
            state.snapshot = snapshot;
            state.version += 1;
            state.version
        };
        self.changed.send_replace(version);
        version
    }

    /// The version being served.
    pub fn version(&self) -> u64 {
        self.state.lock().expect("state").version
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("state").seen.clone()
    }

    /// Streams opened so far.
    pub fn streams(&self) -> u64 {
        self.state.lock().expect("state").streams
    }

    /// Waits (polling every 10 ms, at most `limit`) until `pred` holds of
    /// the requests received.
    pub async fn wait_for(&self, limit: Duration, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.seen();
            if pred(&seen) {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the control plane did not see what was expected within {limit:?}: {seen:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server (every stream ends); [`ControlPlane::restart`]
    /// serves the same state on the same port again.
    pub async fn stop(&mut self) {
        self.streams_stop.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same address, the same snapshot and records.
    pub async fn restart(self) -> Self {
        let mut this = self;
        this.stop().await;
        let (addr, state, changed) = (this.addr, this.state.clone(), this.changed.clone());
        Self::serve(addr, state, changed).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<
    Box<
        dyn Stream<
                Item = Result<
                    envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
                    Status,
                >,
            > + Send,
    >,
>;

/// What one stream has asked for and been sent, per type.
#[derive(Default)]
struct Subscription {
    names: BTreeSet<String>,
    /// The snapshot version last sent, if any.
    sent: Option<u64>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        this.state.lock().expect("state").streams += 1;
        tokio::spawn(async move {
            let mut subscriptions: HashMap<String, Subscription> = HashMap::new();
            let mut changed = this.changed.subscribe();
            let mut stopped = this.stopped.clone();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    request = requests.next() => {
                        let Some(Ok(request)) = request else { return };
                        this.state.lock().expect("state").seen.push(Seen {
                            type_url: request.type_url.clone(),
                            version: request.version_info.clone(),
                            nonce: request.response_nonce.clone(),
                            names: request.resource_names.clone(),
                            error: request.error_detail.as_ref().map(|e| e.message.clone()),
                            node: request.node.as_ref().map(|n| n.id.clone()),
                        });
                        let sub = subscriptions.entry(request.type_url.clone()).or_default();
                        let names: BTreeSet<String> = request.resource_names.iter().cloned().collect();
                        // A new subscription set (or the first request)
                        // gets an answer; an ACK or NACK of what was sent
                        // does not.
                        if sub.sent.is_none() || names != sub.names {
                            sub.names = names;
                            sub.sent = None;
                        }
                    }
                    Ok(()) = changed.changed() => {
                        for sub in subscriptions.values_mut() {
                            sub.sent = None;
                        }
                    }
                }
                let (version, snapshot) = {
                    let state = this.state.lock().expect("state");
                    (state.version, state.snapshot.clone())
                };
                // In dependency order, as a control plane that makes before
                // it breaks sends them: a route moves to a new cluster
                // before the old cluster goes.
                for type_url in [LISTENER, ROUTE, CLUSTER, ENDPOINT] {
                    let Some(sub) = subscriptions.get_mut(type_url) else {
                        continue;
                    };
                    let type_url = type_url.to_owned();
                    if sub.sent.is_some() {
                        continue;
                    }
                    let all = snapshot
                        .resources
                        .get(type_url.as_str())
                        .cloned()
                        .unwrap_or_default();
                    let wildcard =
                        sub.names.is_empty() && (type_url == LISTENER || type_url == CLUSTER);
                    let resources: Vec<Any> = all
                        .into_iter()
                        .filter(|(n, _)| wildcard || sub.names.contains(n))
                        .map(|(_, a)| a)
                        .collect();
                    if sub.names.is_empty() && !wildcard {
                        sub.sent = Some(version);
                        continue;
                    }
                    nonce += 1;
                    let response = DiscoveryResponse {
                        version_info: version.to_string(),
                        resources,
                        type_url: type_url.clone(),
                        nonce: nonce.to_string(),
                        ..DiscoveryResponse::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                    sub.sent = Some(version);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn delta_aggregated_resources(
        &self,
        _: Request<
            Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest>,
        >,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented("state of the world only"))
    }
}
