//! sluice-layers on an axum `Router` that serves gRPC (here tonic's echo
//! service, turned into a `Router` with `Routes::into_axum_router`; a
//! `Router` with REST routes beside it works the same).
//!
//! - [`DeadlineLayer`] enforces each call's `grpc-timeout` on the whole call,
//!   body included, answering `DEADLINE_EXCEEDED` with this server's own
//!   text ([`DeadlineLayer::message`]);
//! - [`EnrichLayer`] adds `x-forwarded-for`, reading the peer from axum's
//!   `ConnectInfo`, which `into_make_service_with_connect_info` puts in
//!   every request ([`EnrichLayer::peer_from`]).
//!
//! Run with `cargo run -p sluice-layers --example axum_router`.

use std::{future::IntoFuture, io, net::SocketAddr, time::Duration};

use axum::extract::ConnectInfo;
use sluice_layers::{deadline::DeadlineLayer, enrich::EnrichLayer};
use sluice_testkit::{Echo, Probe, Req, pb::echo_server::EchoServer};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// The `grpc-message` of a call this server's deadline ended.
pub const DEADLINE_MESSAGE: &str = "deadline exceeded (grpc-timeout) at the example router";

/// A running example server.
#[derive(Debug)]
pub struct Running {
    /// Where it listens (127.0.0.1, a port of the system's choosing).
    pub addr: SocketAddr,
    /// What the echo service behind the layers saw.
    pub probe: Probe,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

/// The router: the echo service, with the layers around it.
pub fn router(probe: Probe) -> axum::Router {
    tonic::service::Routes::new(EchoServer::new(Echo::new(probe)))
        .into_axum_router()
        .layer(
            EnrichLayer::new()
                .x_forwarded_for()
                .peer_from(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)),
        )
        .layer(DeadlineLayer::new().message(DEADLINE_MESSAGE))
}

/// Serves [`router`] with `axum::serve` on 127.0.0.1:0.
///
/// # Errors
///
/// When the listener cannot be bound.
pub async fn serve() -> io::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let probe = Probe::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let app = router(probe.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async {
        let _ = stopped.await;
    });
    let task = tokio::spawn(server.into_future());
    Ok(Running {
        addr,
        probe,
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
    pub async fn stop(self) -> io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.expect("the server task does not panic")
    }
}

/// What the example's two calls saw.
#[derive(Debug)]
pub struct Seen {
    /// The `x-forwarded-for` the echo service received.
    pub forwarded_for: String,
    /// The status of a streaming call whose `grpc-timeout` (50 ms) ran out
    /// while the service sent nothing.
    pub late: tonic::Status,
}

/// The example: a call that goes through, and one the deadline ends.
///
/// # Errors
///
/// When the server cannot start, or the first call fails.
pub async fn run() -> Result<Seen, Box<dyn std::error::Error + Send + Sync>> {
    let server = serve().await?;
    let mut client = sluice_testkit::client(server.addr);
    client
        .unary(Req {
            payload: "hello".into(),
            ..Req::default()
        })
        .await?;
    let seen = server
        .probe
        .last_metadata()
        .expect("the call reached the service");
    let forwarded_for = seen
        .get("x-forwarded-for")
        .expect("enrich added the peer")
        .to_str()?
        .to_owned();

    // A stream whose headers come at once and whose messages never do: a
    // client's own timer covers only the wait for headers, the layer's
    // covers the body too.
    let mut hanging = tonic::Request::new(Req {
        headers_then_hang: true,
        ..Req::default()
    });
    hanging.set_timeout(Duration::from_millis(50));
    let mut stream = client.server_stream(hanging).await?.into_inner();
    let late = stream
        .message()
        .await
        .expect_err("the deadline ends the stream");
    server.stop().await?;
    Ok(Seen {
        forwarded_for,
        late,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let seen = run().await?;
    println!("the upstream saw x-forwarded-for: {}", seen.forwarded_for);
    println!(
        "a call past its deadline got {:?}: {}",
        seen.late.code(),
        seen.late.message()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_example_runs_with_layers_on_an_axum_router() {
        let seen = tokio::time::timeout(Duration::from_secs(10), run())
            .await
            .expect("in time")
            .expect("the example runs");
        assert_eq!(seen.forwarded_for, "127.0.0.1");
        assert_eq!(seen.late.code(), tonic::Code::DeadlineExceeded);
        // The layer's answer: tonic's handler has no deadline of its own
        // under axum, and the client's covers only the response headers.
        assert_eq!(seen.late.message(), DEADLINE_MESSAGE);
    }
}
