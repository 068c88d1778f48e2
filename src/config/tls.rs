//! The TLS settings: `[server.tls]` (the downstream listener, with client
//! certificates), `tls = { … }` of an upstream group, `[tls]` (reloading)
//! and a route's `identity` requirement.
//!
//! Paths given relative are relative to the config file's directory.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, value};

/// How often certificate, key and CA files are checked for changes: 5 s.
/// A Kubernetes secret update takes up to a minute to reach a pod, so a
/// few seconds more is nothing; SIGHUP reloads at once.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The metadata key a verified client identity goes under by default (as
/// linkerd's `l5d-client-id`).
pub const DEFAULT_CLIENT_ID_KEY: &str = "x-sluice-client-id";

/// `[tls]`: what applies to every piece of TLS material.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// How often the files are checked for changes (their size, time and
    /// inode); a change is read, parsed and swapped in whole, or, if it
    /// does not parse, logged and ignored.
    #[serde(with = "value::duration")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            reload_interval: DEFAULT_RELOAD_INTERVAL,
        }
    }
}

/// `[server.tls]`: TLS on the downstream side. ALPN `h2` only; TLS 1.2 and
/// 1.3.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// Where the TLS listener listens. Unset, `server.listen` itself speaks
    /// TLS (TLS only); set, `server.listen` stays h2c beside it.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Client certificates: verified against a CA bundle when given.
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
}

/// `client_auth = { … }` of `[server.tls]`: mutual TLS.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// The CA bundle (PEM) client certificates must chain to.
    pub ca: PathBuf,
    /// `required` (a client without a valid certificate fails the
    /// handshake) or `optional` (it is served, without an identity).
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Where a certificate's roles are read from: `organization` (Talos),
    /// `organizational-unit`, or `oid:1.2.3…` (the string values of that
    /// subject attribute or extension).
    #[serde(default)]
    pub roles: RoleSource,
}

/// Whether a client certificate is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// No valid certificate, no connection.
    #[default]
    Required,
    /// No certificate: served, without an identity. An invalid one still
    /// fails the handshake.
    Optional,
}

/// Where roles come from in a client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RoleSource {
    /// The subject's O values.
    #[default]
    Organization,
    /// The subject's OU values.
    OrganizationalUnit,
    /// A subject attribute or extension, by OID (dotted).
    Oid(String),
}

impl<'de> Deserialize<'de> for RoleSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "organization" => Ok(Self::Organization),
            "organizational-unit" => Ok(Self::OrganizationalUnit),
            _ => match s.strip_prefix("oid:") {
                Some(oid)
                    if !oid.is_empty()
                        && oid.split('.').all(|arc| {
                            !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit())
                        }) =>
                {
                    Ok(Self::Oid(oid.to_owned()))
                }
                _ => Err(serde::de::Error::custom(format!(
                    "{s:?}: expected \"organization\", \"organizational-unit\" or \"oid:1.2.3\""
                ))),
            },
        }
    }
}

/// `tls = { … }` of `[upstream]` or a group: TLS to the upstream, ALPN `h2`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The CA bundle (PEM) the upstream's certificate must chain to;
    /// without one, the Mozilla roots (`webpki-roots`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name the upstream's certificate must carry; without one, the
    /// host of each endpoint's address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// A client certificate chain (PEM), for an upstream that asks for one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// `identity = { … }` of a route: which verified clients may make the
/// calls it matches. Every condition given must hold; a call that fails
/// them is refused with PERMISSION_DENIED.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The SPIFFE trust domain the client's id must be in.
    #[serde(default)]
    pub spiffe_trust_domain: Option<String>,
    /// Client ids accepted (any of them).
    #[serde(default)]
    pub exact: Vec<String>,
    /// A prefix the client id must start with.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Roles accepted (any of them).
    #[serde(default)]
    pub roles: Vec<String>,
}

