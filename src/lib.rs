//! sluice: a sidecar L7 proxy for HTTP/2 gRPC traffic.
//!
//! The binary is a thin shell over this library: [`run`] binds the listener,
//! starts serving on the current tokio runtime and returns a [`Running`]
//! handle; the integration tests use the same API.
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice::RunError> {
//! let mut config = sluice::Config::embedded();
//! config.server.listen = "127.0.0.1:0".parse().expect("address");
//! let running = sluice::run(&config).await?;
//! println!("listening on {}", running.listen_addr());
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(clippy::print_stdout)]

pub mod config;
mod forward;
mod server;
mod stack;
mod stats;
pub mod telemetry;
mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use crate::{config::Config, stats::Stats};
use crate::{stats::Counters, upstream::Pool};

/// How long [`Running::shutdown`] lets in-flight calls finish before it
/// closes their connections. The full drain (deadline from config, UNAVAILABLE
/// trailers at the deadline) builds on this.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running sluice.
#[derive(Debug)]
pub struct Running {
    listen: SocketAddr,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    pool: Pool,
    counters: Arc<Counters>,
}

/// Binds the listener and starts serving on the current tokio runtime.
///
/// # Errors
///
/// [`RunError::Bind`] when the listen address cannot be bound.
pub async fn run(config: &Config) -> Result<Running, RunError> {
    run_with_grace(config, DEFAULT_SHUTDOWN_GRACE).await
}

async fn run_with_grace(config: &Config, grace: Duration) -> Result<Running, RunError> {
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })?;
    let listen = listener
        .local_addr()
        .map_err(|source| RunError::Bind { addr, source })?;
    let counters = Arc::new(Counters::default());
    let pool = Pool::new(config.upstream.clone(), counters.clone());
    let stack = stack::build(pool.clone(), counters.clone());
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(server::serve(
        listener,
        server::http2_builder(&config.server),
        server::Handler::new(stack),
        stopped,
        grace,
        counters.clone(),
    ));
    Ok(Running {
        listen,
        stop,
        server,
        pool,
        counters,
    })
}

impl Running {
    /// The address the listener is bound to (the real port when the config
    /// said port 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// What sluice holds open right now.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Stops: no new connections, GOAWAY to every connection, in-flight
    /// calls finish for up to [`DEFAULT_SHUTDOWN_GRACE`]; then upstream
    /// connections close once idle.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.pool.close();
    }
}

/// Builds the tokio runtime the config asks for: a current-thread runtime
/// for one worker, a multi-thread one otherwise.
///
/// # Errors
///
/// The I/O error of creating the runtime.
pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match config.runtime.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().thread_name("sluice").build()
}
