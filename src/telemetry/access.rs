//! The access log (`log.access = true`): one line per call on stdout, as
//! text or JSON (`log.format`), with when it started, who called, what,
//! to where, how it ended, how long it took and how many bytes it moved.
//!
//! Off the hot path: a call hands its entry (a few reference-counted
//! values, no formatting) to a bounded queue; a thread of its own formats
//! and writes. When the writer falls behind (a blocked stdout), entries
//! are dropped and counted (`sluice_access_log_dropped_total`), never
//! waited for: the queue is at most [`QUEUE`] entries.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;

use crate::config::LogFormat;

/// Entries queued for the writer at most: ~1 MiB of entries, a few
/// seconds of a busy sidecar's calls.
pub(crate) const QUEUE: usize = 8192;
/// The longest `grpc-message` written: the rest is cut.
const MESSAGE_MAX: usize = 256;

/// One call, as the access log writes it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) start: SystemTime,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) method: Arc<str>,
    pub(crate) authority: Option<http::uri::Authority>,
    pub(crate) status: i32,
    pub(crate) message: Option<HeaderValue>,
    pub(crate) duration: Duration,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) request_id: Option<HeaderValue>,
    pub(crate) traceparent: Option<HeaderValue>,
}

/// Where calls send their entries.
#[derive(Clone, Debug)]
pub(crate) struct AccessLog {
    tx: mpsc::SyncSender<Entry>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread, writing `format` lines to stdout.
    pub(crate) fn start(format: LogFormat, dropped: Counter) -> Self {
        Self::to_writer(format, dropped, std::io::stdout())
    }

    fn to_writer(format: LogFormat, dropped: Counter, out: impl Write + Send + 'static) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Entry>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("sluice-access-log".to_owned())
            .spawn(move || write_all(&rx, format, out));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the access log's writer; calls are not logged");
        }
        Self { tx, dropped }
    }

    /// Queues `entry`; drops it (and counts it) if the writer is behind.
    pub(crate) fn log(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }
}

/// The writer: a line per entry, flushed whenever the queue runs dry.
fn write_all(rx: &mpsc::Receiver<Entry>, format: LogFormat, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(512);
    while let Ok(entry) = rx.recv() {
        let mut next = Some(entry);
        while let Some(entry) = next {
            line.clear();
            match format {
                LogFormat::Json => json(&entry, &mut line),
                LogFormat::Text => text(&entry, &mut line),
            }
            line.push('\n');
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: Option<&HeaderValue>) -> Option<&str> {
    let text = traceparent?.to_str().ok()?;
    let id = text.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The `grpc-message`, percent-decoded and cut to [`MESSAGE_MAX`] bytes.
fn message(value: Option<&HeaderValue>) -> Option<String> {
    let decoded = percent_encoding::percent_decode(value?.as_bytes()).decode_utf8_lossy();
    let mut end = decoded.len().min(MESSAGE_MAX);
    while !decoded.is_char_boundary(end) {
        end -= 1;
    }
    Some(decoded[..end].to_owned())
}

fn header(value: Option<&HeaderValue>) -> Option<&str> {
    value.and_then(|v| v.to_str().ok())
}

fn json(e: &Entry, out: &mut String) {
    let line = serde_json::json!({
        "time": rfc3339(e.start),
        "peer": e.peer.map(|p| p.to_string()),
        "method": &*e.method,
        "authority": e.authority.as_ref().map(http::uri::Authority::as_str),
        "grpc_status": e.status,
        "grpc_message": message(e.message.as_ref()),
        "duration_ms": e.duration.as_secs_f64() * 1000.0,
        "bytes_in": e.bytes_in,
        "bytes_out": e.bytes_out,
        "upstream": e.upstream.as_deref(),
        "upstream_group": e.group.as_deref(),
        "route": e.route.as_deref(),
        "request_id": header(e.request_id.as_ref()),
        "trace_id": trace_id(e.traceparent.as_ref()),
    });
    out.push_str(&line.to_string());
}

fn text(e: &Entry, out: &mut String) {
    use std::fmt::Write as _;
    let or_dash = |v: Option<&str>| v.map_or_else(|| "-".to_owned(), str::to_owned);
    let _ = write!(
        out,
        "{} peer={} method={} authority={} grpc_status={} duration_ms={:.3} bytes_in={} bytes_out={} upstream={} upstream_group={} route={} request_id={} trace_id={} grpc_message={:?}",
        rfc3339(e.start),
        e.peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        e.method,
        or_dash(e.authority.as_ref().map(http::uri::Authority::as_str)),
        e.status,
        e.duration.as_secs_f64() * 1000.0,
        e.bytes_in,
        e.bytes_out,
        or_dash(e.upstream.as_deref()),
        or_dash(e.group.as_deref()),
        or_dash(e.route.as_deref()),
        or_dash(header(e.request_id.as_ref())),
        or_dash(trace_id(e.traceparent.as_ref())),
        message(e.message.as_ref()).unwrap_or_default(),
    );
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-12-07T21:30:00.123Z`).
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |s: u64, ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_796_679_045, 123)), "2026-12-07T21:30:45.123Z");
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        /// A writer that never returns: the queue fills.
        struct Stuck(std::sync::mpsc::Receiver<()>);
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (release, stuck) = std::sync::mpsc::channel();
        let dropped = Counter::default();
        let log = AccessLog::to_writer(LogFormat::Json, dropped.clone(), Stuck(stuck));
        let entry = || Entry {
            start: SystemTime::now(),
            peer: None,
            method: Arc::from("/a.B/C"),
            authority: None,
            status: 0,
            message: None,
            duration: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            group: None,
            route: None,
            request_id: None,
            traceparent: None,
        };
        for _ in 0..3 * QUEUE {
            log.log(entry());
        }
        // The writer's buffer holds a few hundred lines, the queue QUEUE
        // entries: past that, entries are dropped, and the calls never
        // waited (this loop ended).
        assert!(dropped.get() >= QUEUE as u64, "{}", dropped.get());
        let _ = release.send(());
    }

    #[test]
    fn lines_say_every_field_and_cut_long_messages() {
        let e = Entry {
            start: SystemTime::UNIX_EPOCH,
            peer: Some("127.0.0.1:5000".parse().expect("addr")),
            method: Arc::from("/a.B/C"),
            authority: Some("svc.local:443".parse().expect("authority")),
            status: 14,
            message: Some(HeaderValue::from_str(&"x%20".repeat(200)).expect("ascii")),
            duration: Duration::from_micros(1500),
            bytes_in: 10,
            bytes_out: 20,
            upstream: Some(Arc::from("127.0.0.1:50051")),
            group: Some(Arc::from("default")),
            route: Some(Arc::from("billing")),
            request_id: Some(HeaderValue::from_static("r-1")),
            traceparent: Some(HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )),
        };
        let mut out = String::new();
        json(&e, &mut out);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["grpc_status"], 14);
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["route"], "billing");
        assert_eq!(v["grpc_message"].as_str().map(str::len), Some(MESSAGE_MAX));
        let mut line = String::new();
        text(&e, &mut line);
        assert!(
            line.starts_with("1970-01-01T00:00:00.000Z peer=127.0.0.1:5000 method=/a.B/C"),
            "{line}"
        );
        assert!(
            line.contains("grpc_status=14") && line.contains("route=billing"),
            "{line}"
        );
    }
}
