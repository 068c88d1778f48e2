//! The wiring of a sluice: listeners, the inbound stack, the admin
//! server, the tunnel roles and the TLS reloader. Each part starts with
//! what it needs and hands back a handle; [`Running`] holds them, and its
//! drain takes them down in order.

mod bind;
mod drain;
mod handles;
mod reload;
mod serve;

use std::time::Duration;

use std::{net::SocketAddr, sync::Arc};

use sluice_layers::drain as drain_signal;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use self::bind::{bind, bind_admin, local_addr};
use self::handles::{admin_state, views};
pub use self::reload::ConfigSource;
use self::reload::reload_fn;
pub use self::serve::{admin_ready, serve};
use crate::{
    AgentTunnels, Config, Stats, admin,
    balance::Groups,
    config::{AdminListen, DrainConfig},
    live::Switch,
    proto::transport,
    server, stack,
    stats::Counters,
    telemetry::metrics::Metrics,
    tls, tunnel,
};

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Unix socket path could not be bound.
    #[error("cannot listen on {}: {source}", path.display())]
    BindUnix {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or CA bundle cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The xDS bootstrap cannot be read or used.
    #[error(transparent)]
    Xds(#[from] crate::xds::BootstrapError),
}

/// A running sluice.
#[derive(Debug)]
pub struct Running {
    listen: SocketAddr,
    tls_listen: Option<SocketAddr>,
    tunnel_listen: Option<SocketAddr>,
    tunnel_tasks: Vec<JoinHandle<()>>,
    tracker: Option<Arc<tunnel::tracker::Tracker>>,
    /// A hub's first drain step: agents re-homed before clients go.
    hand_over: Option<tunnel::hub::HandOver>,
    admin: Option<SocketAddr>,
    reload_requested: Arc<Notify>,
    reloader: Option<JoinHandle<()>>,
    config_reloader: Arc<reload::Reloader>,
    watcher: Option<JoinHandle<()>>,
    xds_task: Option<JoinHandle<()>>,
    xds: Option<Arc<crate::xds::Shared>>,
    signal: drain_signal::Signal,
    watch: drain_signal::Watch,
    drain_requested: Arc<Notify>,
    abort: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin_task: Option<JoinHandle<()>>,
    groups: Arc<Groups>,
    counters: Arc<Counters>,
    drain: DrainConfig,
}

/// Asks a [`Running`] sluice to read its config file and its TLS
/// material again (what SIGHUP does).
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    tls: Arc<Notify>,
    config: Arc<reload::Reloader>,
}

impl ReloadHandle {
    /// Reloads the config file (see [`Running::reload_config`]), then
    /// every piece of TLS material; returns at once, the outcome is
    /// logged and counted.
    pub fn reload(&self) {
        let (tls, config) = (self.tls.clone(), self.config.clone());
        tokio::spawn(async move {
            let _ = tokio::task::spawn_blocking(move || config.reload("SIGHUP")).await;
            tls.notify_one();
        });
    }
}

/// How a drain went.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct DrainReport {
    /// From the start of the drain to the last connection closed.
    pub elapsed: Duration,
    /// Calls still open at the drain deadline, which were ended with
    /// UNAVAILABLE.
    pub cut_off: usize,
}

/// The TLS material a config names, read once at the start.
struct Material {
    server: Option<Arc<tls::server::ServerTls>>,
    hub: Option<Arc<tls::server::ServerTls>>,
    agent: Option<Arc<tls::client::ClientTls>>,
}

impl Material {
    fn read(config: &Config) -> Result<Self, RunError> {
        let server = match &config.server.tls {
            Some(t) => Some(Arc::new(tls::server::ServerTls::new("server.tls", t)?)),
            None => None,
        };
        let hub = match config.tunnel.hub.as_ref().and_then(|h| h.tls.as_ref()) {
            Some(t) => Some(Arc::new(tls::server::ServerTls::new("tunnel.hub.tls", t)?)),
            None => None,
        };
        let agent = match config.tunnel.agent.as_ref().and_then(|a| a.tls.as_ref()) {
            Some(t) => Some(Arc::new(tls::client::ClientTls::new(
                "tunnel.agent.tls".to_owned(),
                t,
            )?)),
            None => None,
        };
        Ok(Self { server, hub, agent })
    }

