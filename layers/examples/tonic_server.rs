//! sluice-layers inside a tonic server: `Server::builder().layer(…)`.
//!
//! Two layers need something from the server, because a layer never sees a
//! socket, and tonic gives both through one hook, the `ConnectInfo` of its
//! IO type, which it puts in the extensions of every request of the
//! connection:
//!
//! - [`EnrichLayer`] adds `x-forwarded-for` from the peer address
//!   ([`EnrichLayer::peer_from`] reads it from that `ConnectInfo`);
//! - [`PeekLayer`]'s per-connection budget is a [`ConnectionBudget`] made
//!   per accepted connection and carried in that `ConnectInfo`
//!   ([`PeekLayer::budget_from`]). tonic clones the service stack for
//!   every request, so a budget kept in the service would be per call.
//!
//! With tonic's default TCP listener the `ConnectInfo` is
//! `TcpConnectInfo`, and `peer_from(|ext| ext.get::<TcpConnectInfo>()?.remote_addr())`
//! is all enrich needs; the per-connection budget needs the few lines of
//! [`Conn`] below. Run with `cargo run -p sluice-layers --example tonic_server`.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use sluice_layers::{
    enrich::EnrichLayer,
    peek::{ConnectionBudget, PeekLayer},
};
use sluice_testkit::{Echo, Probe, Req, pb::echo_server::EchoServer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::transport::{
    Server,
    server::{Connected, TcpConnectInfo},
};

/// One accepted connection: the socket, and the peek budget that all the
/// calls of this connection share.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    budget: ConnectionBudget,
}

/// What tonic puts in each request's extensions for a [`Conn`].
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The addresses, as tonic's own listener would give them.
    pub tcp: TcpConnectInfo,
    /// The connection's peek budget.
    pub budget: ConnectionBudget,
}

/// A running example server.
#[derive(Debug)]
pub struct Running {
    /// Where it listens (127.0.0.1, a port of the system's choosing).
    pub addr: SocketAddr,
    /// What the echo service behind the layers saw.
    pub probe: Probe,
    /// The budget of every connection accepted so far, in order.
    pub budgets: Arc<Mutex<Vec<ConnectionBudget>>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Starts the echo service behind `peek` and an enrich layer, on tonic, on
/// 127.0.0.1:0.
///
/// # Errors
///
/// When the listener cannot be bound.
pub async fn serve(peek: PeekLayer) -> io::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let probe = Probe::default();
    let budgets = Arc::new(Mutex::new(Vec::new()));
    let seen = budgets.clone();
    // A budget per accepted connection, carried by the IO type.
    let incoming = TcpListenerStream::new(listener).map(move |io| {
        let budget = ConnectionBudget::new();
        seen.lock().expect("budgets lock").push(budget.clone());
        io.map(|io| Conn { io, budget })
    });
    let layers = tower::ServiceBuilder::new()
        .layer(
            EnrichLayer::new()
                .x_forwarded_for()
                .peer_from(|ext| ext.get::<ConnInfo>()?.tcp.remote_addr()),
        )
        .layer(peek.budget_from(|ext| ext.get::<ConnInfo>().map(|c| c.budget.clone())));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        Server::builder()
            .layer(layers)
            .add_service(EchoServer::new(Echo::new(probe.clone())))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    Ok(Running {
        addr,
        probe,
        budgets,
        stop,
        task,
    })
}

impl Running {
    /// Stops the server and waits for it to end.
    ///
    /// # Errors
    ///
    /// The server's own error, if it failed.
    pub async fn stop(self) -> Result<(), tonic::transport::Error> {
        let _ = self.stop.send(());
        self.task.await.expect("the server task does not panic")
    }
}

/// The example: one call, whose upstream sees the client's address.
///
/// # Errors
///
/// When the server cannot start or the call fails.
pub async fn run() -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let server = serve(PeekLayer::new()).await?;
    let mut client = sluice_testkit::client(server.addr);
    let reply = client
        .unary(Req {
            payload: "hello".into(),
            ..Req::default()
        })
        .await?
        .into_inner();
    assert_eq!(&reply.payload[..], b"hello");
    let seen = server
        .probe
        .last_metadata()
        .expect("the call reached the service");
    let forwarded_for = seen
        .get("x-forwarded-for")
        .expect("enrich added the peer")
        .to_str()?
        .to_owned();
    server.stop().await?;
    Ok(forwarded_for)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let forwarded_for = run().await?;
    println!("the upstream saw x-forwarded-for: {forwarded_for}");
    Ok(())
}

// === impl Conn ===

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.io.connect_info(),
            budget: self.budget.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_testkit::Req;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    /// Every wait in these tests ends by this bound.
    const LIMIT: Duration = Duration::from_secs(10);

    /// A request message whose encoding (prefix included) is 107 bytes.
    fn big() -> Req {
        Req {
            payload: vec![b'x'; 100].into(),
            ..Req::default()
        }
    }

    #[tokio::test]
    async fn the_example_runs_and_the_upstream_sees_the_peer() {
        let forwarded_for = tokio::time::timeout(LIMIT, run())
            .await
            .expect("in time")
            .expect("the example runs");
        assert_eq!(forwarded_for, "127.0.0.1");
    }

    #[tokio::test]
    async fn the_calls_of_one_tonic_connection_share_one_peek_budget() {
        // Two messages peeked per call; 200 bytes per connection: one call
        // holding one 107-byte message fits, two do not.
        let server = serve(
            PeekLayer::new()
                .max_messages(2)
                .max_bytes_per_connection(200),
        )
        .await
        .expect("server");
        let client = sluice_testkit::client(server.addr);

        // Call 1 sends one message and waits: the peek holds its bytes.
        let (tx1, rx1) = mpsc::channel(2);
        tx1.send(big()).await.expect("queued");
        let first = tokio::spawn({
            let mut client = client.clone();
            async move { client.client_stream(ReceiverStream::new(rx1)).await }
        });
        let budget = tokio::time::timeout(LIMIT, async {
            loop {
                let conn = server.budgets.lock().expect("lock").first().cloned();
                match conn {
                    Some(b) if b.held() > 0 => return b,
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await
        .expect("call 1's first message is held by the peek");
        assert_eq!(budget.held(), 107);

        // Call 2, same connection (tonic: a fresh clone of the stack): its
        // message does not fit beside call 1's.
        let second = tokio::time::timeout(
            LIMIT,
            client
                .clone()
                .client_stream(tokio_stream::iter(vec![big()])),
        )
        .await
        .expect("call 2 is answered");
        let status = second.expect_err("over the connection's budget");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);

        // A call on another connection has a budget of its own.
        let mut other = sluice_testkit::client(server.addr);
        let third =
            tokio::time::timeout(LIMIT, other.client_stream(tokio_stream::iter(vec![big()])))
                .await
                .expect("call 3 is answered")
                .expect("another connection's budget is its own");
        assert_eq!(third.into_inner().seq, 1);
        assert_eq!(server.budgets.lock().expect("lock").len(), 2);

        // Call 1 completes (its second message, 8 bytes, fits beside its
        // first), and gives its bytes back.
        let small = Req {
            payload: "x".into(),
            ..Req::default()
        };
        tx1.send(small).await.expect("queued");
        drop(tx1);
        let first = tokio::time::timeout(LIMIT, first)
            .await
            .expect("call 1 ends")
            .expect("joined")
            .expect("call 1 is served");
        assert_eq!(first.into_inner().seq, 2);
        assert_eq!(budget.held(), 0);
        tokio::time::timeout(LIMIT, server.stop())
            .await
            .expect("the server stops")
            .expect("cleanly");
    }
}
