use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, futures::OwnedNotified, watch};

use super::error::DrainTimedOut;

/// Where a drain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    Serving = 0,
    /// Readiness is withdrawn ([`Signal::announce`]); calls are still
    /// served as before.
    Announced = 1,
    Draining = 2,
    /// The grace period ran out: calls still open end now.
    Expired = 3,
}

#[derive(Debug)]
pub(super) struct Shared {
    phase: AtomicU8,
    /// Tells [`Watch::signaled`] waiters that the drain began.
    begun: watch::Sender<bool>,
    in_flight: AtomicUsize,
    /// Woken when `in_flight` reaches zero.
    idle: Notify,
    /// Woken once, when the grace period runs out.
    expire: Arc<Notify>,
}

/// Starts a drain and waits for it to finish. Held by the process, not by
/// layers.
#[derive(Debug)]
pub struct Signal {
    shared: Arc<Shared>,
}

/// Observes a drain and hands out [`Guard`]s. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Watch {
    shared: Arc<Shared>,
}

/// Keeps a drain open while held; dropping it releases the drain.
#[must_use = "dropping a Guard releases the drain immediately"]
#[derive(Debug)]
pub struct Guard {
    shared: Arc<Shared>,
}

pub(super) fn channel() -> (Signal, Watch) {
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(Phase::Serving as u8),
        begun: watch::channel(false).0,
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
        expire: Arc::new(Notify::new()),
    });
    (
        Signal {
            shared: shared.clone(),
        },
        Watch { shared },
    )
}

// === impl Shared ===

impl Shared {
    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Announced,
            2 => Phase::Draining,
            _ => Phase::Expired,
        }
    }

    /// Moves the phase forward to `to` (never back).
    fn advance(&self, to: Phase) {
        self.phase.fetch_max(to as u8, Ordering::AcqRel);
    }

    fn begin(&self) {
        self.advance(Phase::Draining);
        self.begun.send_replace(true);
    }

    async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Register before checking, so a release in between is not lost.
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(super) fn is_expired(&self) -> bool {
        self.phase() == Phase::Expired
    }

    /// A future that resolves when the grace period runs out.
    pub(super) fn expired(&self) -> OwnedNotified {
        self.expire.clone().notified_owned()
    }
}

// === impl Signal ===

impl Signal {
    /// Withdraws readiness ([`Watch::is_ready`] turns false) without
    /// draining yet: calls are served as before. A process announces first
    /// so that load balancers stop sending new clients before connections
    /// are told to go (a pre-drain delay).
    pub fn announce(&self) {
        self.shared.advance(Phase::Announced);
    }

    /// Begins draining (new calls are refused, [`Watch::signaled`] resolves),
    /// then waits until every [`Guard`] is released.
    pub async fn drain(self) {
        self.shared.begin();
        self.shared.idle().await;
    }

    /// Like [`Signal::drain`], but gives up after `grace`. When it gives up,
    /// every call still holding a guard through [`Drain`](super::Drain)
    /// ends at once with `UNAVAILABLE` (trailers if its response began, a
    /// trailers-only answer if not).
    ///
    /// # Errors
    ///
    /// [`DrainTimedOut`] with the number of guards still held when the grace
    /// period ran out.
    pub async fn drain_within(self, grace: Duration) -> Result<(), DrainTimedOut> {
        self.shared.begin();
        if tokio::time::timeout(grace, self.shared.idle())
            .await
            .is_ok()
        {
            return Ok(());
        }
        let in_flight = self.shared.in_flight.load(Ordering::Acquire);
        self.shared.advance(Phase::Expired);
        self.shared.expire.notify_waiters();
        Err(DrainTimedOut::new(in_flight))
    }
}

// === impl Watch ===

impl Watch {
    /// Whether the process still wants new clients: true until
    /// [`Signal::announce`] or the drain.
    pub fn is_ready(&self) -> bool {
        self.shared.phase() == Phase::Serving
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.phase() >= Phase::Draining
    }

    /// Whether the drain's grace period ran out
    /// ([`Signal::drain_within`] gave up).
    pub fn is_expired(&self) -> bool {
        self.shared.phase() == Phase::Expired
    }

    /// Number of guards held now (calls in flight, connections open).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Resolves once the drain begins, with a guard that the caller keeps
    /// until its own shutdown work (a connection told to GOAWAY, say) is
    /// done. The guard is taken before waiting, so the drain cannot finish
    /// while a task is waiting here.
    pub async fn signaled(self) -> Guard {
        let guard = self.guard();
        let mut begun = self.shared.begun.subscribe();
        let _ = begun.wait_for(|begun| *begun).await;
        guard
    }

    /// Takes a guard without waiting: a call in flight holds one.
    pub fn guard(&self) -> Guard {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Guard {
            shared: self.shared.clone(),
        }
    }
}

// === impl Guard ===

impl Guard {
    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}