    /// Every piece the reloader looks after: these, and the groups' at
    /// each round (a config reload changes those).
    fn reloadable(&self, groups: &Arc<Groups>) -> tls::reload::MaterialsFn {
        let mut fixed: Vec<Arc<dyn tls::reload::Reload>> = Vec::new();
        fixed.extend(
            self.server
                .iter()
                .chain(&self.hub)
                .map(|t| t.material() as Arc<dyn tls::reload::Reload>),
        );
        fixed.extend(
            self.agent
                .iter()
                .map(|t| t.material() as Arc<dyn tls::reload::Reload>),
        );
        let groups = groups.clone();
        Arc::new(move || {
            let mut all = groups.tls_materials();
            all.extend(fixed.iter().cloned());
            all
        })
    }
}

/// The listeners of the proxy port(s), each with whether it speaks TLS.
struct Listeners {
    all: Vec<(transport::Listener, bool)>,
    listen: SocketAddr,
    tls_listen: Option<SocketAddr>,
}

impl Listeners {
    fn bind(config: &Config, tls: bool) -> Result<Self, RunError> {
        let listener = bind(config.server.listen, config.server.reuse_port)?;
        let listen = local_addr(&listener, config.server.listen)?;
        let tls_only = tls
            && config
                .server
                .tls
                .as_ref()
                .is_some_and(|t| t.listen.is_none());
        let mut all = vec![(transport::Listener::Tcp(listener), tls_only)];
        let mut tls_listen = tls_only.then_some(listen);
        if let Some(addr) = config.server.tls.as_ref().and_then(|t| t.listen) {
            let l = bind(addr, config.server.reuse_port)?;
            tls_listen = Some(local_addr(&l, addr)?);
            all.push((transport::Listener::Tcp(l), true));
        }
        if let Some(path) = &config.server.listen_unix {
            let l = transport::Listener::bind_unix(path).map_err(|source| RunError::BindUnix {
                path: path.clone(),
                source,
            })?;
            all.push((l, false));
        }
        Ok(Self {
            all,
            listen,
            tls_listen,
        })
    }
}

/// Binds the listeners and starts serving on the current tokio runtime,
/// with a config that no reload changes (see [`run_with`]).
///
/// # Errors
///
/// [`RunError::Bind`] when the proxy or admin address cannot be bound,
/// [`RunError::Tls`] when TLS material cannot be used.
pub async fn run(config: &Config) -> Result<Running, RunError> {
    run_with(config, None).await
}

