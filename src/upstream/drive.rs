//! The task that drives one upstream connection: keepalive PINGs while
//! calls are in flight, an idle close, and the first PING that proves the
//! peer took the connection.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    task::Context,
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::{
    proto::batch::{BatchIo, Flushed},
    proto::transport::Stream,
};

/// Drives an upstream connection, pinging it every `interval` while calls
/// are in flight; a PING unanswered within `timeout` means the upstream is
/// gone (a dead host, a silent network drop), and the connection is
/// dropped so its calls fail with UNAVAILABLE instead of hanging.
pub(super) async fn drive(
    connection: Flushed<h2::client::Connection<BatchIo<Stream>, Bytes>, Stream>,
    (interval, timeout, ping_idle): (Duration, Duration, bool),
    idle_timeout: Duration,
    in_flight: &AtomicUsize,
    name: &str,
    evict: impl Fn(),
    verified: Option<(tokio::sync::oneshot::Sender<Result<(), String>>, Duration)>,
) -> Result<(), h2::Error> {
    tokio::pin!(connection);
    let mut pinger = connection.as_mut().get_pin_mut().ping_pong();
    // Drives the connection; while no call is on it, h2's buffers are
    // given back after each poll.
    let mut poll_connection = |cx: &mut Context<'_>| {
        let polled = connection.as_mut().poll(cx);
        if polled.is_pending() && in_flight.load(Ordering::Relaxed) == 0 {
            connection.as_mut().get_pin_mut().shrink_buffers();
        }
        polled
    };
    if let (Some((tx, within)), Some(p)) = (verified, pinger.as_mut()) {
        tokio::select! {
            result = std::future::poll_fn(&mut poll_connection) => {
                let reason = match &result {
                    Ok(()) => "the upstream closed the connection at once".to_owned(),
                    Err(e) => format!("the upstream refused the connection: {e}"),
                };
                let _ = tx.send(Err(reason));
                return result;
            }
            pong = tokio::time::timeout(within, p.ping(h2::Ping::opaque())) => match pong {
                Ok(Ok(_)) => {
                    if tx.send(Ok(())).is_err() {
                        // The dial gave up meanwhile.
                        return Ok(());
                    }
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(format!("the upstream refused the connection: {e}")));
                    return Err(e);
                }
                Err(_) => {
                    let _ = tx.send(Err(format!("no answer to the first PING within {within:?}")));
                    return Ok(());
                }
            },
        }
    }
    let mut next = Instant::now() + interval;
    // Idle when no call was in flight at two checks `idle_timeout` apart:
    // then the pool lets go of the connection, and h2 closes it (GOAWAY)
    // once the last handle is gone.
    let mut idle_check = Instant::now() + idle_timeout;
    let mut was_idle = false;
    let mut evicted = false;
    loop {
        tokio::select! {
            result = std::future::poll_fn(&mut poll_connection) => return result,
            () = tokio::time::sleep_until(idle_check), if !evicted => {
                idle_check = Instant::now() + idle_timeout;
                let idle = in_flight.load(Ordering::Relaxed) == 0;
                if idle && was_idle {
                    debug!(upstream = %name, "upstream connection idle; closing");
                    evict();
                    evicted = true;
                }
                was_idle = idle;
            }
            () = tokio::time::sleep_until(next), if pinger.is_some() => {
                next = Instant::now() + interval;
                if in_flight.load(Ordering::Relaxed) == 0 && !ping_idle {
                    continue;
                }
                let Some(pinger) = pinger.as_mut() else { continue };
                let pong = tokio::time::timeout(timeout, pinger.ping(h2::Ping::opaque()));
                tokio::select! {
                    result = std::future::poll_fn(&mut poll_connection) => return result,
                    answered = pong => match answered {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            warn!(upstream = %name, ?timeout, "upstream did not answer PING; dropping the connection");
                            return Ok(());
                        }
                    },
                }
            }
        }
    }
}
