//! Dialling an endpoint: one dial at a time per pool (callers that waited
//! share its outcome), in a task of its own, with a short fail-fast
//! backoff after consecutive failures; and the connection's driver task.

use std::sync::{
    Arc, Weak,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{
    UpstreamError,
    drive::drive,
    pool::{BACKOFF_BASE, BACKOFF_MAX, Conn, DialState, Pool},
};
use crate::{
    proto::batch::{self, Flushed},
    stats::{Held, Kind},
};

impl Pool {
    /// Dials a connection, unless someone else's dial finished while this
    /// call waited for its turn (`None`: pick again).
    pub(super) async fn dial(&self, epoch: u64) -> Result<Option<Conn>, UpstreamError> {
        let inner = &self.inner;
        let mut state = inner.dial.lock().await;
        if inner.dial_epoch.load(Ordering::Acquire) != epoch {
            // Someone dialled while we waited: share their outcome.
            if let Some(err) = &state.last_error {
                return Err(err.clone());
            }
            return Ok(None);
        }
        if let (Some(at), Some(err)) = (state.retry_at, &state.last_error)
            && Instant::now() < at
        {
            return Err(err.clone());
        }
        // In a task of its own: a call dropped while it waits (a deadline,
        // a mirror copy let go, a client's cancel) must not cut the dial
        // off mid-handshake; the connection it makes serves the next call.
        let pool = self.clone();
        let result = tokio::spawn(async move { pool.connect().await })
            .await
            .unwrap_or_else(|e| {
                Err(UpstreamError::Unreachable {
                    target: inner.name.clone(),
                    reason: Arc::from(format!("the dial task failed: {e}")),
                })
            });
        inner.dial_epoch.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(conn) => {
                *state = DialState::default();
                inner.failing.store(false, Ordering::Relaxed);
                Ok(Some(conn))
            }
            Err(err) => {
                inner.failing.store(true, Ordering::Relaxed);
                state.failures = state.failures.saturating_add(1);
                let backoff = (state.failures > 1).then(|| {
                    BACKOFF_BASE
                        .saturating_mul(1 << (state.failures - 2).min(16))
                        .min(BACKOFF_MAX)
                });
                state.retry_at = backoff.map(|b| Instant::now() + b);
                state.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let inner = &self.inner;
        let unreachable = |reason: String| UpstreamError::Unreachable {
            target: inner.name.clone(),
            reason: Arc::from(reason),
        };
        // Read before dialling: material swapped during the handshake makes
        // this connection one to replace, never one wrongly kept.
        let generation = inner.connector.generation();
        let tcp = match tokio::time::timeout(
            inner.config.connect_timeout,
            inner.connector.connect(&inner.target),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unreachable(e.0)),
            Err(_) => {
                return Err(unreachable(format!(
                    "connect timed out after {:?}",
                    inner.config.connect_timeout
                )));
            }
        };
        let (io, flusher) = batch::new(tcp);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(inner.config.initial_stream_window.0)
            .initial_connection_window_size(inner.config.connection_window())
            .max_frame_size(inner.config.max_frame_size.0)
            .data_frame_budget(inner.config.data_frame_budget.0 as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| unreachable(format!("HTTP/2 handshake failed: {e}")))?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(AtomicBool::new(false));
        let conn = Conn {
            id,
            send,
            load: Arc::default(),
            generation,
            evicted: evicted.clone(),
        };
        let gauge = Held::count(&inner.counters, Kind::UpstreamConnection);
        let pool = Arc::downgrade(&self.inner);
        let name = inner.name.clone();
        // A tunnel is pinged when idle too: an agent whose host went away
        // silently must leave the group within a keepalive, not at its
        // next call.
        let keepalive = (
            inner.config.keepalive_interval,
            inner.config.keepalive_timeout,
            inner.connector.is_tunnel(),
        );
        let idle_timeout = inner.config.idle_timeout;
        let load = conn.load.clone();
        let evict = {
            let pool = pool.clone();
            move || {
                if let Some(pool) = Weak::upgrade(&pool) {
                    pool.remove(id);
                }
            }
        };
        let evict = {
            let evicted = evicted.clone();
            move || {
                evicted.store(true, Ordering::Relaxed);
                evict();
            }
        };
        // Over TLS 1.3 an upstream that refuses sluice's client certificate
        // says so only after sluice's side of the handshake is done (and an
        // agent closes a duplicate tunnel without a word): one PING
        // answered proves the peer took the connection, before any call
        // (or the retirement of a working older connection) depends on it.
        let (verified, verdict) = if inner.connector.verifies() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some((tx, inner.config.connect_timeout)), Some(rx))
        } else {
            (None, None)
        };
        tokio::spawn(async move {
            let _gauge = gauge;
            let ended = drive(
                Flushed::new(connection, flusher),
                keepalive,
                idle_timeout,
                &load.in_flight,
                &name,
                evict,
                verified,
            )
            .await;
            if let Err(e) = &ended {
                if e.is_io() || e.is_go_away() {
                    debug!(upstream = %name, error = %e, "upstream connection closed");
                } else {
                    warn!(upstream = %name, error = %e, "upstream connection failed");
                }
            }
            if let Some(pool) = Weak::upgrade(&pool) {
                // A connection that ends without sluice letting go of it
                // was ended by the upstream (GOAWAY, or a close): the
                // endpoint is draining.
                if !evicted.load(Ordering::Relaxed) && !pool.closed.load(Ordering::Relaxed) {
                    pool.mark_draining();
                }
                pool.remove(id);
                pool.ended.notify_waiters();
            }
        });
        if let Some(verdict) = verdict {
            // The drive task bounds the wait by connect_timeout.
            let refused = match verdict.await {
                Ok(Ok(())) => None,
                Ok(Err(reason)) => Some(reason),
                Err(_) => Some("the connection ended at once".to_owned()),
            };
            if let Some(reason) = refused {
                // Not the endpoint draining: sluice gives the connection up.
                conn.evicted.store(true, Ordering::Relaxed);
                return Err(unreachable(reason));
            }
        }
        if inner.closed.load(Ordering::Relaxed) {
            // Closed while dialling (a drain, an endpoint that left): the
            // connection goes at once.
            conn.evicted.store(true, Ordering::Relaxed);
            return Err(unreachable(
                "the endpoint was closed while dialling".to_owned(),
            ));
        }
        {
            let mut conns = inner.conns.lock().expect("pool lock");
            conns.push(conn.clone());
            // A connection with new TLS material exists: the old ones go.
            inner.retire_locked(&mut conns, generation, false);
        }
        debug!(upstream = %inner.name, id, "upstream connection open");
        Ok(conn)
    }
}