/// [`run`], with the file `config` was read from: SIGHUP, `POST /reload`
/// and (with `reload.watch`) a change of the file apply it again while
/// calls run.
///
/// # Errors
///
/// As [`run`].
pub async fn run_with(config: &Config, source: Option<ConfigSource>) -> Result<Running, RunError> {
    let material = Material::read(config)?;
    let bootstrap = crate::xds::Bootstrap::find(&config.xds)?;
    let counters = Arc::new(Counters::default());
    let groups = Arc::new(Groups::from_config(config, &counters)?);
    let tracker = config
        .tunnel
        .agent
        .as_ref()
        .map(|a| tunnel::tracker::Tracker::new(a.expiry, a.connections));
    let agents = config
        .tunnel
        .hub
        .as_ref()
        .and_then(|h| groups.group(&h.group));
    let metrics = Arc::new(Metrics::new(views(
        &groups,
        agents.as_ref(),
        tracker.as_ref(),
    )));
    let listeners = Listeners::bind(config, material.server.is_some())?;
    let (xds, xds_task) = match bootstrap {
        Some(bootstrap) => {
            let (shared, task) = crate::xds::start(
                bootstrap,
                config.xds.clone(),
                config.upstream.clone(),
                counters.clone(),
                metrics.clone(),
            );
            (Some(shared), Some(task))
        }
        None => (None, None),
    };
    let hub_listener = match &config.tunnel.hub {
        Some(hub) => {
            let l = bind(hub.listen, config.server.reuse_port)?;
            let addr = local_addr(&l, hub.listen)?;
            Some((l, addr))
        }
        None => None,
    };
    let (signal, watch) = drain_signal::channel();
    let parts = stack::Parts {
        groups: groups.clone(),
        counters: counters.clone(),
        drain: watch.clone(),
        metrics: metrics.clone(),
        access: Arc::default(),
        xds: xds.clone(),
    };
    let switch = Switch::new(stack::build(config, &parts));
    // The peer's address travels with each call when enrichment or the
    // access log wants it.
    let shared = Arc::new(
        server::ListenerSettings::new(
            &config.server,
            reload::tag_peer(config),
            counters.clone(),
            metrics.clone(),
        )
        .peeking(config.routes.iter().any(|r| r.field.is_some())),
    );
    let config_reloader = Arc::new(reload::Reloader::new(
        source,
        config,
        parts,
        switch.clone(),
        shared.clone(),
    ));
    let (abort, aborted) = watch::channel(false);
    let drain_requested = Arc::new(Notify::new());

    let (admin, admin_task) = match config.admin.listen {
        AdminListen::Off => (None, None),
        AdminListen::On(addr) => {
            let listener = bind_admin(addr).await?;
            let bound = local_addr(&listener, addr)?;
            let state = admin_state(
                config,
                &groups,
                agents.clone(),
                admin::State {
                    drain: watch.clone(),
                    drain_requested: drain_requested.clone(),
                    metrics: metrics.clone(),
                    counters: counters.clone(),
                    upstream_reachable: None,
                    agents: None,
                    ready_requires_agents: config.admin.ready_requires_agents,
                    control: config.admin.control,
                    reload: Some(reload_fn(&config_reloader)),
                    config: Some({
                        let (r, xds) = (config_reloader.clone(), xds.clone());
                        Arc::new(move || {
                            let mut text = r.describe();
                            if let Some(xds) = &xds {
                                text.push_str(&crate::xds::describe(xds));
                            }
                            text
                        })
                    }),
                    xds_ready: xds
                        .clone()
                        .filter(|_| config.xds.ready_requires_config)
                        .map(|x| {
                            Arc::new(move || x.ready()) as Arc<dyn Fn() -> bool + Send + Sync>
                        }),
                },
            );
            (
                Some(bound),
                Some(tokio::spawn(admin::serve(listener, Arc::new(state)))),
            )
        }
    };

    let servers: Vec<_> = listeners
        .all
        .into_iter()
        .map(|(listener, is_tls)| {
            server::serve(
                listener,
                if is_tls {
                    material.server.clone()
                } else {
                    None
                },
                shared.clone(),
                switch.live(),
                config.server.max_connections,
                watch.clone(),
                aborted.clone(),
            )
        })
        .collect();
    let server = tokio::spawn(async move {
        futures_util::future::join_all(servers).await;
    });

    let mut tunnel_tasks = Vec::new();
    let mut hand_over = None;
    let tunnel_listen = hub_listener.as_ref().map(|(_, addr)| *addr);
    if let (Some(hub), Some((listener, _))) = (&config.tunnel.hub, hub_listener) {
        // Groups::from_config creates the agents' group when the config
        // does not.
        let group = agents.clone().expect("the agents' group exists");
        let upstream = config
            .upstreams
            .get(&hub.group)
            .map_or_else(|| config.upstream.clone(), |g| config.group_upstream(g));
        let (handle, hand_over_watch) = tunnel::hub::hand_over();
        hand_over = Some(handle);
        tunnel_tasks.push(tokio::spawn(
            tunnel::hub::Hub {
                listener: transport::Listener::Tcp(listener),
                config: hub.clone(),
                group,
                upstream,
                counters: counters.clone(),
                watch: watch.clone(),
                tls: material.hub.clone(),
                hand_over: hand_over_watch,
            }
            .serve(),
        ));
    }
    if let (Some(agent), Some(t)) = (&config.tunnel.agent, tracker.clone()) {
        tunnel_tasks.push(tokio::spawn(tunnel::agent::run(
            agent.clone(),
            material.agent.clone(),
            t,
            shared,
            switch.live(),
            watch.clone(),
        )));
    }

    let reload_requested = Arc::new(Notify::new());
    let reloader = Some(tokio::spawn(
        tls::reload::Reloader {
            materials: material.reloadable(&groups),
            interval: config.tls.reload_interval,
            requested: reload_requested.clone(),
            metrics: metrics.clone(),
        }
        .run(),
    ));
    let watcher = config
        .reload
        .watch
        .then(|| tokio::spawn(config_reloader.clone().watch(config.reload.interval)));
    Ok(Running {
        listen: listeners.listen,
        tls_listen: listeners.tls_listen,
        tunnel_listen,
        tunnel_tasks,
        tracker,
        hand_over,
        admin,
        reload_requested,
        reloader,
        config_reloader,
        watcher,
        xds_task,
        xds,
        signal,
        watch,
        drain_requested,
        abort,
        server,
        admin_task,
        groups,
        counters,
        drain: config.drain.clone(),
    })
}

