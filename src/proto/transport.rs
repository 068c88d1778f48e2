//! The transports sluice serves and dials: TCP, or a Unix domain socket
//! (a sidecar often talks to its application over one), and on the
//! upstream side either of them with TLS.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
};

/// An open transport.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<Self>>),
    /// The server side of TLS: an agent's tunnel accepted by a hub.
    TlsServer(Box<tokio_rustls::server::TlsStream<Self>>),
}

/// Where to dial: a host (a name or an address) and a port, or a Unix
/// socket path.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target<'a> {
    Tcp { host: &'a str, port: u16 },
    Unix(&'a std::path::Path),
}

impl Stream {
    /// Dials `target` (TCP with `TCP_NODELAY`, or a Unix socket path).
    pub(crate) async fn connect(target: Target<'_>) -> io::Result<Self> {
        let (host, port) = match target {
            Target::Unix(path) => return UnixStream::connect(path).await.map(Self::Unix),
            Target::Tcp { host, port } => (host, port),
        };
        let tcp = TcpStream::connect((host, port)).await?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an upstream connection");
        }
        Ok(Self::Tcp(tcp))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Self::TlsServer(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Self::TlsServer(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::TlsServer(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
            Self::TlsServer(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
            Self::TlsServer(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Self::TlsServer(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A bound listener: TCP, or a Unix domain socket.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// The next connection, with the peer's address (none over a Unix
    /// socket). TCP connections get `TCP_NODELAY`.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, Option<std::net::SocketAddr>)> {
        match self {
            Self::Tcp(l) => {
                let (tcp, peer) = l.accept().await?;
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                Ok((Stream::Tcp(tcp), Some(peer)))
            }
            Self::Unix(l) => {
                let (unix, _) = l.accept().await?;
                Ok((Stream::Unix(unix), None))
            }
        }
    }

    /// Binds a Unix socket at `path`, replacing a socket file left there
    /// (by a sluice that stopped, or the one this replaces); any other
    /// kind of file there is an error.
    pub(crate) fn bind_unix(path: &std::path::Path) -> io::Result<Self> {
        #[cfg(unix)]
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ));
            }
            std::fs::remove_file(path)?;
        }
        tokio::net::UnixListener::bind(path).map(Self::Unix)
    }
}
