//! sluice: a sidecar L7 proxy for HTTP/2 gRPC traffic.
//!
//! The binary is a thin shell over this library: [`run`] binds the
//! listeners, starts serving on the current tokio runtime and returns a
//! [`Running`] handle; the integration tests use the same API.
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice::RunError> {
//! let mut config = sluice::Config::embedded();
//! config.server.listen = "127.0.0.1:0".parse().expect("address");
//! let running = sluice::run(&config).await?;
//! println!("listening on {}", running.listen_addr());
//! let report = running.drain().await;
//! println!("drained in {:?}", report.elapsed);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(clippy::print_stdout)]

mod admin;
mod balance;
mod batch;
pub mod check;
pub mod config;
mod forward;
mod net;
mod rescue;
pub mod route;
mod server;
mod stack;
mod stats;
pub mod telemetry;
pub mod tls;
mod tunnel;
mod upstream;
mod via;
mod window;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use sluice_layers::drain;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    balance::Groups,
    config::{AdminListen, DrainConfig},
    stats::Counters,
    telemetry::metrics::Metrics,
};
pub use crate::{config::Config, stats::Stats, tunnel::tracker::Snapshot as AgentTunnels};

/// After the drain deadline, how long connections get to deliver the
/// UNAVAILABLE trailers of the calls that were cut off before they are
/// closed outright: a peer that does not read must not hold sluice up.
const FLUSH_AFTER_DEADLINE: Duration = Duration::from_millis(500);
/// How often a drain under way logs what is still open.
const DRAIN_PROGRESS: Duration = Duration::from_secs(5);
/// How long closing upstream connections may take once every call is done.
const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_millis(500);
/// Listen backlog of the proxy port.
const LISTEN_BACKLOG: u32 = 1024;

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
    signal: drain::Signal,
    watch: drain::Watch,
    drain_requested: Arc<Notify>,
    abort: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin_task: Option<JoinHandle<()>>,
    groups: Arc<Groups>,
    counters: Arc<Counters>,
    drain: DrainConfig,
}

/// Asks a [`Running`] sluice to reload its TLS material.
#[derive(Clone, Debug)]
pub struct ReloadHandle(Arc<Notify>);

