//! The OTLP trace exporter, configured only by the standard `OTEL_*` variables, and W3C trace
//! context taken from incoming headers (gRPC metadata are headers too).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, hyper::HyperClient};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `None` when no endpoint is configured: export is off. Spans go through the SDK's batch
/// processor, which drops spans when its queue is full rather than slowing requests down.
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
    Ok(Some(
        SdkTracerProvider::builder()
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

/// Whether spans are exported (set once at start); without export, trace context is only
/// read from the `traceparent` header and nothing else is done per request.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(super) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes the caller's `traceparent` (if any) the parent of `span`.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !EXPORTING.load(Ordering::Relaxed) || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The trace id of `span` when spans are exported (lower-case hex), else `None`.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
