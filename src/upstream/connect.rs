//! How an upstream endpoint is dialled: the [`Connector`].

use std::sync::{Arc, Mutex};

use crate::{
    config::HostPort,
    proto::transport::{Stream, Target},
    tls::client::ClientTls,
};

/// How one endpoint is dialled: plaintext, or TLS with its group's
/// material and the name its certificate must carry.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connector {
    tls: Option<(Arc<ClientTls>, Arc<str>)>,
    /// A tunnel an agent dialled in: the one connection this endpoint
    /// will ever have, taken by the first dial.
    tunnel: Option<Arc<Mutex<Option<Stream>>>>,
}

/// Why a dial failed: the text goes to the client in `grpc-message`.
#[derive(Debug)]
pub(crate) struct ConnectError(pub(crate) String);

impl Connector {
    /// TLS with `tls`, checking `host` (the endpoint's configured host, not
    /// the address it resolved to) unless the group names a server.
    pub(crate) fn tls(tls: Arc<ClientTls>, host: &str) -> Self {
        Self {
            tls: Some((tls, Arc::from(host))),
            tunnel: None,
        }
    }

    /// The connection an agent opened (after its tunnel handshake).
    pub(crate) fn tunnel(stream: Stream) -> Self {
        Self {
            tls: None,
            tunnel: Some(Arc::new(Mutex::new(Some(stream)))),
        }
    }

    /// Whether a new connection must answer a PING before it counts as
    /// open: over TLS (an upstream may refuse sluice's certificate only
    /// after the handshake) and over a tunnel (an agent closes a duplicate
    /// tunnel without serving it).
    pub(crate) fn verifies(&self) -> bool {
        self.tls.is_some() || self.tunnel.is_some()
    }

    /// Whether this is an agent's tunnel.
    pub(crate) fn is_tunnel(&self) -> bool {
        self.tunnel.is_some()
    }

    /// The material generation a connection dialled now is opened with (0
    /// for plaintext, which never changes).
    pub(crate) fn generation(&self) -> u64 {
        self.tls.as_ref().map_or(0, |(tls, _)| tls.generation())
    }

    /// Dials `target` and, for TLS, runs the handshake (ALPN `h2`).
    pub(crate) async fn connect(&self, target: &HostPort) -> Result<Stream, ConnectError> {
        if let Some(tunnel) = &self.tunnel {
            return tunnel
                .lock()
                .expect("tunnel lock")
                .take()
                .ok_or_else(|| ConnectError("the agent's tunnel is gone".to_owned()));
        }
        let plain = Stream::connect(transport_target(target))
            .await
            .map_err(|e| ConnectError(e.to_string()))?;
        let Some((tls, host)) = &self.tls else {
            return Ok(plain);
        };
        match tls.connect(plain, host).await {
            Ok(s) => Ok(Stream::Tls(Box::new(s))),
            Err(e) => Err(ConnectError(format!("TLS handshake failed: {e}"))),
        }
    }
}

/// Where the transport dials for `address`: the transports take hosts,
/// ports and paths, not config types.
pub(crate) fn transport_target(address: &HostPort) -> Target<'_> {
    match address.unix_path() {
        Some(path) => Target::Unix(path),
        None => Target::Tcp {
            host: address.host(),
            port: address.port(),
        },
    }
}
