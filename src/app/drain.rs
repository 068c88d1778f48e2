//! The drain of a running sluice, step by step (see [`Running::drain`]).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{DrainReport, Running};

/// After the drain deadline, how long connections get to deliver the
/// UNAVAILABLE trailers of the calls that were cut off before they are
/// closed outright: a peer that does not read must not hold sluice up.
const FLUSH_AFTER_DEADLINE: Duration = Duration::from_millis(500);
/// How often a drain under way logs what is still open.
const DRAIN_PROGRESS: Duration = Duration::from_secs(5);
/// How long closing upstream connections may take once every call is done.
const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_millis(500);

impl Running {
    /// Drains and stops:
    /// 1. `/ready` answers 503 at once; calls are still served for
    ///    `drain.pre_delay`;
    /// 2. a tunnel hub tells its agents to re-home and waits until they
    ///    have (at most 5 s), so that clients that reconnect find them;
    /// 3. the listener closes and every connection gets GOAWAY (in two
    ///    steps); new calls that still arrive are refused with UNAVAILABLE;
    /// 4. calls in flight run until `drain.deadline`; then every call still
    ///    open ends with UNAVAILABLE trailers, and connections that cannot
    ///    take them are closed shortly after;
    /// 5. upstream connections close last.
    ///
    /// Never takes much longer than `pre_delay + deadline + 1 s` (plus the
    /// hand-over's 5 s for a hub), whatever the peers do.
    pub async fn drain(mut self) -> DrainReport {
        let start = Instant::now();
        self.signal.announce();
        if !self.drain.pre_delay.is_zero() {
            info!(delay = ?self.drain.pre_delay, "not ready; serving on until the pre-drain delay ends");
            tokio::time::sleep(self.drain.pre_delay).await;
        }
        if let Some(hand_over) = self.hand_over.take() {
            info!("handing agents over before clients get GOAWAY");
            hand_over.run().await;
        }
        let at_start = self.counters.snapshot();
        info!(
            deadline = ?self.drain.deadline,
            calls = at_start.calls_in_flight,
            connections = at_start.downstream_connections,
            "draining: GOAWAY sent, finishing in-flight calls"
        );
        let mut server_done = false;
        let began = tokio::time::Instant::now();
        let drained = self.signal.drain_within(self.drain.deadline);
        tokio::pin!(drained);
        // A long drain says how it goes: what is still open and how long
        // it may still take.
        let mut progress = tokio::time::interval_at(began + DRAIN_PROGRESS, DRAIN_PROGRESS);
        let outcome = loop {
            tokio::select! {
                outcome = &mut drained => break outcome,
                _ = progress.tick() => {
                    let now = self.counters.snapshot();
                    info!(
                        calls = now.calls_in_flight,
                        connections = now.downstream_connections,
                        left = ?self.drain.deadline.saturating_sub(began.elapsed()),
                        "draining"
                    );
                }
            }
        };
        let cut_off = match outcome {
            Ok(()) => 0,
            Err(_) => {
                // Counted in calls, not in the drain's internal guards
                // (connections, tunnels).
                let calls = self.counters.calls_in_flight();
                warn!(
                    calls,
                    connections = self.counters.snapshot().downstream_connections,
                    "drain deadline reached; ending open calls with UNAVAILABLE"
                );
                match tokio::time::timeout(FLUSH_AFTER_DEADLINE, &mut self.server).await {
                    Ok(_) => server_done = true,
                    Err(_) => {
                        let _ = self.abort.send(true);
                    }
                }
                calls
            }
        };
        info!(
            elapsed = ?start.elapsed(),
            finished = at_start.calls_in_flight.saturating_sub(cut_off),
            cut_off,
            "drained"
        );
        if !server_done {
            let _ = (&mut self.server).await;
        }
        self.groups.close();
        if let Some(xds) = &self.xds {
            xds.close();
        }
        let _ = tokio::time::timeout(
            UPSTREAM_CLOSE_WAIT,
            self.counters.upstream_connections_closed(),
        )
        .await;
        if let Some(admin) = self.admin_task.take() {
            admin.abort();
        }
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if let Some(xds) = self.xds_task.take() {
            xds.abort();
        }
        if let Some(reloader) = self.reloader.take() {
            reloader.abort();
        }
        for task in self.tunnel_tasks.drain(..) {
            task.abort();
        }
        DrainReport {
            elapsed: start.elapsed(),
            cut_off,
        }
    }
}