impl ReloadHandle {
    /// See [`Running::reload_tls`].
    pub fn reload(&self) {
        self.0.notify_one();
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

/// Binds the listeners and starts serving on the current tokio runtime.
///
/// # Errors
///
/// [`RunError::Bind`] when the proxy or admin address cannot be bound,
/// [`RunError::Tls`] when TLS material cannot be used.
pub async fn run(config: &Config) -> Result<Running, RunError> {
    let server_tls = match &config.server.tls {
        Some(t) => Some(Arc::new(tls::server::ServerTls::new("server.tls", t)?)),
        None => None,
    };
    let hub_tls = match config.tunnel.hub.as_ref().and_then(|h| h.tls.as_ref()) {
        Some(t) => Some(Arc::new(tls::server::ServerTls::new("tunnel.hub.tls", t)?)),
        None => None,
    };
    let agent_tls = match config.tunnel.agent.as_ref().and_then(|a| a.tls.as_ref()) {
        Some(t) => Some(Arc::new(tls::client::ClientTls::new(
            "tunnel.agent.tls".to_owned(),
            t,
        )?)),
        None => None,
    };
    let counters = Arc::new(Counters::default());
    let metrics = Arc::new(Metrics::new());
    let groups = Arc::new(Groups::from_config(config, &counters)?);
    let listener = bind(config.server.listen, config.server.reuse_port)?;
    let listen = local_addr(&listener, config.server.listen)?;
    // (listener, TLS on it?)
    let tls_only = server_tls.is_some()
        && config
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.listen.is_none());
    let mut listeners = vec![(net::Listener::Tcp(listener), tls_only)];
    let mut tls_listen = tls_only.then_some(listen);
    if let Some(addr) = config.server.tls.as_ref().and_then(|t| t.listen) {
        let l = bind(addr, config.server.reuse_port)?;
        tls_listen = Some(local_addr(&l, addr)?);
        listeners.push((net::Listener::Tcp(l), true));
    }
    let hub_listener = match &config.tunnel.hub {
        Some(hub) => {
            let l = bind(hub.listen, config.server.reuse_port)?;
            let addr = local_addr(&l, hub.listen)?;
            Some((l, addr))
        }
        None => None,
    };
    if let Some(path) = &config.server.listen_unix {
        let l = net::Listener::bind_unix(path).map_err(|source| RunError::BindUnix {
            path: path.clone(),
            source,
        })?;
        listeners.push((l, false));
    }
    let (signal, watch) = drain::channel();
    let stack = stack::build(
        config,
        groups.clone(),
        counters.clone(),
        watch.clone(),
        metrics.clone(),
    );
    let (abort, aborted) = watch::channel(false);
    let drain_requested = Arc::new(Notify::new());

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
    let (admin, admin_task) = match config.admin.listen {
        AdminListen::Off => (None, None),
        AdminListen::On(addr) => {
            let admin_listener = bind_admin(addr).await?;
            let bound = local_addr(&admin_listener, addr)?;
            let state = Arc::new(admin::State {
                drain: watch.clone(),
                drain_requested: drain_requested.clone(),
                metrics: metrics.clone(),
                counters: counters.clone(),
                pool: groups
                    .default_pool()
                    .expect("the default group has its endpoint"),
                ready_requires_upstream: config.admin.ready_requires_upstream,
                agents: agents.clone(),
                ready_requires_agents: config.admin.ready_requires_agents,
                tracker: tracker.clone(),
                control: config.admin.control,
            });
            (
                Some(bound),
                Some(tokio::spawn(admin::serve(admin_listener, state))),
            )
        }
    };

    let tag_peer = config.enrich.forwarded || config.enrich.x_forwarded_for;
    let shared = Arc::new(server::Shared::new(
        &config.server,
        tag_peer,
        counters.clone(),
        metrics.clone(),
    ));
    let servers = listeners.into_iter().map(|(listener, is_tls)| {
        server::serve(
            listener,
            if is_tls { server_tls.clone() } else { None },
            shared.clone(),
            stack.clone(),
            config.server.max_connections,
            watch.clone(),
            aborted.clone(),
        )
    });
    let servers: Vec<_> = servers.collect();
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
                listener: net::Listener::Tcp(listener),
                config: hub.clone(),
                group,
                upstream,
                counters: counters.clone(),
                watch: watch.clone(),
                tls: hub_tls.clone(),
                hand_over: hand_over_watch,
            }
            .serve(),
        ));
    }
    if let (Some(agent), Some(t)) = (&config.tunnel.agent, tracker.clone()) {
        tunnel_tasks.push(tokio::spawn(tunnel::agent::run(
            agent.clone(),
            agent_tls.clone(),
            t,
            shared.clone(),
            stack.clone(),
            watch.clone(),
        )));
    }

    let mut materials: Vec<Arc<dyn tls::reload::Reload>> = groups.tls_materials().to_vec();
    materials.extend(
        server_tls
            .iter()
            .chain(&hub_tls)
            .map(|t| t.material() as Arc<dyn tls::reload::Reload>),
    );
    materials.extend(
        agent_tls
            .iter()
            .map(|t| t.material() as Arc<dyn tls::reload::Reload>),
    );
    let reload_requested = Arc::new(Notify::new());
    let reloader = (!materials.is_empty()).then(|| {
        tokio::spawn(
            tls::reload::Reloader {
                materials,
                interval: config.tls.reload_interval,
                requested: reload_requested.clone(),
                metrics: metrics.clone(),
            }
            .run(),
        )
    });
    Ok(Running {
        listen,
        tls_listen,
        tunnel_listen,
        tunnel_tasks,
        tracker,
        hand_over,
        admin,
        reload_requested,
        reloader,
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

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, RunError> {
    if reuse_port && addr.port() != 0 && port_taken(addr) {
        // SO_REUSEPORT lets us bind anyway: right during a restart (the
        // new process takes over), wrong when a second sluice was started
        // by mistake. Say so, once.
        warn!(
            %addr,
            "another process already listens on {addr}; with server.reuse_port the kernel now \
             splits new connections between it and this sluice (as during a restart's \
             hand-over); if that is not a restart, stop the other one or set \
             server.reuse_port = false"
        );
    }
    let err = |source| RunError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuseport(true).map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Whether a listener already holds `addr`: a bind without
/// `SO_REUSEPORT` fails then.
fn port_taken(addr: SocketAddr) -> bool {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let Ok(socket) = socket else {
        return false;
    };
    let _ = socket.set_reuseaddr(true);
    matches!(socket.bind(addr), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

/// Binds the admin address. When the *default* admin port is taken (another
/// sluice on the same host, both on defaults), falls back to a free port and
/// says so, rather than refusing to start; an address the config chose
/// itself must be bound as asked.
async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, RunError> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && addr.to_string() == config::DEFAULT_ADMIN_LISTEN =>
        {
            let fallback = SocketAddr::new(addr.ip(), 0);
            warn!(%addr, "default admin port in use; admin server on a free port instead");
            TcpListener::bind(fallback)
                .await
                .map_err(|source| RunError::Bind {
                    addr: fallback,
                    source,
                })
        }
        Err(source) => Err(RunError::Bind { addr, source }),
    }
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, RunError> {
    listener
        .local_addr()
        .map_err(|source| RunError::Bind { addr, source })
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

    /// A handle that does [`Running::reload_tls`] from elsewhere (a signal
    /// handler task).
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle(self.reload_requested.clone())
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

    /// Drains and stops:
    /// 1. `/ready` answers 503 at once; calls are still served for
    ///    `drain.pre_delay`;
    /// 2. a tunnel hub tells its agents to re-home and waits until they
    ///    have (at most 5 s), so that clients that reconnect find them;
    /// 3. the listener closes and every connection gets GOAWAY (in two
    ///    steps); new calls that still arrive are refused with UNAVAILABLE;
    /// 4. calls in flight run until `drain.deadline`; then every call still
    ///    open ends with UNAVAILABLE trailers, and connections that cannot
    ///    take them are closed shortly after;
    /// 5. upstream connections close last.
    ///
    /// Never takes much longer than `pre_delay + deadline + 1 s` (plus the
    /// hand-over's 5 s for a hub), whatever the peers do.
    pub async fn drain(mut self) -> DrainReport {
        let start = Instant::now();
        self.signal.announce();
        if !self.drain.pre_delay.is_zero() {
            info!(delay = ?self.drain.pre_delay, "not ready; serving on until the pre-drain delay ends");
            tokio::time::sleep(self.drain.pre_delay).await;
        }
        if let Some(hand_over) = self.hand_over.take() {
            info!("handing agents over before clients get GOAWAY");
            hand_over.run().await;
        }
        let at_start = self.counters.snapshot();
        info!(
            deadline = ?self.drain.deadline,
            calls = at_start.calls_in_flight,
            connections = at_start.downstream_connections,
            "draining: GOAWAY sent, finishing in-flight calls"
        );
        let mut server_done = false;
        let began = tokio::time::Instant::now();
        let drained = self.signal.drain_within(self.drain.deadline);
        tokio::pin!(drained);
        // A long drain says how it goes: what is still open and how long
        // it may still take.
        let mut progress = tokio::time::interval_at(began + DRAIN_PROGRESS, DRAIN_PROGRESS);
        let outcome = loop {
            tokio::select! {
                outcome = &mut drained => break outcome,
                _ = progress.tick() => {
                    let now = self.counters.snapshot();
                    info!(
                        calls = now.calls_in_flight,
                        connections = now.downstream_connections,
                        left = ?self.drain.deadline.saturating_sub(began.elapsed()),
                        "draining"
                    );
                }
            }
        };
        let cut_off = match outcome {
            Ok(()) => 0,
            Err(_) => {
                // Counted in calls, not in the drain's internal guards
                // (connections, tunnels).
                let calls = self.counters.calls_in_flight();
                warn!(
                    calls,
                    connections = self.counters.snapshot().downstream_connections,
                    "drain deadline reached; ending open calls with UNAVAILABLE"
                );
                match tokio::time::timeout(FLUSH_AFTER_DEADLINE, &mut self.server).await {
                    Ok(_) => server_done = true,
                    Err(_) => {
                        let _ = self.abort.send(true);
                    }
                }
                calls
            }
        };
        info!(
            elapsed = ?start.elapsed(),
            finished = at_start.calls_in_flight.saturating_sub(cut_off),
            cut_off,
            "drained"
        );
        if !server_done {
            let _ = (&mut self.server).await;
        }
        self.groups.close();
        let _ = tokio::time::timeout(
            UPSTREAM_CLOSE_WAIT,
            self.counters.upstream_connections_closed(),
        )
        .await;
        if let Some(admin) = self.admin_task.take() {
            admin.abort();
        }
        if let Some(reloader) = self.reloader.take() {
            reloader.abort();
        }
        for task in self.tunnel_tasks.drain(..) {
            task.abort();
        }
        DrainReport {
            elapsed: start.elapsed(),
            cut_off,
        }
    }
}

/// One line per route of `config`, and what happens when none matches: what
/// `sluice check` prints.
pub fn describe_routes(config: &Config) -> Vec<String> {
    route::describe(config)
}

/// Runs sluice as the binary does until a shutdown signal (SIGTERM,
/// SIGINT) or `POST /drain`, then drains: [`run`], SIGHUP reloading TLS
/// material, the log line with the bound addresses, and the drain. A
/// second signal during the drain exits at once.
///
/// # Errors
///
/// What [`run`] says.
pub async fn serve(config: Config) -> Result<(), RunError> {
    let running = run(&config).await?;
    // Before the address is logged: a harness that reads the line and
    // sends SIGHUP must find the handler in place.
    #[cfg(unix)]
    {
        let reload = running.reload_handle();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        info!("SIGHUP: reloading TLS material");
                        reload.reload();
                    }
                });
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGHUP; TLS files are still polled"),
        }
    }
    let admin = running
        .admin_addr()
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let tls = match running.tls_addr() {
        Some(a) if a == running.listen_addr() => " (TLS)".to_owned(),
        Some(a) => format!(" (h2c) and {a} (TLS)"),
        None => " (h2c)".to_owned(),
    };
    if let Some(addr) = running.tunnel_addr() {
        info!(%addr, "tunnel hub: agents dial {addr}");
    }
    info!(
        listen = %running.listen_addr(),
        upstream = %config.upstream.address,
        admin = %admin,
        "sluice listening on {}{tls}, forwarding to {}, admin on {admin}",
        running.listen_addr(),
        config.upstream.address,
    );
    tokio::select! {
        () = shutdown_signal() => info!("shutdown signal received; draining"),
        () = running.drain_requested() => info!("POST /drain received; draining"),
    }
    // A second signal exits at once.
    tokio::spawn(async {
        shutdown_signal().await;
        warn!("second shutdown signal; exiting now");
        std::process::exit(0);
    });
    let report = running.drain().await;
    info!(
        elapsed = ?report.elapsed,
        cut_off = report.cut_off,
        "sluice stopped"
    );
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops sluice");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Asks the admin server at `addr` for `GET /ready` (an unspecified
/// address, `0.0.0.0:15090`, is asked on loopback), with `timeout` for
/// the connect and the answer together: its status and body. What
/// `sluice health` runs; blocking, no runtime needed.
///
/// # Errors
///
/// The I/O error of a connection that fails, times out, or answers
/// something that is not HTTP.
pub fn admin_ready(addr: SocketAddr, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))
    };
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, left()?)?;
    tcp.set_write_timeout(Some(left()?))?;
    tcp.write_all(b"GET /ready HTTP/1.0\r\nhost: sluice\r\n\r\n")?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    // An answer is a few dozen bytes: at most 16 KiB are read.
    while answer.len() < 16 * 1024 {
        tcp.set_read_timeout(Some(left()?))?;
        match tcp.read(&mut chunk)? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer")
        })?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

/// Builds the tokio runtime the config asks for: a current-thread runtime
/// for one worker, a multi-thread one otherwise.
///
/// # Errors
///
/// The I/O error of creating the runtime.
pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match config.runtime.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().thread_name("sluice").build()
}
