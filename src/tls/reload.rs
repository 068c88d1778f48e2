//! TLS material that follows its files: built once at start, rebuilt when
//! a file changes (polled) or on request (SIGHUP), and swapped in whole.
//!
//! A rebuild that fails (a half-written or corrupt file, a key that does
//! not match) keeps the material in use; readiness is untouched. A failure
//! a poll sees is first *deferred*: rotating a key and a certificate is two
//! renames, and a poll may fall between them. Only when the next poll still
//! cannot use the files is it a failure, logged once per change and
//! counted. A reload asked for (SIGHUP) reports a failure at once. Handshakes take the current material
//! each time, so a swap affects new connections only; connections already
//! open carry on with what they negotiated.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;
use tracing::{error, info};

use super::TlsError;
use crate::telemetry::metrics::Metrics;

/// What identifies a file's content without reading it: its size, its
/// modification time and its inode (an atomic rename, as Kubernetes does
/// for secrets, changes the inode even within one clock tick).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl Stamp {
    pub(crate) fn of(path: &std::path::Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        })
    }
}

/// Material of type `T` built from files.
pub(crate) struct Reloadable<T> {
    /// The config key it comes from, for logs and metrics.
    name: String,
    paths: Vec<PathBuf>,
    stamps: Mutex<Vec<Option<Stamp>>>,
    /// A hash of the files' bytes when the material in use was built: a
    /// touch or a SIGHUP with nothing changed swaps nothing (a swap
    /// replaces every upstream connection opened with the old material).
    content: Mutex<u64>,
    current: RwLock<Arc<T>>,
    /// Bumped at every swap.
    generation: AtomicU64,
    /// A poll saw the files unusable once; the next one decides.
    deferred: std::sync::atomic::AtomicBool,
    build: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("name", &self.name)
            .field("paths", &self.paths)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl<T> Reloadable<T> {
    /// Builds the material once.
    ///
    /// # Errors
    ///
    /// What `build` says.
    pub(crate) fn new(
        name: String,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let stamps = paths.iter().map(|p| Stamp::of(p)).collect();
        let content = content_hash(&paths);
        let first = build()?;
        Ok(Self {
            name,
            paths,
            stamps: Mutex::new(stamps),
            content: Mutex::new(content),
            current: RwLock::new(Arc::new(first)),
            generation: AtomicU64::new(0),
            deferred: std::sync::atomic::AtomicBool::new(false),
            build: Box::new(build),
        })
    }

    /// The material in use now.
    pub(crate) fn current(&self) -> Arc<T> {
        self.current.read().expect("tls material lock").clone()
    }

    /// How many times the material was swapped.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A hash of the bytes of `paths` (a missing file hashes as empty).
fn content_hash(paths: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        std::fs::read(p).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// What a reload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reloaded {
    Unchanged,
    Swapped,
    /// Unusable at this poll; tried again at the next.
    Deferred,
    Failed,
}

/// Material the [`Reloader`] looks after.
pub(crate) trait Reload: Send + Sync + std::fmt::Debug {
    /// Rebuilds if a file changed, or in any case when `force`.
    fn reload(&self, force: bool, metrics: &Metrics) -> Reloaded;
}

impl<T: Send + Sync> Reload for Reloadable<T> {
    fn reload(&self, force: bool, metrics: &Metrics) -> Reloaded {
        let now: Vec<Option<Stamp>> = self.paths.iter().map(|p| Stamp::of(p)).collect();
        let retry = self.deferred.swap(false, Ordering::AcqRel);
        {
            let mut stamps = self.stamps.lock().expect("tls stamps lock");
            if !force && !retry && *stamps == now {
                return Reloaded::Unchanged;
            }
            // Recorded before the outcome is known: a file that fails to
            // parse is reported once, not at every poll.
            *stamps = now;
        }
        let content = content_hash(&self.paths);
        if *self.content.lock().expect("tls content lock") == content {
            return Reloaded::Unchanged;
        }
        match (self.build)() {
            Ok(material) => {
                *self.content.lock().expect("tls content lock") = content;
                *self.current.write().expect("tls material lock") = Arc::new(material);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                info!(material = %self.name, generation, "TLS material reloaded");
                metrics.tls_reloaded(&self.name, "swapped");
                Reloaded::Swapped
            }
            Err(e) if !force && !retry => {
                // Perhaps half a rotation (the key renamed, the certificate
                // not yet): the next poll decides.
                self.deferred.store(true, Ordering::Release);
                info!(material = %self.name, error = %e, "TLS material changed but cannot be used yet; trying again at the next poll");
                metrics.tls_reloaded(&self.name, "deferred");
                Reloaded::Deferred
            }
            Err(e) => {
                error!(material = %self.name, error = %e, "TLS material changed but cannot be used; keeping what is in use");
                metrics.tls_reloaded(&self.name, "failed");
                Reloaded::Failed
            }
        }
    }
}

/// The TLS material in use now (a config reload changes the groups').
pub(crate) type MaterialsFn = Arc<dyn Fn() -> Vec<Arc<dyn Reload>> + Send + Sync>;

/// Polls every piece of TLS material every `interval`, and all of it at
/// once when asked (SIGHUP).
pub(crate) struct Reloader {
    pub(crate) materials: MaterialsFn,
    pub(crate) interval: Duration,
    pub(crate) requested: Arc<Notify>,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Runs until dropped (aborted with the process's other tasks).
    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                () = self.requested.notified() => true,
            };
            // Reading and parsing files blocks: off the runtime's threads
            // (on the default current-thread runtime it would stall every
            // connection meanwhile).
            let (materials, metrics) = ((self.materials)(), self.metrics.clone());
            let _ = tokio::task::spawn_blocking(move || {
                for m in &materials {
                    m.reload(force, &metrics);
                }
            })
            .await;
        }
    }
}
