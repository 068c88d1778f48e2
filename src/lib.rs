//! sluice: a sidecar L7 proxy for HTTP/2 gRPC traffic.
//!
//! The binary is a thin shell over this library: [`run`] binds the
//! listeners, starts serving on the current tokio runtime and returns a
//! [`Running`] handle; the integration tests use the same API.
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice::RunError> {
//! let mut config = sluice::Config::embedded();
//! config.server.listen = "127.0.0.1:0".parse().expect("address");
//! let running = sluice::run(&config).await?;
//! println!("listening on {}", running.listen_addr());
//! let report = running.drain().await;
//! println!("drained in {:?}", report.elapsed);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(clippy::print_stdout)]

mod admin;
mod app;
mod balance;
pub mod check;
pub mod config;
mod forward;
mod live;
mod proto;
mod rescue;
pub mod route;
mod server;
mod stack;
mod stats;
pub mod telemetry;
pub mod tls;
mod tunnel;
mod upstream;
mod via;
pub mod xds;

pub use crate::{
    app::{
        ConfigSource, DrainReport, ReloadHandle, RunError, Running, admin_ready, run, run_with,
        serve,
    },
    config::Config,
    stats::Stats,
    tunnel::tracker::Snapshot as AgentTunnels,
};

/// One line per route of `config`, and what happens when none matches: what
/// `sluice check` prints.
pub fn describe_routes(config: &Config) -> Vec<String> {
    route::describe(config)
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