impl IdentityConfig {
    /// The rule the layers apply.
    pub fn rule(&self) -> sluice_layers::identity::IdentityRule {
        let mut rule = sluice_layers::identity::IdentityRule::new();
        if let Some(d) = &self.spiffe_trust_domain {
            rule = rule.trust_domain(d.clone());
        }
        for e in &self.exact {
            rule = rule.exact(e.clone());
        }
        if let Some(p) = &self.prefix {
            rule = rule.prefix(p.clone());
        }
        for r in &self.roles {
            rule = rule.role(r.clone());
        }
        rule
    }
}

/// Makes `path` relative to `base` unless it is absolute.
pub(super) fn resolve(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

impl ServerTlsConfig {
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.cert, base);
        resolve(&mut self.key, base);
        if let Some(c) = &mut self.client_auth {
            resolve(&mut c.ca, base);
        }
    }
}

impl UpstreamTlsConfig {
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .flatten()
        {
            resolve(p, base);
        }
    }
}

impl super::Config {
    /// What the TLS settings need of each other: cert and key together, a
    /// server name that is one, identities only where they are verified.
    pub(super) fn check_tls(&self, text: &str) -> Result<(), ConfigError> {
        let verifies_clients = self
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_auth.is_some());
        for (i, route) in self.routes.iter().enumerate() {
            if route.identity.is_some() && !verifies_clients {
                return Err(ConfigError::at_key(
                    text,
                    format!("routes[{i}].identity"),
                    "a route can require identities only when [server.tls] has client_auth (nothing verifies them otherwise)".to_owned(),
                ));
            }
        }
        if let Some(tls) = &self.server.tls
            && tls.listen == Some(self.server.listen)
        {
            return Err(ConfigError::at_key(
                text,
                "server.tls.listen".to_owned(),
                "the same address as server.listen; leave it out to serve TLS only on server.listen".to_owned(),
            ));
        }
        if let Some(key) = self.client_id_key()
            && http::HeaderName::try_from(key.to_ascii_lowercase()).is_err()
        {
            return Err(ConfigError::at_key(
                text,
                "enrich.client_id".to_owned(),
                format!("{key:?} is not a valid metadata key (a lowercase HTTP header name)"),
            ));
        }
        let upstreams = std::iter::once(("upstream".to_owned(), self.upstream.tls.as_ref())).chain(
            self.upstreams
                .iter()
                .map(|(name, g)| (format!("upstreams.{name}"), g.tls.as_ref())),
        );
        for (at, tls) in upstreams {
            let Some(tls) = tls else { continue };
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(ConfigError::at_key(
                    text,
                    format!("{at}.tls"),
                    "a client certificate needs both `cert` and `key`".to_owned(),
                ));
            }
            if let Some(name) = &tls.server_name
                && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return Err(ConfigError::at_key(
                    text,
                    format!("{at}.tls.server_name"),
                    format!("{name:?} is not a DNS name or an IP address"),
                ));
            }
        }
        if self
            .upstream
            .tls
            .as_ref()
            .is_some_and(|t| t.server_name.is_none())
            && self.upstream.address.unix_path().is_some()
        {
            return Err(ConfigError::at_key(
                text,
                "upstream.tls".to_owned(),
                "TLS over a Unix socket needs `server_name` (the path names no host)".to_owned(),
            ));
        }
        for (name, g) in &self.upstreams {
            if g.max_connections == Some(0) {
                return Err(ConfigError::at_key(
                    text,
                    format!("upstreams.{name}.max_connections"),
                    "must be at least 1".to_owned(),
                ));
            }
            if g.tls.as_ref().is_some_and(|t| t.server_name.is_none())
                && g.endpoints
                    .iter()
                    .any(|e| e.address().unix_path().is_some())
            {
                return Err(ConfigError::at_key(
                    text,
                    format!("upstreams.{name}.tls"),
                    "TLS over a Unix socket needs `server_name` (the path names no host)"
                        .to_owned(),
                ));
            }
        }
        Ok(())
    }
}
