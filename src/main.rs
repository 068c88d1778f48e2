//! `sluice [--config FILE] [--listen ADDR] [--upstream ADDR]`, and
//! `sluice check FILE`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use sluice::config::{AdminListen, Config, ConfigError, HostPort};
use tracing::{info, warn};

/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the listener cannot be bound or the runtime not built.
const EXIT_START: u8 = 1;

/// A sidecar L7 proxy for HTTP/2 gRPC traffic.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// TOML config file; without one sluice runs on its embedded default
    /// (h2c on 0.0.0.0:15051, forwarding to 127.0.0.1:50051).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.listen` (port 0 picks a free port;
    /// the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Upstream `host:port`, overriding `upstream.address`.
    #[arg(long, value_name = "ADDR")]
    upstream: Option<HostPort>,
    /// Admin server address (`/live`, `/ready`, `/metrics`, `POST /drain`),
    /// or `off`; overrides `admin.listen`. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR|off")]
    admin: Option<AdminListen>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file and print what it configures, then exit.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Check { file }) = &cli.command {
        return check(file);
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sluice: bad config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _telemetry = match sluice::telemetry::init(&config.log, &config.trace) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match sluice::runtime(&config) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(serve(config))
}

fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded(),
    };
    if let Some(listen) = cli.listen {
        config.server.listen = listen;
    }
    if let Some(upstream) = &cli.upstream {
        config.upstream.address = upstream.clone();
    }
    if let Some(admin) = cli.admin {
        config.admin.listen = admin;
    }
    Ok(config)
}

fn check(file: &std::path::Path) -> ExitCode {
    match Config::from_file(file) {
        Ok(config) => {
            if let Err(e) = sluice::tls::check(&config) {
                eprintln!("sluice: bad TLS material: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            println!("{}: ok", file.display());
            let tls = config.server.tls.as_ref();
            let plain = if tls.is_some_and(|t| t.listen.is_none()) {
                "TLS"
            } else {
                "h2c"
            };
            println!("  listen    {} ({plain})", config.server.listen);
            if let Some(addr) = tls.and_then(|t| t.listen) {
                println!("  listen    {addr} (TLS)");
            }
            if let Some(auth) = tls.and_then(|t| t.client_auth.as_ref()) {
                println!(
                    "  clients   certificates {:?} against {}, roles from {:?}; identity as {}",
                    auth.mode,
                    auth.ca.display(),
                    auth.roles,
                    config.client_id_key().unwrap_or("(not forwarded)")
                );
            }
            if let Some(path) = &config.server.listen_unix {
                println!("  listen    {} (h2c, Unix socket)", path.display());
            }
            let upstream_tls = |t: Option<&sluice::config::UpstreamTlsConfig>| match t {
                None => String::new(),
                Some(t) => format!(
                    " over TLS (CA {}{}{})",
                    t.ca.as_ref()
                        .map_or_else(|| "webpki roots".to_owned(), |c| c.display().to_string()),
                    t.server_name
                        .as_ref()
                        .map(|n| format!(", name {n}"))
                        .unwrap_or_default(),
                    if t.cert.is_some() {
                        ", client certificate"
                    } else {
                        ""
                    }
                ),
            };
            println!(
                "  upstream  {}{}",
                config.upstream.address,
                upstream_tls(config.upstream.tls.as_ref())
            );
            for (name, group) in &config.upstreams {
                let endpoints: Vec<String> =
                    group.endpoints.iter().map(ToString::to_string).collect();
                let strategy: Vec<String> =
                    group.strategy.iter().map(|s| format!("{s:?}")).collect();
                println!(
                    "  group     {name}: {} (strategy {}){}",
                    endpoints.join(", "),
                    strategy.join(" → "),
                    upstream_tls(group.tls.as_ref())
                );
            }
            if let Some(hub) = &config.tunnel.hub {
                println!(
                    "  hub       {} on {} (group {}, generation {}), agents join group {}{}",
                    hub.name,
                    hub.listen,
                    hub.hub_group,
                    hub.generation,
                    hub.group,
                    if hub.tokens.is_empty() {
                        "; no token asked"
                    } else {
                        "; token asked"
                    }
                );
            }
            if let Some(agent) = &config.tunnel.agent {
                let hubs: Vec<String> = agent.hubs.iter().map(ToString::to_string).collect();
                println!(
                    "  agent     {} dials {} ({}), serving calls to {}",
                    agent.id,
                    hubs.join(", "),
                    match agent.connections {
                        0 => "a tunnel per hub".to_owned(),
                        n => format!("at most {n} tunnels"),
                    },
                    config.upstream.address
                );
            }
            for line in sluice::describe_routes(&config) {
                println!("  {line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice: bad config: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let running = match sluice::run(&config).await {
        Ok(running) => running,
        // A certificate, key or CA bundle that cannot be used is a bad
        // config (as `sluice check` says), not a failure to start.
        Err(e @ sluice::RunError::Tls(_)) => {
            eprintln!("sluice: bad TLS material: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
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
    ExitCode::SUCCESS
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
