//! Logging (`tracing` to stderr, as text or JSON lines) and metrics.

pub(crate) mod access;
pub(crate) mod calls;
pub(crate) mod collect;
pub(crate) mod metrics;
pub(crate) mod refusals;
pub(crate) mod trace;

use std::{io::IsTerminal, sync::OnceLock};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use tracing::Level;
use tracing_subscriber::{
    EnvFilter, Layer, Registry, filter::Targets, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _,
};

/// The installed log filter, which a config reload replaces when
/// `log.level` changed (and `RUST_LOG` does not override it).
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Replaces the log filter with `level` (`log.level`'s syntax). Does
/// nothing when `RUST_LOG` sets the filter or [`init`] did not install
/// one; says whether it changed anything.
///
/// # Errors
///
/// `level` is not a log filter (validation refuses such a config first).
pub(crate) fn set_log_level(level: &str) -> Result<bool, String> {
    if std::env::var(EnvFilter::DEFAULT_ENV).is_ok_and(|v| !v.trim().is_empty()) {
        return Ok(false);
    }
    let Some(handle) = LOG_FILTER.get() else {
        return Ok(false);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(true)
}

use crate::config::{LogConfig, LogFormat, TraceConfig};

/// Keeps the OpenTelemetry exporter alive; dropping it flushes the spans
/// still buffered.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("sluice: flushing spans failed: {e}");
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("cannot set up OTLP export: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A log filter (`log.level`, or `RUST_LOG` which overrides it) does
    /// not parse.
    #[error("{source_name}: {filter:?} is not a log filter ({message})")]
    Filter {
        /// Where the filter came from.
        source_name: &'static str,
        /// The filter as given.
        filter: String,
        /// Why it does not parse.
        message: String,
    },
}

/// Installs the global subscriber: log lines to stderr, and (when
/// `trace.otlp_endpoint` is set) each call's span exported over OTLP/HTTP.
/// `RUST_LOG`, when set and not empty, overrides the config's log level;
/// a filter that does not parse (either) is an error.
/// Calling it twice leaves the first subscriber in place.
///
/// Call it outside any tokio runtime: the exporter runs its own thread.
///
/// # Errors
///
/// [`TelemetryError`] when the log filter does not parse or the OTLP
/// exporter cannot be built.
pub fn init(log: &LogConfig, trace: &TraceConfig) -> Result<TelemetryGuard, TelemetryError> {
    // An empty RUST_LOG counts as unset: it must not silence the one log
    // line that says where sluice listens.
    let (source_name, text) = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(v) if !v.trim().is_empty() => ("RUST_LOG", v),
        _ => ("log.level", log.level.clone()),
    };
    // A filter that does not parse is an error, never a silent `info`.
    let filter = EnvFilter::try_new(&text).map_err(|e| TelemetryError::Filter {
        source_name,
        filter: text.clone(),
        message: e.to_string(),
    })?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match log.format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .with_filter(filter),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        ),
    };
    let mut guard = TelemetryGuard::default();
    let otel = match &trace.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.0.clone())
                .build()?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(trace.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("sluice");
            guard.provider = Some(provider);
            // Call spans are DEBUG so that logs stay quiet; the exporter
            // takes them whatever the log level.
            let calls = Targets::new().with_target("sluice::telemetry::trace", Level::DEBUG);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(calls),
            )
        }
    };
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set(handle);
    }
    Ok(guard)
}
