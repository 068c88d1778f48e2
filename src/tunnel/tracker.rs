//! The agent's tunnel pool, after Teleport's reverse-tunnel tracker: which
//! hubs the agent wants a tunnel to, and how many dials may run.
//!
//! A hub is a *name* (from the config and gossip: its group and
//! generation) served by one or more *instances*: the processes that
//! answer handshakes under that name, each with an id of its own (a hub
//! restarted in place, or replicas behind one address). The agent wants a
//! tunnel to every live instance it knows of each *desired* name (those of
//! the newest generation of their group), at least one per name, capped by
//! `connections` when that is above 0. Instances become known by
//! answering a handshake (a tunnel's or a discovery's) and are forgotten
//! when their tunnel closes or the expiry passes unheard.
//!
//! A dial needs a [`Lease`], granted only while the agent holds fewer
//! tunnels (claimed plus dials in flight) than it wants. After the
//! handshake names the instance reached, the lease is *claimed* for it; a
//! second claim of one instance (two addresses leading to the same
//! process) fails, and the caller closes that tunnel. An instance that
//! says it drains (the hub's re-home request) and hubs of an older
//! generation do not count towards what the agent has, so tunnels to a
//! replacement open while the old ones are still held (make-before-break),
//! and an old one closes only once [`Tracker::is_surplus`] says the wanted
//! tunnels exist.
//!
//! A lease is released when dropped, on every path: a lease that leaked
//! once stopped Teleport's agents from ever reconnecting.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// Hubs (and, apart, instances) an agent knows at most: each desired one
/// costs a tunnel, so gossip must not make an agent dial without bound.
pub(crate) const MAX_TRACKED: usize = 64;

/// A hub as gossip describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HubInfo {
    pub(crate) name: String,
    pub(crate) group: String,
    pub(crate) generation: u64,
}

/// One hub process: the name it serves and the id it gave in its
/// handshake answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Instance {
    pub(crate) name: String,
    pub(crate) id: String,
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
    claimed: HashSet<Instance>,
    tracked: HashMap<String, Tracked>,
    /// Instances heard of (a handshake answer) and not claimed, until
    /// when.
    known: HashMap<Instance, Instant>,
    /// Instances that said they drain, until when: wanted no more.
    draining: HashMap<Instance, Instant>,
}

