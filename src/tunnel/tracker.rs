//! The agent's tunnel pool, after Teleport's reverse-tunnel tracker: which
//! hubs the agent wants a tunnel to, and how many dials may run.
//!
//! A dial needs a [`Lease`], granted only while the agent holds fewer
//! tunnels (claimed plus dials in flight) than it wants: one per *desired*
//! hub (those of the newest generation of each hub group), capped by
//! `connections` when that is above 0. After the handshake names the hub
//! reached, the lease is *claimed* for it; a second claim of one hub (two
//! addresses, or a load balancer, leading to the same hub) fails, and the
//! caller closes that tunnel. Claims on hubs of an older generation do not
//! count towards what the agent has, so tunnels to a new generation open
//! while the old ones are still held (make-before-break), and an old one
//! closes only once [`Tracker::is_surplus`] says the new ones exist.
//!
//! Hubs not heard of for the expiry (3 minutes by default) are forgotten.
//! A lease is released when dropped, on every path: a lease that leaked
//! once stopped Teleport's agents from ever reconnecting.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// Hubs an agent knows at most: each desired one costs a tunnel, so
/// gossip must not make an agent dial without bound.
pub(crate) const MAX_TRACKED: usize = 64;

/// A hub as gossip describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HubInfo {
    pub(crate) name: String,
    pub(crate) group: String,
    pub(crate) generation: u64,
}

#[derive(Debug)]
struct Tracked {
    group: String,
    generation: u64,
    expires: Instant,
}

#[derive(Debug, Default)]
struct State {
    inflight: usize,
    claimed: HashSet<String>,
    tracked: HashMap<String, Tracked>,
    /// Hubs that said they drain, until when: not desired, whatever other
    /// hubs' gossip says, until they answer a handshake themselves again.
    draining: HashMap<String, Instant>,
}

/// What an agent's tunnel pool holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Hubs of the newest generation of their group.
    pub desired: usize,
    /// Hubs with a tunnel.
    pub claimed: usize,
    /// Dials under way (leases not yet claimed).
    pub inflight: usize,
    /// Dials that failed (connect or handshake), since the start.
    pub failed_dials: u64,
    /// Tunnels claimed since the start (a tunnel closed and dialled again
    /// counts twice).
    pub claims: u64,
}

/// The agent's tunnel bookkeeping.
#[derive(Debug)]
pub(crate) struct Tracker {
    state: Mutex<State>,
    expiry: Duration,
    /// Tunnels wanted at most; 0: one per desired hub.
    connections: usize,
    /// Woken whenever what is wanted or held changes.
    changed: tokio::sync::Notify,
    failed_dials: std::sync::atomic::AtomicU64,
    claims: std::sync::atomic::AtomicU64,
}

/// The right to make one dial, and then to hold the tunnel it made.
#[derive(Debug)]
#[must_use = "a lease is released when dropped"]
pub(crate) struct Lease {
    tracker: Arc<Tracker>,
    claimed: Option<String>,
}

