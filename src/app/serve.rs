//! The process around a [`Running`](super::Running) sluice, as the binary
//! runs it: signals (SIGHUP reloads, SIGTERM and SIGINT drain, a second
//! one exits), the log line with the bound addresses; and `sluice
//! health`'s question to the admin port.

use std::{net::SocketAddr, time::Duration};

use tracing::{info, warn};

use super::{ConfigSource, RunError, run_with};
use crate::Config;

/// Runs sluice as the binary does until a shutdown signal (SIGTERM,
/// SIGINT) or `POST /drain`, then drains: [`run_with`], SIGHUP reloading
/// the config file (`source`) and TLS material, the log line with the
/// bound addresses, and the drain. A second signal during the drain exits
/// at once.
///
/// # Errors
///
/// What [`run_with`] says.
pub async fn serve(config: Config, source: Option<ConfigSource>) -> Result<(), RunError> {
    let running = run_with(&config, source).await?;
    // Before the address is logged: a harness that reads the line and
    // sends SIGHUP must find the handler in place.
    #[cfg(unix)]
    {
        let reload = running.reload_handle();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        info!("SIGHUP: reloading the config and TLS material");
                        reload.reload();
                    }
                });
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGHUP; TLS files are still polled"),
        }
    }
    let admin = running
        .admin_addr()
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let tls = match running.tls_addr() {
        Some(a) if a == running.listen_addr() => " (TLS)".to_owned(),
        Some(a) => format!(" (h2c) and {a} (TLS)"),
        None => " (h2c)".to_owned(),
    };
    if let Some(addr) = running.tunnel_addr() {
        info!(%addr, "tunnel hub: agents dial {addr}");
    }
    info!(
        listen = %running.listen_addr(),
        upstream = %config.upstream.address,
        admin = %admin,
        "sluice listening on {}{tls}, forwarding to {}, admin on {admin}",
        running.listen_addr(),
        config.upstream.address,
    );
    tokio::select! {
        () = shutdown_signal() => info!("shutdown signal received; draining"),
        () = running.drain_requested() => info!("POST /drain received; draining"),
    }
    // A second signal exits at once.
    tokio::spawn(async {
        shutdown_signal().await;
        warn!("second shutdown signal; exiting now");
        std::process::exit(0);
    });
    let report = running.drain().await;
    info!(
        elapsed = ?report.elapsed,
        cut_off = report.cut_off,
        "sluice stopped"
    );
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops sluice");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Asks the admin server at `addr` for `GET /ready` (an unspecified
/// address, `0.0.0.0:15090`, is asked on loopback), with `timeout` for
/// the connect and the answer together: its status and body. What
/// `sluice health` runs; blocking, no runtime needed.
///
/// # Errors
///
/// The I/O error of a connection that fails, times out, or answers
/// something that is not HTTP.
pub fn admin_ready(addr: SocketAddr, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))
    };
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, left()?)?;
    tcp.set_write_timeout(Some(left()?))?;
    tcp.write_all(b"GET /ready HTTP/1.0\r\nhost: sluice\r\n\r\n")?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    // An answer is a few dozen bytes: at most 16 KiB are read.
    while answer.len() < 16 * 1024 {
        tcp.set_read_timeout(Some(left()?))?;
        match tcp.read(&mut chunk)? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer")
        })?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}
