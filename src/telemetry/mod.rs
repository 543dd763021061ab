//! Telemetry: logs to standard error (pretty or JSON, filtered by `RUST_LOG`), OTLP trace
//! export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`otel`), and Prometheus metrics
//! (`metrics`). Each request runs in one server span made by the context layer
//! (`transport::context`), so every log line of a request carries its request and trace ids.

pub mod metrics;
mod otel;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt as _, dynamic_filter_fn},
    fmt,
    prelude::*,
};

use crate::config::LogFormat;

pub use otel::{
    EXPORTED_TARGET, Sampling, TRACEPARENT, is_exported, sample, set_parent, trace_id_of,
};

/// Noisy dependencies are held at `warn` unless `RUST_LOG` names them (so database spans are
/// exported only when asked for, at debug level).
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,h2=warn,hyper=warn,tower=warn";

/// Keeps the trace exporter alive; `shutdown` flushes what is queued.
#[must_use]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("crm-server: flushing traces failed: {e}");
        }
    }
}

/// Installs the process-wide subscriber. Call it inside the tokio runtime: the gRPC exporter
/// lives on it. A second call (tests start many servers in one process) keeps the first.
///
/// Logs and exported spans are filtered apart: `RUST_LOG` decides what is logged, and spans
/// are exported at `DEFAULT_FILTER` plus whatever dependency `RUST_LOG` names (so
/// `RUST_LOG=warn` keeps logs quiet without turning traces off).
pub fn init(format: LogFormat) -> Telemetry {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    let log_filter = EnvFilter::try_new(&rust_log)
        .ok()
        .filter(|_| !rust_log.trim().is_empty())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let tracer_provider = match otel::tracer_provider() {
        Ok(provider) => provider,
        Err(e) => {
            eprintln!("crm-server: OpenTelemetry export is off: {e:#}");
            None
        }
    };
    // Without export, `RUST_LOG` filters the whole subscriber: what it turns off is never even
    // built. With export, each layer filters for itself. Two traps avoided here: an absent
    // `Option` layer counts as a layer that wants everything (every request's span would be
    // built for nobody), and a lone per-layer filter loses the event that follows a
    // `tracing::enabled!` query it refused (sqlx asks one for each PostgreSQL notice).
    let registry = tracing_subscriber::registry();
    let _ = match &tracer_provider {
        None => registry.with(log_filter).with(log_layer(format)).try_init(),
        Some(provider) => registry
            .with(log_layer(format).with_filter(log_filter))
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
                    .with_filter(trace_filter(&rust_log)),
            )
            .try_init(),
    };
    Telemetry { tracer_provider }
}

/// Log lines to standard error, pretty or JSON (each carrying its request span's ids).
fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let logs = fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => logs.boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// What is exported: the spans of sampled requests (`otel::sample` decided when the request
/// arrived) and what happens inside them, our spans and events at `info` whatever the log
/// level, dependencies at `warn` unless `RUST_LOG` names them (`sqlx=debug` exports database
/// spans).
fn trace_filter<S>(rust_log: &str) -> impl tracing_subscriber::layer::Filter<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let levels = rust_log
        .split(',')
        .filter(|directive| directive.contains('='))
        .filter_map(|directive| directive.trim().parse().ok())
        .fold(EnvFilter::new(DEFAULT_FILTER), EnvFilter::add_directive);
    // `lookup_current` sees only spans this filter admitted: inside an unsampled request
    // there is none, so nothing of it reaches the trace layer.
    let sampled = dynamic_filter_fn(|meta, cx| {
        meta.target() == EXPORTED_TARGET || cx.lookup_current().is_some()
    });
    levels.and(sampled)
}