impl Tracker {
    pub(crate) fn new(expiry: Duration, connections: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            expiry,
            connections,
            changed: tokio::sync::Notify::new(),
            failed_dials: std::sync::atomic::AtomicU64::new(0),
            claims: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Resolves at the next change (a lease taken, claimed or released,
    /// hubs heard of) after it is created (or `enable`d).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Records `hubs` as alive now; at most [`MAX_TRACKED`] hubs are
    /// known at once (gossip beyond that is ignored until some expire).
    pub(crate) fn track(&self, hubs: impl IntoIterator<Item = HubInfo>) {
        let expires = Instant::now() + self.expiry;
        let mut state = self.lock();
        for hub in hubs {
            if state.tracked.len() >= MAX_TRACKED && !state.tracked.contains_key(&hub.name) {
                continue;
            }
            state.tracked.insert(
                hub.name,
                Tracked {
                    group: hub.group,
                    generation: hub.generation,
                    expires,
                },
            );
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Hub `name` said it drains: it is no longer desired (for the expiry,
    /// whatever other hubs' gossip says), so a tunnel to another hub is
    /// dialled, and then the one to `name` drains.
    pub(crate) fn forget(&self, name: &str) {
        let mut state = self.lock();
        state.tracked.remove(name);
        state
            .draining
            .insert(name.to_owned(), Instant::now() + self.expiry);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Hub `name` answered a handshake itself: it takes tunnels again.
    pub(crate) fn answered(&self, name: &str) {
        self.lock().draining.remove(name);
    }

    /// A lease for one dial, if the agent wants another tunnel.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.lock();
        expire(&mut state);
        let grant = if state.inflight == 0 && (state.claimed.is_empty() || state.tracked.is_empty())
        {
            // Bootstrap, or every hub lost: dial to learn.
            true
        } else {
            let desired = desired(&state);
            let want = self.want(desired.len());
            let have = state.claimed.intersection(&desired).count() + state.inflight;
            want > have
        };
        if !grant {
            return None;
        }
        state.inflight += 1;
        drop(state);
        self.changed.notify_waiters();
        Some(Lease {
            tracker: self.clone(),
            claimed: None,
        })
    }

    /// Whether the tunnel to `name` may close: its hub is not desired (an
    /// older generation, or forgotten) and the desired hubs have every
    /// tunnel wanted.
    pub(crate) fn is_surplus(&self, name: &str) -> bool {
        let mut state = self.lock();
        expire(&mut state);
        let desired = desired(&state);
        if desired.contains(name) {
            return false;
        }
        let want = self.want(desired.len());
        want > 0 && state.claimed.intersection(&desired).count() >= want
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut state = self.lock();
        expire(&mut state);
        Snapshot {
            desired: desired(&state).len(),
            claimed: state.claimed.len(),
            inflight: state.inflight,
            failed_dials: self.failed_dials.load(std::sync::atomic::Ordering::Relaxed),
            claims: self.claims.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The hubs with a tunnel now.
    pub(crate) fn claimed_hubs(&self) -> Vec<String> {
        let mut hubs: Vec<String> = self.lock().claimed.iter().cloned().collect();
        hubs.sort();
        hubs
    }

    /// Counts a failed dial.
    pub(crate) fn dial_failed(&self) {
        self.failed_dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn want(&self, desired: usize) -> usize {
        if self.connections > 0 {
            desired.min(self.connections)
        } else {
            desired
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("tracker lock")
    }
}

/// Drops hubs not heard of within the expiry.
fn expire(state: &mut State) {
    let now = Instant::now();
    state.tracked.retain(|_, t| t.expires > now);
    state.draining.retain(|_, until| *until > now);
}

/// The hubs of the newest generation of each group.
fn desired(state: &State) -> HashSet<String> {
    let mut newest: HashMap<&str, u64> = HashMap::new();
    let live = |name: &String| !state.draining.contains_key(name);
    for t in state
        .tracked
        .iter()
        .filter(|(n, _)| live(n))
        .map(|(_, t)| t)
    {
        let g = newest.entry(t.group.as_str()).or_insert(t.generation);
        *g = (*g).max(t.generation);
    }
    state
        .tracked
        .iter()
        .filter(|(name, t)| live(name) && newest.get(t.group.as_str()) == Some(&t.generation))
        .map(|(name, _)| name.clone())
        .collect()
}

impl Lease {
    /// Claims the hub the dial reached. `false` when the agent already
    /// holds a tunnel to it (or the lease was claimed already): close this
    /// one.
    pub(crate) fn claim(&mut self, name: &str) -> bool {
        if self.claimed.is_some() {
            return false;
        }
        let mut state = self.tracker.lock();
        if !state.claimed.insert(name.to_owned()) {
            return false;
        }
        state.inflight -= 1;
        drop(state);
        self.tracker
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.claimed = Some(name.to_owned());
        self.tracker.changed.notify_waiters();
        true
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.tracker.lock();
        match self.claimed.take() {
            Some(name) => {
                state.claimed.remove(&name);
            }
            None => state.inflight -= 1,
        }
        drop(state);
        self.tracker.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, generation: u64) -> HubInfo {
        HubInfo {
            name: name.to_owned(),
            group: "hubs".to_owned(),
            generation,
        }
    }

    #[test]
    fn one_tunnel_per_desired_hub_and_a_duplicate_claim_is_refused() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        // Bootstrap: nothing known, one dial.
        let mut first = t.try_acquire().expect("bootstrap lease");
        assert!(t.try_acquire().is_none(), "one bootstrap dial at a time");
        t.track([hub("a", 1), hub("b", 1)]);
        assert!(first.claim("a"));
        let mut second = t.try_acquire().expect("b is wanted");
        assert!(
            t.try_acquire().is_none(),
            "a claimed + one in flight = 2 wanted"
        );
        // The load balancer led to a again: refused, released, dial again.
        let mut dup = second;
        assert!(!dup.claim("a"));
        drop(dup);
        second = t.try_acquire().expect("the released lease is free again");
        assert!(second.claim("b"));
        assert_eq!(
            t.snapshot(),
            Snapshot {
                desired: 2,
                claimed: 2,
                inflight: 0,
                failed_dials: 0,
                claims: 2,
            }
        );
        assert!(t.try_acquire().is_none());
        drop(first);
        assert!(t.try_acquire().is_some(), "a lost tunnel is dialled again");
    }

    #[test]
    fn a_new_generation_is_dialled_before_the_old_tunnels_may_close() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        t.track([hub("old-1", 1), hub("old-2", 1)]);
        let mut a = t.try_acquire().expect("lease");
        assert!(a.claim("old-1"));
        let mut b = t.try_acquire().expect("lease");
        assert!(b.claim("old-2"));
        // Rollout: generation 2 appears.
        t.track([hub("new-1", 2), hub("new-2", 2)]);
        assert!(!t.is_surplus("old-1"), "no new tunnel yet: keep the old");
        let mut c = t.try_acquire().expect("old claims do not count");
        let mut d = t.try_acquire().expect("two new hubs wanted");
        assert!(t.try_acquire().is_none());
        assert!(c.claim("new-1"));
        assert!(
            !t.is_surplus("old-1"),
            "one of two new tunnels: keep the old"
        );
        assert!(d.claim("new-2"));
        assert!(t.is_surplus("old-1") && t.is_surplus("old-2"));
        assert!(!t.is_surplus("new-1"));
        drop((a, b));
        assert_eq!(t.snapshot().claimed, 2);
    }

    #[test]
    fn a_hub_that_drains_stays_undesired_whatever_the_gossip_says() {
        let t = Tracker::new(Duration::from_secs(180), 1);
        t.track([hub("a", 1), hub("b", 1)]);
        let mut on_a = t.try_acquire().expect("lease");
        assert!(on_a.claim("a"));
        t.forget("a");
        // b's gossip still names a.
        t.track([hub("b", 1), hub("a", 1)]);
        let mut on_b = t.try_acquire().expect("a drains: b is wanted");
        assert!(on_b.claim("b"));
        assert!(t.is_surplus("a"), "a's tunnel may close now");
        t.answered("a");
        assert!(!t.is_surplus("b"));
    }

    #[test]
    fn a_connection_count_caps_tunnels_and_hubs_expire() {
        let t = Tracker::new(Duration::from_millis(50), 1);
        t.track([hub("a", 1), hub("b", 1), hub("c", 1)]);
        let mut l = t.try_acquire().expect("lease");
        assert!(l.claim("b"));
        assert!(t.try_acquire().is_none(), "capped at one tunnel");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.snapshot().desired, 0, "not heard of: expired");
        assert!(t.try_acquire().is_some(), "every hub lost: dial to learn");
    }

    #[test]
    fn leases_are_released_on_every_path_so_the_pool_always_reconnects() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        t.track([hub("a", 1)]);
        for i in 0..100 {
            let mut lease = t.try_acquire().unwrap_or_else(|| panic!("lease {i}"));
            if i % 2 == 0 {
                assert!(lease.claim("a"));
            }
            // Dropped: a failed dial, a failed handshake, a lost tunnel.
        }
        assert_eq!(t.snapshot().inflight, 0);
        assert_eq!(t.snapshot().claimed, 0);
        assert!(t.try_acquire().is_some());
    }
}