/// What an agent's tunnel pool holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Hubs of the newest generation of their group.
    pub desired: usize,
    /// Tunnels held (one per hub instance).
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
    /// Tunnels wanted at most; 0: one per desired hub instance.
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
    claimed: Option<Instance>,
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

    /// `instance` answered a handshake: it is alive and takes tunnels (a
    /// drain it announced is over: it was another process's).
    pub(crate) fn heard(&self, instance: &Instance) {
        let mut state = self.lock();
        state.draining.remove(instance);
        let room = state.known.len() < MAX_TRACKED || state.known.contains_key(instance);
        if !state.claimed.contains(instance) && room {
            state
                .known
                .insert(instance.clone(), Instant::now() + self.expiry);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// `instance` said it drains (its re-home request): it is wanted no
    /// more (for the expiry), so a tunnel to another instance is dialled,
    /// and then the one to `instance` drains.
    pub(crate) fn forget(&self, instance: &Instance) {
        let mut state = self.lock();
        state.known.remove(instance);
        state
            .draining
            .insert(instance.clone(), Instant::now() + self.expiry);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Whether `instance` said it drains.
    pub(crate) fn is_draining(&self, instance: &Instance) -> bool {
        self.lock().draining.contains_key(instance)
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
            let (want, have) = self.count(&state);
            want > have + state.inflight
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

    /// Whether the tunnel to `instance` may close: it drains, or its hub
    /// is not desired (an older generation), and the tunnels wanted are
    /// held.
    pub(crate) fn is_surplus(&self, instance: &Instance) -> bool {
        let mut state = self.lock();
        expire(&mut state);
        if desired(&state).contains(&instance.name) && !state.draining.contains_key(instance) {
            return false;
        }
        let (want, have) = self.count(&state);
        want > 0 && have >= want
    }

    /// Whether every tunnel wanted is held (what a re-home request waits
    /// for before it answers).
    pub(crate) fn is_complete(&self) -> bool {
        let mut state = self.lock();
        expire(&mut state);
        let (want, have) = self.count(&state);
        want > 0 && have >= want
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

    /// The hubs with a tunnel now (one entry per instance).
    pub(crate) fn claimed_hubs(&self) -> Vec<String> {
        let mut hubs: Vec<String> = self.lock().claimed.iter().map(|i| i.name.clone()).collect();
        hubs.sort();
        hubs
    }

    /// Counts a failed dial.
    pub(crate) fn dial_failed(&self) {
        self.failed_dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tunnels wanted and tunnels held that count towards them: one per
    /// live instance of each desired hub (at least one per hub).
    fn count(&self, state: &State) -> (usize, usize) {
        let desired = desired(state);
        let live = |i: &&Instance| desired.contains(&i.name) && !state.draining.contains_key(*i);
        let held: Vec<&Instance> = state.claimed.iter().filter(live).collect();
        let mut want = 0;
        for name in &desired {
            let instances = held.iter().filter(|i| &i.name == name).count()
                + state
                    .known
                    .keys()
                    .filter(|i| &i.name == name && live(i))
                    .count();
            want += instances.max(1);
        }
        if self.connections > 0 {
            want = want.min(self.connections);
        }
        (want, held.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("tracker lock")
    }
}

/// Drops hubs and instances not heard of within the expiry.
fn expire(state: &mut State) {
    let now = Instant::now();
    state.tracked.retain(|_, t| t.expires > now);
    state.known.retain(|_, until| *until > now);
    state.draining.retain(|_, until| *until > now);
}

/// The hubs of the newest generation of each group.
fn desired(state: &State) -> HashSet<String> {
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for t in state.tracked.values() {
        let g = newest.entry(t.group.as_str()).or_insert(t.generation);
        *g = (*g).max(t.generation);
    }
    state
        .tracked
        .iter()
        .filter(|(_, t)| newest.get(t.group.as_str()) == Some(&t.generation))
        .map(|(name, _)| name.clone())
        .collect()
}

impl Lease {
    /// Claims the instance the dial reached. `false` when the agent
    /// already holds a tunnel to it (or the lease was claimed already):
    /// close this one.
    pub(crate) fn claim(&mut self, instance: &Instance) -> bool {
        if self.claimed.is_some() {
            return false;
        }
        let mut state = self.tracker.lock();
        if !state.claimed.insert(instance.clone()) {
            return false;
        }
        state.known.remove(instance);
        state.inflight -= 1;
        drop(state);
        self.tracker
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.claimed = Some(instance.clone());
        self.tracker.changed.notify_waiters();
        true
    }
}

impl Lease {
    /// Gives up the claim and goes back to being a dial (its slot held
    /// through the backoff that follows): the tunnel is gone, so the next
    /// dial may claim the same instance again.
    pub(crate) fn unclaim(&mut self) {
        let Some(instance) = self.claimed.take() else {
            return;
        };
        let mut state = self.tracker.lock();
        state.claimed.remove(&instance);
        state.inflight += 1;
        drop(state);
        self.tracker.changed.notify_waiters();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.tracker.lock();
        match self.claimed.take() {
            // The tunnel is gone: so is what the agent knew of the
            // instance (a live one is heard of again at the next dial).
            Some(instance) => {
                state.claimed.remove(&instance);
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

    fn at(name: &str, id: &str) -> Instance {
        Instance {
            name: name.to_owned(),
            id: id.to_owned(),
        }
    }

    #[test]
    fn one_tunnel_per_desired_hub_and_a_duplicate_claim_is_refused() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        // Bootstrap: nothing known, one dial.
        let mut first = t.try_acquire().expect("bootstrap lease");
        assert!(t.try_acquire().is_none(), "one bootstrap dial at a time");
        t.track([hub("a", 1), hub("b", 1)]);
        assert!(first.claim(&at("a", "1")));
        let mut second = t.try_acquire().expect("b is wanted");
        assert!(
            t.try_acquire().is_none(),
            "a claimed + one in flight = 2 wanted"
        );
        // The load balancer led to the same process of a again: refused,
        // released, dial again.
        let mut dup = second;
        assert!(!dup.claim(&at("a", "1")));
        drop(dup);
        second = t.try_acquire().expect("the released lease is free again");
        assert!(second.claim(&at("b", "1")));
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
        assert!(a.claim(&at("old-1", "x")));
        let mut b = t.try_acquire().expect("lease");
        assert!(b.claim(&at("old-2", "x")));
        // Rollout: generation 2 appears.
        t.track([hub("new-1", 2), hub("new-2", 2)]);
        assert!(
            !t.is_surplus(&at("old-1", "x")),
            "no new tunnel yet: keep the old"
        );
        let mut c = t.try_acquire().expect("old claims do not count");
        let mut d = t.try_acquire().expect("two new hubs wanted");
        assert!(t.try_acquire().is_none());
        assert!(c.claim(&at("new-1", "y")));
        assert!(
            !t.is_surplus(&at("old-1", "x")),
            "one of two new tunnels: keep the old"
        );
        assert!(d.claim(&at("new-2", "y")));
        assert!(t.is_surplus(&at("old-1", "x")) && t.is_surplus(&at("old-2", "x")));
        assert!(!t.is_surplus(&at("new-1", "y")));
        drop((a, b));
        assert_eq!(t.snapshot().claimed, 2);
    }

    /// Issue #17.8: a hub restarted in place keeps its name; the new
    /// process is another instance, claimed while the old one drains.
    #[test]
    fn a_hub_restarted_in_place_is_a_new_instance_claimed_before_the_old_closes() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        t.track([hub("a", 1)]);
        let mut old = t.try_acquire().expect("lease");
        assert!(old.claim(&at("a", "old")));
        assert!(t.try_acquire().is_none() && t.is_complete());
        // The old process drains and says so.
        t.forget(&at("a", "old"));
        assert!(!t.is_complete(), "a drains: a tunnel to it counts no more");
        assert!(!t.is_surplus(&at("a", "old")), "nothing else yet: keep it");
        let mut new = t.try_acquire().expect("a replacement is wanted");
        // The same name, another process: not a duplicate.
        assert!(new.claim(&at("a", "new")));
        assert!(t.is_complete());
        assert!(
            t.is_surplus(&at("a", "old")),
            "the old tunnel may drain now"
        );
        assert!(!t.is_surplus(&at("a", "new")));
        // The old tunnel closes: its claim goes at once, and nothing more
        // is wanted.
        drop(old);
        assert!(t.try_acquire().is_none());
        assert_eq!(t.snapshot().claimed, 1);
    }

    #[test]
    fn every_known_instance_of_a_hub_is_wanted_so_replicas_each_get_the_agent() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        t.track([hub("a", 1)]);
        let mut one = t.try_acquire().expect("lease");
        assert!(one.claim(&at("a", "r1")));
        assert!(t.try_acquire().is_none());
        // A discovery reached the other replica behind the same address.
        t.heard(&at("a", "r2"));
        let mut two = t.try_acquire().expect("the second replica is wanted");
        assert!(
            !two.claim(&at("a", "r1")),
            "the first one again: a duplicate"
        );
        drop(two);
        let mut two = t.try_acquire().expect("still wanted");
        assert!(two.claim(&at("a", "r2")));
        assert!(t.try_acquire().is_none() && t.is_complete());
        // A replica whose tunnel closes is forgotten with it.
        drop(two);
        assert!(t.is_complete(), "one instance known: one wanted");
    }

    /// Issue #17.9: a closed tunnel gives its claim back at once, while
    /// its lease (and so its backoff) still paces the next dial: a dial
    /// that reaches the same hub again is not refused as a duplicate.
    #[test]
    fn a_closed_tunnel_gives_its_claim_back_before_its_backoff() {
        let t = Tracker::new(Duration::from_secs(180), 0);
        t.track([hub("a", 1)]);
        let mut sleeping = t.try_acquire().expect("lease");
        assert!(sleeping.claim(&at("a", "1")));
        // The tunnel closes; its task sleeps its backoff.
        sleeping.unclaim();
        assert_eq!(t.snapshot().claimed, 0);
        assert_eq!(
            t.snapshot().inflight,
            1,
            "the backoff still holds a dial's slot"
        );
        assert!(
            t.try_acquire().is_none(),
            "no second dial during the backoff"
        );
        assert!(
            sleeping.claim(&at("a", "1")),
            "the same hub process, claimed again"
        );
    }

    #[test]
    fn a_connection_count_caps_tunnels_and_hubs_expire() {
        let t = Tracker::new(Duration::from_millis(50), 1);
        t.track([hub("a", 1), hub("b", 1), hub("c", 1)]);
        let mut l = t.try_acquire().expect("lease");
        assert!(l.claim(&at("b", "1")));
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
                assert!(lease.claim(&at("a", "1")));
            }
            // Dropped: a failed dial, a failed handshake, a lost tunnel.
        }
        assert_eq!(t.snapshot().inflight, 0);
        assert_eq!(t.snapshot().claimed, 0);
        assert!(t.try_acquire().is_some());
    }
}
