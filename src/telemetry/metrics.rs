//! Prometheus metrics, rendered on `GET /metrics`.
//!
//! Recording goes through the `metrics` facade (a no-op until [`install`] runs), so domain code
//! records with one line and never holds a registry. Label values are bounded: methods are the
//! served gRPC methods and REST route templates, outcomes are error reasons, providers and
//! statuses are enums.

use std::{
    collections::{HashMap, HashSet},
    sync::{LazyLock, OnceLock, RwLock},
    time::{Duration, Instant},
};

use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message;
use sea_orm::DatabaseConnection;
use tracing::Span;

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

/// How often histogram samples are folded into their buckets when nobody scrapes: the
/// recorder keeps raw samples until then, so without it memory grows with traffic.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Runs the recorder's upkeep every [`UPKEEP_EVERY`] until shutdown.
pub async fn run_upkeep(shutdown: tokio::sync::watch::Receiver<bool>) {
    crate::background::every(UPKEEP_EVERY, "metrics upkeep", shutdown, || async {
        if let Some(handle) = HANDLE.get() {
            handle.run_upkeep();
        }
        Ok::<_, std::convert::Infallible>(())
    })
    .await;
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

/// One count and one latency sample for an answered request, by method and outcome, and the
/// outcome on the request's span. Streams are timed until their headers are sent.
pub fn record_request(method: &'static str, started: Instant, response: &Response, span: &Span) {
    let outcome = outcome(response);
    // For the exported span only: a log span has no such fields (`transport::context`).
    if super::is_exported(span) {
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
    }
    let elapsed = started.elapsed().as_secs_f64();
    match series(method) {
        Some(series) => {
            series.duration.record(elapsed);
            match outcome {
                "OK" => series.ok.increment(1),
                _ => series.refused(method, outcome).increment(1),
            }
        }
        None => {
            metrics::counter!(REQUESTS, "method" => method, "outcome" => outcome).increment(1);
            metrics::histogram!(DURATION, "method" => method).record(elapsed);
        }
    }
}

/// The series every answer of a method touches, registered on its first answer rather than
/// looked up in the registry on each (this runs on every request).
struct MethodSeries {
    ok: metrics::Counter,
    duration: metrics::Histogram,
    /// The other outcomes seen so far (a handful per method).
    refused: RwLock<Vec<(&'static str, metrics::Counter)>>,
}

impl MethodSeries {
    fn refused(&self, method: &'static str, outcome: &'static str) -> metrics::Counter {
        let seen = |list: &[(&'static str, metrics::Counter)]| {
            list.iter()
                .find(|(o, _)| *o == outcome)
                .map(|(_, c)| c.clone())
        };
        if let Some(counter) = self.refused.read().ok().and_then(|list| seen(&list)) {
            return counter;
        }
        let counter = metrics::counter!(REQUESTS, "method" => method, "outcome" => outcome);
        if let Ok(mut list) = self.refused.write()
            && seen(&list).is_none()
        {
            list.push((outcome, counter.clone()));
        }
        counter
    }
}

/// One slot per bounded method label. Filled only by answered requests, which come after
/// [`install`], so no slot holds a handle of the no-op recorder.
static SERIES: LazyLock<HashMap<&'static str, OnceLock<MethodSeries>>> = LazyLock::new(|| {
    GRPC_METHODS
        .iter()
        .copied()
        .chain(REST_LABELS.iter().map(|(_, label)| *label))
        .chain(PREFIX_LABELS.iter().map(|(_, label)| *label))
        .chain([OTHER])
        .map(|label| (label, OnceLock::new()))
        .collect()
});

fn series(method: &'static str) -> Option<&'static MethodSeries> {
    // Before `install` (a unit test), handles would stay no-ops forever: do not keep them.
    HANDLE.get()?;
    let slot = SERIES.get(method)?;
    Some(slot.get_or_init(|| MethodSeries {
        ok: metrics::counter!(REQUESTS, "method" => method, "outcome" => "OK"),
        duration: metrics::histogram!(DURATION, "method" => method),
        refused: RwLock::default(),
    }))
}

/// "OK", or the error reason of the answer (from the REST error, or from the gRPC status
/// details of a trailers-only answer).
fn outcome(response: &Response) -> &'static str {
    if let Some(reason) = response.extensions().get::<Reason>() {
        return reason.as_str();
    }
    let headers = response.headers();
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    if let Some(code) = headers.get(&GRPC_STATUS) {
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

/// REST routes by exact path, and their labels.
const REST_LABELS: &[(&str, &str)] = &[
    ("/webhooks/payme", "/webhooks/payme"),
    ("/webhooks/click/prepare", "/webhooks/click/prepare"),
    ("/webhooks/click/complete", "/webhooks/click/complete"),
    ("/healthz", "/healthz"),
    ("/readyz", "/readyz"),
    ("/metrics", "/metrics"),
];

/// Route families by path prefix, and their labels.
const PREFIX_LABELS: &[(&str, &str)] = &[
    ("/webhooks/uzum/", "/webhooks/uzum/{action}"),
    ("/api/v1/", "/api/v1/{service}/application"),
    ("/grpc.health.v1.Health/", "/grpc.health.v1.Health"),
    ("/grpc.reflection.", "/grpc.reflection"),
];

const OTHER: &str = "other";

/// A bounded label for a path: a served gRPC method, a REST route template, or "other".
pub fn method_label(path: &str) -> &'static str {
    if let Some(known) = GRPC_METHODS.get(path) {
        return known;
    }
    if let Some((_, label)) = REST_LABELS.iter().find(|(p, _)| *p == path) {
        return label;
    }
    let legacy = |p: &str| !p.starts_with("/api/v1/") || p.ends_with("/application");
    PREFIX_LABELS
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix) && legacy(path))
        .map_or(OTHER, |(_, label)| label)
}

pub fn rate_limited(scope: Scope) {
    static BY_SCOPE: [OnceLock<metrics::Counter>; Scope::ALL.len()] =
        [const { OnceLock::new() }; Scope::ALL.len()];
    if HANDLE.get().is_none() {
        // Not installed (a unit test): nothing to keep a handle of.
        return;
    }
    BY_SCOPE[scope as usize]
        .get_or_init(|| metrics::counter!("crm_rate_limited_total", "scope" => scope.as_str()))
        .increment(1);
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
        assert_eq!(method_label("/api/v1/bot1/other"), "other");
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health"
        );
    }
}
