//! Prometheus metrics, rendered on `GET /metrics`.
//!
//! Recording goes through the `metrics` facade (a no-op until [`install`] runs), so domain code
//! records with one line and never holds a registry. Label values are bounded: methods are the
//! served gRPC methods and REST route templates, outcomes are error reasons, providers and
//! statuses are enums.

use std::{
    collections::HashSet,
    sync::{LazyLock, OnceLock},
    time::Instant,
};

use axum::{extract::Request, middleware::Next, response::Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message;
use sea_orm::DatabaseConnection;

use crate::{error::Reason, ratelimit::Scope};

const REQUESTS: &str = "crm_requests_total";
const DURATION: &str = "crm_request_duration_seconds";
/// Latency buckets, in seconds: from a cached read to the request deadline.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once; later calls (several servers in one test process)
/// share it.
pub fn install() -> anyhow::Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DURATION.into()), BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle);
        metrics::gauge!("crm_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    }
    Ok(())
}

/// The text exposition, with the database pool gauges read now.
pub fn render(db: &DatabaseConnection) -> String {
    let (size, idle) = pool_usage(db);
    metrics::gauge!("crm_db_pool_connections", "state" => "idle").set(f64::from(idle));
    metrics::gauge!("crm_db_pool_connections", "state" => "in_use")
        .set(f64::from(size.saturating_sub(idle)));
    match HANDLE.get() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

fn pool_usage(db: &DatabaseConnection) -> (u32, u32) {
    match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        sea_orm::DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        _ => (0, 0),
    }
}

/// Axum middleware: one count and one latency sample per request, by method and outcome.
/// Streams are timed until their headers are sent.
pub async fn record_requests(req: Request, next: Next) -> Response {
    let method = method_label(req.uri().path());
    let started = Instant::now();
    let response = next.run(req).await;
    let outcome = outcome(&response);
    let span = tracing::Span::current();
    span.record("outcome", outcome);
    match response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        Some(code) => span.record("status", code),
        None => span.record("status", response.status().as_u16()),
    };
    if outcome != "OK" {
        span.record("otel.status_code", "ERROR");
    }
    metrics::counter!(REQUESTS, "method" => method, "outcome" => outcome).increment(1);
    metrics::histogram!(DURATION, "method" => method).record(started.elapsed().as_secs_f64());
    response
}

/// "OK", or the error reason of the answer (from the REST error, or from the gRPC status
/// details of a trailers-only answer).
fn outcome(response: &Response) -> &'static str {
    if let Some(reason) = response.extensions().get::<Reason>() {
        return reason.as_str();
    }
    let headers = response.headers();
    if let Some(code) = headers.get("grpc-status") {
        if code.as_bytes() == b"0" {
            return "OK";
        }
        return tonic::Status::from_header_map(headers)
            .and_then(|status| grpc_reason(&status))
            .unwrap_or("GRPC_ERROR");
    }
    match response.status().as_u16() {
        0..400 => "OK",
        404 => Reason::NotFound.as_str(),
        413 | 431 => Reason::ValidationFailed.as_str(),
        _ => "HTTP_ERROR",
    }
}

fn grpc_reason(status: &tonic::Status) -> Option<&'static str> {
    let details = tonic_types::pb::Status::decode(status.details()).ok()?;
    details.details.iter().find_map(|any| {
        let info = tonic_types::pb::ErrorInfo::decode(any.value.as_slice()).ok()?;
        Reason::parse(&info.reason).map(Reason::as_str)
    })
}

/// The served gRPC methods, from our descriptor set (leaked once: a few dozen short strings).
static GRPC_METHODS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    let mut methods = HashSet::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let name = service.name.unwrap_or_default();
            for method in service.method {
                let method = method.name.unwrap_or_default();
                let path = format!("/{package}.{name}/{method}");
                methods.insert(&*Box::leak(path.into_boxed_str()));
            }
        }
    }
    methods
});

/// A bounded label for a path: a served gRPC method, a REST route template, or "other".
pub fn method_label(path: &str) -> &'static str {
    const REST: &[(&str, &str)] = &[
        ("/webhooks/payme", "/webhooks/payme"),
        ("/webhooks/click/prepare", "/webhooks/click/prepare"),
        ("/webhooks/click/complete", "/webhooks/click/complete"),
        ("/healthz", "/healthz"),
        ("/readyz", "/readyz"),
        ("/metrics", "/metrics"),
    ];
    if let Some(known) = GRPC_METHODS.get(path) {
        return known;
    }
    if let Some((_, label)) = REST.iter().find(|(p, _)| *p == path) {
        return label;
    }
    if path.starts_with("/webhooks/uzum/") {
        return "/webhooks/uzum/{action}";
    }
    if path.starts_with("/api/v1/") && path.ends_with("/application") {
        return "/api/v1/{service}/application";
    }
    if path.starts_with("/grpc.health.v1.Health/") {
        return "/grpc.health.v1.Health";
    }
    if path.starts_with("/grpc.reflection.") {
        return "/grpc.reflection";
    }
    "other"
}

pub fn rate_limited(scope: Scope) {
    metrics::counter!("crm_rate_limited_total", "scope" => scope.as_str()).increment(1);
}

pub fn webhook_call(provider: &'static str, result: &str) {
    metrics::counter!("crm_webhook_calls_total", "provider" => provider, "result" => result.to_owned())
        .increment(1);
}

pub fn payment(provider: &'static str, status: &'static str) {
    metrics::counter!("crm_payments_total", "provider" => provider, "status" => status)
        .increment(1);
}

pub fn idempotency_replay(method: &str) {
    metrics::counter!("crm_idempotency_replays_total", "method" => method_label(method))
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label("/crm.v1.AuthService/Login"),
            "/crm.v1.AuthService/Login"
        );
        assert_eq!(method_label("/crm.v1.AuthService/Nope"), "other");
        assert_eq!(
            method_label("/api/v1/bot1/application"),
            "/api/v1/{service}/application"
        );
        assert_eq!(
            method_label("/webhooks/uzum/check"),
            "/webhooks/uzum/{action}"
        );
        assert_eq!(method_label("/random"), "other");
    }
}