impl Running {
    /// The address the proxy listener is bound to (the real port when the
    /// config said port 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address of the TLS listener, if there is one (the same as
    /// [`Running::listen_addr`] when `server.listen` speaks TLS only).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listen
    }

    /// The address agents dial, when this sluice is a tunnel hub.
    pub fn tunnel_addr(&self) -> Option<SocketAddr> {
        self.tunnel_listen
    }

    /// The agent's tunnel pool now, when this sluice is a tunnel agent.
    pub fn agent_tunnels(&self) -> Option<AgentTunnels> {
        self.tracker.as_ref().map(|t| t.snapshot())
    }

    /// Endpoints of group `group` now (for a hub: the agents connected).
    pub fn group_len(&self, group: &str) -> usize {
        self.groups.group(group).map_or(0, |g| g.len())
    }

    /// [`Running::group_len`] as a function that outlives the handle (to
    /// watch a group while [`Running::drain`] runs).
    pub fn group_len_fn(&self, group: &str) -> impl Fn() -> usize + Send + Sync + 'static {
        let (groups, group) = (self.groups.clone(), group.to_owned());
        move || groups.group(&group).map_or(0, |g| g.len())
    }

    /// Reads every certificate, key and CA bundle again now, whether or not
    /// the files look changed (what SIGHUP does). Material that does not
    /// parse is kept as it was.
    pub fn reload_tls(&self) {
        self.reload_requested.notify_one();
    }

    /// A handle that does what SIGHUP does from elsewhere (a signal
    /// handler task): [`Running::reload_config`], then
    /// [`Running::reload_tls`].
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            tls: self.reload_requested.clone(),
            config: self.config_reloader.clone(),
        }
    }

    /// Reads the config file again and applies it to the calls that start
    /// from now on (what `POST /reload` does): its answer, as text. An
    /// invalid file changes nothing.
    ///
    /// # Errors
    ///
    /// Why nothing was applied: the file's error (with its line, column
    /// and key), TLS material a new group cannot use, or no file to read.
    pub async fn reload_config(&self) -> Result<String, String> {
        let reloader = self.config_reloader.clone();
        match tokio::task::spawn_blocking(move || reloader.reload("request")).await {
            Ok(Ok(outcome)) => Ok(outcome.text()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the reload failed: {e}")),
        }
    }

    /// What `GET /config` shows: where the config in force came from,
    /// and what it configures.
    pub fn config_in_force(&self) -> String {
        self.config_reloader.describe()
    }

    /// The address the admin server is bound to, unless it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// What sluice holds open right now.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// The addresses of an upstream group's endpoints now (names resolved
    /// to one endpoint per address), or `None` for an unknown group.
    pub fn group_endpoints(&self, group: &str) -> Option<Vec<String>> {
        self.groups.addresses(group)
    }

    /// Whether `/ready` answers 200 (before any upstream check).
    pub fn is_ready(&self) -> bool {
        self.watch.is_ready()
    }

    /// Resolves when `POST /drain` arrives on the admin server.
    pub async fn drain_requested(&self) {
        self.drain_requested.notified().await;
    }
}
