//! TLS to an upstream group: its CA bundle (or the Mozilla roots), the
//! name its certificates must carry, and an optional client certificate.

use std::{io, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    ALPN_H2, TlsError, provider, read_certs, read_key, read_roots, reload::Reloadable, versions,
};
use crate::config::UpstreamTlsConfig;

/// Builds the rustls configuration `config` describes, reading its files.
pub(crate) fn build(config: &UpstreamTlsConfig) -> Result<ClientConfig, TlsError> {
    let roots = match &config.ca {
        Some(ca) => read_roots(ca)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions())
        .map_err(|source| TlsError::Config {
            what: "upstream tls".to_owned(),
            source,
        })?
        .with_root_certificates(roots);
    let mut client = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|source| TlsError::Config {
                what: format!("upstream tls: {} with {}", cert.display(), key.display()),
                source,
            })?,
        _ => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(client)
}

/// TLS to the endpoints of one group.
#[derive(Debug)]
pub(crate) struct ClientTls {
    material: Arc<Reloadable<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// `name` is the config key (`upstream.tls`, `upstreams.NAME.tls`).
    pub(crate) fn new(name: String, config: &UpstreamTlsConfig) -> Result<Self, TlsError> {
        let paths = [&config.ca, &config.cert, &config.key]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let owned = config.clone();
        let material = Reloadable::new(name, paths, move || build(&owned))?;
        let server_name = config
            .server_name
            .as_deref()
            .and_then(|n| ServerName::try_from(n.to_owned()).ok());
        Ok(Self {
            material: Arc::new(material),
            server_name,
        })
    }

    /// The material, for the reloader.
    pub(crate) fn material(&self) -> Arc<Reloadable<ClientConfig>> {
        self.material.clone()
    }

    /// Which material new connections use: connections opened with an
    /// older one are replaced once idle.
    pub(crate) fn generation(&self) -> u64 {
        self.material.generation()
    }

    /// The handshake over `io` to an endpoint whose address has host
    /// `host` (the name checked unless `server_name` was configured).
    pub(crate) async fn connect<T>(&self, io: T, host: &str) -> io::Result<TlsStream<T>>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        TlsConnector::from(self.material.current())
            .connect(name, io)
            .await
    }
}
