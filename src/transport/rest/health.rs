//! `/healthz` (the process is up), `/readyz` (the database answers) and `/metrics`.

use std::time::Duration;

use axum::{Json, extract::State, response::IntoResponse};
use serde_json::json;

use crate::{error::AppError, state::AppState};

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, AppError> {
    if state.is_shutting_down() {
        return Err(AppError::Unavailable("shutting down".into()));
    }
    match tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({"status": "ready"}))),
        Ok(Err(e)) => Err(AppError::Unavailable(e.to_string())),
        Err(_) => Err(AppError::Unavailable("database ping timed out".into())),
    }
}

/// Prometheus text format (exempt from quotas, like the probes).
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics::render(&state.db),
    )
}
