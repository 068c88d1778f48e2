//! The downstream TLS handshake, under the connection's handshake
//! deadline, and the identity of a verified client certificate.

use std::{io, sync::Arc};

use rustls::{ServerConfig, server::WebPkiClientVerifier};
use sluice_layers::identity::PeerIdentity;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    ALPN_H2, TlsError, provider, read_certs, read_key, read_roots, reload::Reloadable, versions,
};
use crate::config::{ClientAuthMode, RoleSource, ServerTlsConfig};

/// The TLS side of a listener: its current material, and where a client
/// certificate's roles are read from.
#[derive(Debug)]
pub(crate) struct ServerTls {
    material: Arc<Reloadable<ServerConfig>>,
    roles: Option<RoleSource>,
}

/// Builds the rustls configuration `config` describes, reading its files.
pub(crate) fn build(config: &ServerTlsConfig) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&config.cert)?;
    let key = read_key(&config.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions())
        .map_err(|source| TlsError::Config {
            what: "server.tls".to_owned(),
            source,
        })?;
    let builder = match &config.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let roots = read_roots(&auth.ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match auth.mode {
                ClientAuthMode::Required => verifier,
                ClientAuthMode::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| TlsError::File {
                path: auth.ca.clone(),
                reason: format!("cannot verify clients with this CA bundle: {e}"),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config {
            what: format!(
                "server.tls: {} with {}",
                config.cert.display(),
                config.key.display()
            ),
            source,
        })?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(server)
}

impl ServerTls {
    /// `name` is the config key (`server.tls`, `tunnel.hub.tls`), for logs
    /// and metrics.
    pub(crate) fn new(name: &str, config: &ServerTlsConfig) -> Result<Self, TlsError> {
        let mut paths = vec![config.cert.clone(), config.key.clone()];
        paths.extend(config.client_auth.iter().map(|a| a.ca.clone()));
        let owned = config.clone();
        let material = Reloadable::new(name.to_owned(), paths, move || build(&owned))?;
        Ok(Self {
            material: Arc::new(material),
            roles: config.client_auth.as_ref().map(|a| a.roles.clone()),
        })
    }

    /// The material, for the reloader.
    pub(crate) fn material(&self) -> Arc<Reloadable<ServerConfig>> {
        self.material.clone()
    }

    /// Runs the handshake on `io` with the current material, giving up at
    /// `deadline`; returns the stream and the client's identity, if it
    /// presented a (verified) certificate.
    pub(crate) async fn accept<T>(
        &self,
        io: T,
        deadline: Instant,
    ) -> io::Result<(TlsStream<T>, Option<PeerIdentity>)>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.material.current());
        let tls = tokio::time::timeout_at(deadline, acceptor.accept(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"))??;
        let identity = match (&self.roles, tls.get_ref().1.peer_certificates()) {
            (Some(roles), Some([leaf, ..])) => Some(super::identity::of(leaf, roles)),
            _ => None,
        };
        Ok((tls, identity))
    }
}
