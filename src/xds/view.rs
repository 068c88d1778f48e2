//! What calls read of xDS: one immutable view, rebuilt by the client task
//! after each change and swapped whole (one atomic load per call), with a
//! generation that waiting calls watch.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use super::resources::RouteTable;
use crate::balance::ClusterGroups;

/// Where a resource a call needs stands.
#[derive(Clone, Debug)]
pub(crate) enum Lookup<T> {
    /// Not here yet: the call may wait.
    Waiting,
    /// Known not to exist (or refused, with no good version): why.
    Missing(String),
    Ready(T),
}

/// A Listener with its routes in hand.
#[derive(Debug)]
pub(crate) struct ListenerView {
    pub(crate) table: Arc<RouteTable>,
    /// The listener's `max_stream_duration`, which a route's overrides.
    pub(crate) max_stream_duration: Option<Duration>,
    /// When calls last used it (authority mode: idle ones are dropped).
    pub(crate) used: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// A Cluster with its endpoints in hand.
#[derive(Debug)]
pub(crate) struct ClusterView {
    /// The group name calls record (`xds:NAME`).
    pub(crate) target: Arc<str>,
    pub(crate) groups: Arc<ClusterGroups>,
    pub(crate) max_requests: usize,
    /// Calls in flight now, for the circuit breaker.
    pub(crate) in_flight: Arc<AtomicUsize>,
}

/// Everything calls read.
#[derive(Debug, Default)]
pub(crate) struct View {
    pub(crate) listeners: HashMap<String, Lookup<Arc<ListenerView>>>,
    pub(crate) clusters: HashMap<String, Lookup<Arc<ClusterView>>>,
}

impl View {
    /// Listener `name`; `Waiting` for one nobody asked for yet.
    pub(crate) fn listener(&self, name: &str) -> Lookup<Arc<ListenerView>> {
        self.listeners.get(name).cloned().unwrap_or(Lookup::Waiting)
    }

    /// Cluster `name`.
    pub(crate) fn cluster(&self, name: &str) -> Lookup<Arc<ClusterView>> {
        self.clusters.get(name).cloned().unwrap_or(Lookup::Waiting)
    }
}
