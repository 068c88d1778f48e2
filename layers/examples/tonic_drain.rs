//! [`DrainLayer`] with tonic's graceful shutdown.
//!
//! tonic's `serve_with_shutdown` (here `serve_with_incoming_shutdown`, for a
//! listener on port 0) stops accepting when its signal future resolves,
//! sends GOAWAY on every connection, and returns once every connection has
//! closed, which it leaves to the calls: a call that never ends keeps the
//! server up forever. The drain handle adds what is missing:
//!
//! 1. tonic's signal is [`Watch::signaled`](sluice_layers::drain::Watch::signaled),
//!    so [`Signal::drain_within`] is what starts the shutdown;
//! 2. [`DrainLayer`] refuses (`UNAVAILABLE`, retryable) the calls that still
//!    arrive on a connection before the client has seen the GOAWAY, and
//!    counts every call let in until its response body ends;
//! 3. [`Signal::drain_within`] waits for those calls for the grace period,
//!    then ends the ones left with `UNAVAILABLE` and this server's text
//!    ([`DrainLayer::expiry_message`]), so that the connections close and
//!    tonic returns.
//!
//! Run with `cargo run -p sluice-layers --example tonic_drain`.

use std::{io, net::SocketAddr, time::Duration};

use sluice_layers::drain::{self, DrainLayer, Signal, error::DrainTimedOut};
use sluice_testkit::{Echo, Probe, Req, pb::echo_server::EchoServer};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

/// The `grpc-message` of a call cut off at the end of the grace period.
pub const EXPIRY_MESSAGE: &str = "the example server is shutting down: drain deadline reached";

/// A running example server.
#[derive(Debug)]
pub struct Running {
    /// Where it listens (127.0.0.1, a port of the system's choosing).
    pub addr: SocketAddr,
    /// What the echo service behind the layer saw.
    pub probe: Probe,
    /// Starts the drain (a process calls it on SIGTERM).
    pub signal: Signal,
    /// The server: it ends once every connection has closed.
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Starts the echo service behind a [`DrainLayer`] on 127.0.0.1:0, with
/// tonic's graceful shutdown tied to the drain.
///
/// # Errors
///
/// When the listener cannot be bound.
pub async fn serve() -> io::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let probe = Probe::default();
    let (signal, watch) = drain::channel();
    // tonic's shutdown begins with the drain. The guard `signaled` returns
    // is dropped at once: tonic itself waits for its connections.
    let shutdown = {
        let watch = watch.clone();
        async move {
            drop(watch.signaled().await);
        }
    };
    let task = tokio::spawn(
        Server::builder()
            .layer(DrainLayer::new(watch).expiry_message(EXPIRY_MESSAGE))
            .add_service(EchoServer::new(Echo::new(probe.clone())))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
    );
    Ok(Running {
        addr,
        probe,
        signal,
        task,
    })
}

/// What the example saw.
#[derive(Debug)]
pub struct Seen {
    /// The drain's result: the calls still open at the deadline.
    pub drained: Result<(), DrainTimedOut>,
    /// The call that finished during the drain.
    pub finished: Result<u64, tonic::Status>,
    /// The stream that was still open at the deadline.
    pub cut_off: tonic::Status,
}

/// The example: two calls in flight when the drain begins; one finishes
/// within the grace period, one never would and is cut off, and then the
/// server ends.
///
/// # Errors
///
/// When the server cannot start, or a call cannot.
pub async fn run(grace: Duration) -> Result<Seen, Box<dyn std::error::Error + Send + Sync>> {
    let server = serve().await?;
    let client = sluice_testkit::client(server.addr);

    // A unary call that takes a tenth of a second...
    let finishing = tokio::spawn({
        let mut client = client.clone();
        async move {
            let reply = client
                .unary(Req {
                    delay_ms: 100,
                    seq: 7,
                    ..Req::default()
                })
                .await?;
            Ok::<_, tonic::Status>(reply.into_inner().seq)
        }
    });
    // ...and a stream that sends headers and then nothing, ever.
    let mut hanging = client
        .clone()
        .server_stream(Req {
            headers_then_hang: true,
            ..Req::default()
        })
        .await?
        .into_inner();
    server
        .probe
        .wait_for(Duration::from_secs(10), |c| c.started == 2)
        .await;

    // SIGTERM, say.
    let drained = server.signal.drain_within(grace).await;
    let cut_off = hanging
        .message()
        .await
        .expect_err("the open stream is ended by the drain deadline");
    let finished = finishing.await?;
    server.task.await??;
    Ok(Seen {
        drained,
        finished,
        cut_off,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let seen = run(Duration::from_secs(1)).await?;
    println!("the call that finished in time: {:?}", seen.finished);
    println!(
        "the stream open at the deadline: {:?}: {}",
        seen.cut_off.code(),
        seen.cut_off.message()
    );
    println!("the drain: {:?}; the server has ended", seen.drained);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tonic_server_drains_in_flight_calls_and_ends_at_the_deadline() {
        // Grace: long beside the 100 ms call, short for a test.
        let seen = tokio::time::timeout(Duration::from_secs(20), run(Duration::from_secs(2)))
            .await
            .expect("the server ended: it did not wait for the hanging stream")
            .expect("the example runs");
        assert_eq!(seen.finished.expect("a call in flight finishes"), 7);
        assert_eq!(seen.cut_off.code(), tonic::Code::Unavailable);
        assert_eq!(seen.cut_off.message(), EXPIRY_MESSAGE);
        let timed_out = seen
            .drained
            .expect_err("one stream was open at the deadline");
        assert_eq!(timed_out.in_flight(), 1);
    }
}
