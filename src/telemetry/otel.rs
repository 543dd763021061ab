//! The OTLP trace exporter, configured only by the standard `OTEL_*` variables, and W3C trace
//! context taken from incoming headers (gRPC metadata are headers too).

use std::sync::OnceLock;

use anyhow::{Context as _, bail};
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{SpanKind, TraceContextExt},
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, hyper::HyperClient};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{
        Config, IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracerProvider,
        ShouldSample,
    },
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `None` when no endpoint is configured: export is off. Spans go through the SDK's batch
/// processor, which drops spans when its queue is full rather than slowing requests down.
///
/// The sampler of `OTEL_TRACES_SAMPLER`/`_ARG` (as the SDK reads them) is kept for
/// [`sample`], which decides before a request's span exists; the provider itself records
/// every span it is given (`AlwaysOn`), since only sampled requests give it one.
pub(super) fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let Some(endpoint) =
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(None);
    };
    let protocol = set("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "grpc".into());
    let exporter = match protocol.as_str() {
        "grpc" => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_http_client(OnRuntime::current()?)
            .build(),
        other => bail!("OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not grpc or http/protobuf"),
    }
    .context("cannot build the OTLP exporter")?;
    let mut resource = Resource::builder();
    if set("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(env!("CARGO_PKG_NAME"));
    }
    let _ = SAMPLER.set(Config::default().sampler);
    Ok(Some(
        SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOn)
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// The SDK exports from a thread of its own, outside the tokio runtime, where hyper finds no
/// reactor (every export failed with "there is no reactor running"). This client hands each
/// export to the runtime that was current when it was built.
#[derive(Debug)]
struct OnRuntime {
    client: HyperClient,
    runtime: tokio::runtime::Handle,
}

/// `OTEL_EXPORTER_OTLP_TIMEOUT`'s default.
const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl OnRuntime {
    fn current() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("the http/protobuf exporter must be built inside the tokio runtime")?;
        Ok(Self {
            client: HyperClient::with_default_connector(EXPORT_TIMEOUT, None),
            runtime,
        })
    }
}

#[tonic::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as HttpError)?
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// W3C trace context's header. Names looked up as `&str` are parsed on every lookup.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The configured sampler, set once when export is on (and only then).
static SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

/// The tracing target of the request spans that are exported: the trace layer's filter
/// admits these and what happens inside them, nothing else (`super::trace_filter`).
pub const EXPORTED_TARGET: &str = "crm_server::exported";

/// Whether `span` is an exported request span (the others serve the logs only).
pub fn is_exported(span: &tracing::Span) -> bool {
    span.metadata()
        .is_some_and(|meta| meta.target() == EXPORTED_TARGET)
}

/// A request's sampling decision, taken when it arrives.
pub enum Sampling {
    /// Export is off.
    Off,
    /// Not sampled: the request gets a span for its logs only, which the trace layer never
    /// sees (building exported span data for every request cost half of P1's throughput).
    Dropped,
    /// Sampled: the request's span is exported, as a child of the caller's span if any.
    Exported(Option<opentelemetry::Context>),
}

/// Decides whether a request's span is exported, with the configured sampler: the caller's
/// W3C `traceparent` is the parent (so `parentbased_*` follows its sampled flag), and a
/// request without one is a root, decided on a fresh trace id (the ratio samplers draw on
/// it; the exported span gets its own, equally random).
pub fn sample(headers: &http::HeaderMap, name: &str) -> Sampling {
    let Some(sampler) = SAMPLER.get() else {
        return Sampling::Off;
    };
    let parent = headers
        .contains_key(&TRACEPARENT)
        .then(|| TraceContextPropagator::new().extract(&Headers(headers)))
        .filter(|parent| parent.span().span_context().is_valid());
    let trace_id = match &parent {
        Some(parent) => parent.span().span_context().trace_id(),
        None => RandomIdGenerator::default().new_trace_id(),
    };
    let decision = sampler
        .should_sample(parent.as_ref(), trace_id, name, &SpanKind::Server, &[], &[])
        .decision;
    match decision {
        SamplingDecision::RecordAndSample => Sampling::Exported(parent),
        SamplingDecision::Drop | SamplingDecision::RecordOnly => Sampling::Dropped,
    }
}

/// Makes `parent` (the caller's span) the parent of an exported request span.
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    let _ = span.set_parent(parent);
}

/// The trace id of an exported span (lower-case hex).
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
