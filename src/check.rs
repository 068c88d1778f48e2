//! What `sluice check` prints: every part of a valid config, one line
//! each, as an operator reads it (listeners, upstreams and groups, tunnel
//! roles, routes).

use crate::config::{Config, UpstreamTlsConfig};

/// The lines `sluice check` prints for `config` (after its `FILE: ok`).
pub fn report(config: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    let tls = config.server.tls.as_ref();
    let plain = if tls.is_some_and(|t| t.listen.is_none()) {
        "TLS"
    } else {
        "h2c"
    };
    lines.push(format!("  listen    {} ({plain})", config.server.listen));
    if let Some(addr) = tls.and_then(|t| t.listen) {
        lines.push(format!("  listen    {addr} (TLS)"));
    }
    if let Some(auth) = tls.and_then(|t| t.client_auth.as_ref()) {
        lines.push(format!(
            "  clients   certificates {:?} against {}, roles from {:?}; identity as {}",
            auth.mode,
            auth.ca.display(),
            auth.roles,
            config.client_id_key().unwrap_or("(not forwarded)")
        ));
    }
    if let Some(path) = &config.server.listen_unix {
        lines.push(format!("  listen    {} (h2c, Unix socket)", path.display()));
    }
    let upstream_tls = |t: Option<&UpstreamTlsConfig>| match t {
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
    lines.push(format!(
        "  upstream  {}{}",
        config.upstream.address,
        upstream_tls(config.upstream.tls.as_ref())
    ));
    for (name, group) in &config.upstreams {
        let endpoints: Vec<String> = group.endpoints.iter().map(ToString::to_string).collect();
        let strategy: Vec<String> = group.strategy.iter().map(|s| format!("{s:?}")).collect();
        lines.push(format!(
            "  group     {name}: {} (strategy {}){}",
            endpoints.join(", "),
            strategy.join(" → "),
            upstream_tls(group.tls.as_ref())
        ));
    }
    if let Some(hub) = &config.tunnel.hub {
        lines.push(format!(
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
        ));
    }
    if let Some(agent) = &config.tunnel.agent {
        let hubs: Vec<String> = agent.hubs.iter().map(ToString::to_string).collect();
        lines.push(format!(
            "  agent     {} dials {} ({}), serving calls to {}",
            agent.id,
            hubs.join(", "),
            match agent.connections {
                0 => "a tunnel per hub".to_owned(),
                n => format!("at most {n} tunnels"),
            },
            config.upstream.address
        ));
    }
    lines.extend(
        crate::route::describe(config)
            .into_iter()
            .map(|l| format!("  {l}")),
    );
    if let Ok(Some(bootstrap)) = crate::xds::Bootstrap::find(&config.xds) {
        lines.push(format!(
            "  xds       {} from {} (bootstrap {}); Listener {}; unrouted calls {}",
            if config.routes.is_empty() {
                "every call routed"
            } else {
                "calls no route takes routed"
            },
            bootstrap.server_uri(),
            bootstrap.origin(),
            config.xds.listener.as_ref().map_or_else(
                || "by each call's :authority".to_owned(),
                |l| format!("{l:?}")
            ),
            match config.xds.fallback {
                crate::config::XdsFallback::None => "fail UNAVAILABLE",
                crate::config::XdsFallback::Upstream => "go to [upstream]",
            }
        ));
    }
    lines
}
