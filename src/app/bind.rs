//! Binding the listeners: the proxy and TLS ports (shared with
//! `SO_REUSEPORT` during a restart, and a warning when another process is
//! found on them), the Unix socket, the tunnel hub's port, and the admin
//! port (which falls back to a free port when the default is taken).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tracing::warn;

use super::RunError;
use crate::config;

/// Listen backlog of the proxy port.
const LISTEN_BACKLOG: u32 = 1024;

pub(super) fn bind(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, RunError> {
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
pub(super) async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, RunError> {
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

pub(super) fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, RunError> {
    listener
        .local_addr()
        .map_err(|source| RunError::Bind { addr, source })
}
