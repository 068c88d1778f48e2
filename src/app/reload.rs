//! The config read again while calls run: on SIGHUP, on `POST /reload`,
//! and (with `reload.watch`) when the file changes.
//!
//! A new config is parsed and validated exactly as at start; an invalid
//! one changes nothing. A valid one is applied whole for the calls that
//! start from then on: the groups first (kept where unchanged, endpoints
//! carried over where their entry and settings are the same), then a new
//! stack over them (routes, enrich, fan-out, limits per call), then the
//! listeners' per-call switches and the log level. Calls in flight finish
//! on the stack they started with. What only a restart can change is
//! named in the answer and the log, and the rest is still applied.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tracing::{error, info, warn};

use crate::{
    Config,
    config::ConfigError,
    live::Switch,
    server::ListenerSettings,
    stack::{self, Stack},
    tls::{TlsError, reload::Stamp},
};

/// How long endpoints that left stay open past a reload, besides the
/// longest peek: calls admitted before the reload may still pick them.
const LINGER_MARGIN: Duration = Duration::from_secs(1);

/// Where the config comes from, so that it can be read again: a file, and
/// what the command line changes in it after each read.
#[derive(Clone)]
pub struct ConfigSource {
    path: PathBuf,
    adjust: Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ConfigSource {
    /// The config file at `path`; `adjust` runs on every config read from
    /// it (the binary's `--listen`, `--upstream` and `--admin`).
    pub fn file(
        path: impl Into<PathBuf>,
        adjust: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> Self {
        Self {
            path: path.into(),
            adjust: Arc::new(adjust),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads and validates the file, as at start.
    ///
    /// # Errors
    ///
    /// What is wrong with the file, with its line, column and key.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::from_file(&self.path)?;
        (self.adjust)(&mut config);
        crate::config::validate_environment(&config)?;
        Ok(config)
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// sluice runs on the embedded default: there is no file to read.
    #[error("sluice runs without a config file (--config): nothing to reload")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// What a reload did.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    /// One line per change applied.
    pub(crate) applied: Vec<String>,
    /// The sections that differ but only a restart applies.
    pub(crate) restart: Vec<&'static str>,
}

impl Outcome {
    /// The answer `POST /reload` gives.
    pub(crate) fn text(&self) -> String {
        let mut text = if self.applied.is_empty() {
            "unchanged\n".to_owned()
        } else {
            format!("applied:\n  {}\n", self.applied.join("\n  "))
        };
        if !self.restart.is_empty() {
            text.push_str(&format!(
                "needs a restart (kept as it was): {}\n",
                self.restart.join(", ")
            ));
        }
        text
    }
}

/// The config in force, and where it came from.
#[derive(Debug)]
struct InForce {
    config: Arc<Config>,
    /// 0 at start, +1 at each applied reload.
    generation: u64,
    since: SystemTime,
    stamp: Option<Stamp>,
}

/// Applies configs to a running sluice.
pub(crate) struct Reloader {
    source: Option<ConfigSource>,
    in_force: Mutex<InForce>,
    parts: stack::Parts,
    switch: Arc<Switch<Stack>>,
    listener: Arc<ListenerSettings>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub(crate) fn new(
        source: Option<ConfigSource>,
        config: &Config,
        parts: stack::Parts,
        switch: Arc<Switch<Stack>>,
        listener: Arc<ListenerSettings>,
    ) -> Self {
        let stamp = source.as_ref().and_then(|s| Stamp::of(&s.path));
        Self {
            source,
            in_force: Mutex::new(InForce {
                config: Arc::new(config.clone()),
                generation: 0,
                since: SystemTime::now(),
                stamp,
            }),
            parts,
            switch,
            listener,
        }
    }

    /// Reads the file again and applies it (blocking: run it off the
    /// runtime's threads). Counted and logged either way.
    pub(crate) fn reload(&self, why: &str) -> Result<Outcome, ReloadError> {
        let result = self.try_reload();
        let metrics = &self.parts.metrics;
        match &result {
            Ok(outcome) if outcome.applied.is_empty() => {
                metrics.config_reloaded("unchanged");
                info!(trigger = why, "config reloaded: unchanged");
            }
            Ok(outcome) => {
                metrics.config_reloaded("applied");
                info!(trigger = why, changes = ?outcome.applied, "config reloaded");
            }
            Err(ReloadError::NoFile) => {}
            Err(e) => {
                metrics.config_reloaded("invalid");
                error!(trigger = why, error = %e, "config reload refused; the config in force is kept");
            }
        }
        if let Ok(outcome) = &result
            && !outcome.restart.is_empty()
        {
            warn!(sections = ?outcome.restart, "config changes that need a restart were not applied");
        }
        result
    }

    fn try_reload(&self) -> Result<Outcome, ReloadError> {
        let source = self.source.as_ref().ok_or(ReloadError::NoFile)?;
        // One reload at a time, from the read to the swap.
        let mut in_force = self.in_force.lock().expect("reload lock");
        let stamp = Stamp::of(&source.path);
        let mut next = source.load()?;
        in_force.stamp = stamp;
        let old = in_force.config.clone();
        let restart = restart_only(&old, &next);
        // What a restart would change stays as it is.
        keep_restart_only(&old, &mut next);
        let mut outcome = Outcome {
            applied: Vec::new(),
            restart,
        };
        if *old == next {
            return Ok(outcome);
        }
        let linger = next.routing.peek_timeout + LINGER_MARGIN;
        let groups = self.parts.groups.apply(&next, linger)?;
        for (what, names) in [
            ("groups added", &groups.added),
            ("groups changed", &groups.changed),
            ("groups removed", &groups.removed),
        ] {
            if !names.is_empty() {
                outcome
                    .applied
                    .push(format!("{what}: {}", names.join(", ")));
            }
        }
        if groups.endpoints_gone > 0 {
            outcome.applied.push(format!(
                "{} endpoint(s) left, closed once their calls end",
                groups.endpoints_gone
            ));
        }
        self.switch.store(stack::build(&next, &self.parts));
        self.listener.set_per_call(
            tag_peer(&next),
            next.routes.iter().any(|r| r.field.is_some()),
        );
        for (section, changed) in sections(&old, &next) {
            if changed {
                outcome.applied.push(format!("{section} changed"));
            }
        }
        if old.log.level != next.log.level {
            match crate::telemetry::set_log_level(&next.log.level) {
                Ok(true) => {}
                Ok(false) => outcome
                    .applied
                    .push("log.level kept: RUST_LOG sets the filter".to_owned()),
                Err(e) => warn!(error = %e, "cannot change the log level"),
            }
        }
        in_force.config = Arc::new(next);
        in_force.generation += 1;
        in_force.since = SystemTime::now();
        Ok(outcome)
    }

    /// Whether the file changed since it was last read (its size, time or
    /// inode: a ConfigMap's symlink swap counts).
    fn file_changed(&self) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        let now = Stamp::of(&source.path);
        self.in_force.lock().expect("reload lock").stamp != now
    }

    /// Polls the file every `interval`, and reloads when it changed.
    pub(crate) async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !self.file_changed() {
                continue;
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reload("file changed")).await;
        }
    }

    /// What `GET /config` shows: where the config in force came from,
    /// and what it configures.
    pub(crate) fn describe(&self) -> String {
        let in_force = self.in_force.lock().expect("reload lock");
        let origin = self.source.as_ref().map_or_else(
            || "the embedded default (no --config)".to_owned(),
            |s| format!("file {}", s.path.display()),
        );
        let since = humantime_since(in_force.since);
        let mut text = format!(
            "# from {origin}; generation {} (reloads applied), in force for {since}\n",
            in_force.generation
        );
        for line in crate::check::report(&in_force.config) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

/// Whether calls carry the peer's address (an enrich rule or the access
/// log reads it).
pub(crate) fn tag_peer(config: &Config) -> bool {
    config.enrich.forwarded || config.enrich.x_forwarded_for || config.log.access
}

/// How long ago `since` was, in whole seconds.
fn humantime_since(since: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(since)
        .unwrap_or_default()
        .as_secs();
    format!("{secs}s")
}

/// Each part of the config a reload applies besides the groups, and
/// whether it differs between `a` and `b`.
fn sections(a: &Config, b: &Config) -> [(&'static str, bool); 6] {
    [
        ("routes", a.routes != b.routes),
        ("routing", a.routing != b.routing),
        ("fanout", a.fanout != b.fanout),
        ("enrich", a.enrich != b.enrich),
        ("log.level", a.log.level != b.log.level),
        ("log.access", a.log.access != b.log.access),
    ]
}

/// The sections that differ between `old` and `new` and that only a
/// restart applies: listeners and their settings, the runtime, the admin
/// server, the drain, tracing, the tunnel role, the log format, the TLS
/// poll and the reload settings themselves.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut restart = Vec::new();
    for (name, differs) in [
        ("server", old.server != new.server),
        ("runtime", old.runtime != new.runtime),
        ("admin", old.admin != new.admin),
        ("drain", old.drain != new.drain),
        ("trace", old.trace != new.trace),
        ("tunnel", old.tunnel != new.tunnel),
        ("log.format", old.log.format != new.log.format),
        ("tls", old.tls != new.tls),
        ("reload", old.reload != new.reload),
        ("xds", old.xds != new.xds),
    ] {
        if differs {
            restart.push(name);
        }
    }
    restart
}

/// `new` with the sections only a restart applies taken from `old`, so
/// that the config in force says what runs.
fn keep_restart_only(old: &Config, new: &mut Config) {
    new.server.clone_from(&old.server);
    new.runtime.clone_from(&old.runtime);
    new.admin.clone_from(&old.admin);
    new.drain.clone_from(&old.drain);
    new.trace.clone_from(&old.trace);
    new.tunnel.clone_from(&old.tunnel);
    new.log.format = old.log.format;
    new.tls.clone_from(&old.tls);
    new.reload.clone_from(&old.reload);
    new.xds.clone_from(&old.xds);
}

/// `POST /reload` over `reloader`: 200 with what changed, 422 with the
/// error of an invalid file, 409 without a file.
pub(crate) fn reload_fn(reloader: &Arc<Reloader>) -> crate::admin::ReloadFn {
    let reloader = reloader.clone();
    Arc::new(move || {
        let reloader = reloader.clone();
        Box::pin(async move {
            use http::StatusCode;
            match tokio::task::spawn_blocking(move || reloader.reload("POST /reload")).await {
                Ok(Ok(outcome)) => (StatusCode::OK, outcome.text()),
                Ok(Err(e @ ReloadError::NoFile)) => (StatusCode::CONFLICT, format!("{e}\n")),
                Ok(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the reload failed: {e}\n"),
                ),
            }
        })
    })
}
