//! Limits every route shares, whatever the protocol: the total size of the request headers
//! and the request deadline. Refusals are answered in the caller's own protocol: a gRPC
//! status to gRPC (and gRPC-web) callers, the provider's format on webhook routes, and the
//! JSON error body elsewhere.
//!
//! Body limits live with each route (gRPC's decode limit, the REST routes' own), and the
//! HTTP/2 header-list limit is also set on the connection, so oversized headers are refused
//! before they are even buffered when the client speaks HTTP/2.

use std::time::Duration;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::StatusCode;

use crate::{
    error::{AppError, Reason},
    transport::rest::{ProviderRefusal, provider_refusal},
};

/// Request headers, in total (security.md).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Refuses oversized headers, then runs the request under the deadline. A streaming response
/// is bounded only until its headers are sent; the stream itself may run on.
pub async fn enforce(State(deadline): State<Duration>, req: Request, next: Next) -> Response {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = req.uri().path().to_owned();
    if header_bytes(req.headers()) > MAX_HEADER_BYTES {
        let error = AppError::refused(Reason::ValidationFailed, "request headers exceed 8 KiB");
        let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        return refuse(&path, is_grpc, error, ProviderRefusal::Malformed, status);
    }
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(path, ?deadline, "request deadline exceeded");
            let error = AppError::Unavailable("request deadline exceeded".into());
            let status = StatusCode::SERVICE_UNAVAILABLE;
            refuse(&path, is_grpc, error, ProviderRefusal::Failed, status)
        }
    }
}

fn refuse(
    path: &str,
    is_grpc: bool,
    error: AppError,
    refusal: ProviderRefusal,
    rest_status: StatusCode,
) -> Response {
    if is_grpc {
        return error.into_status().into_http();
    }
    if let Some(answer) = provider_refusal(path, refusal) {
        return answer;
    }
    let mut response = error.into_response();
    *response.status_mut() = rest_status;
    response
}

/// Header bytes as HTTP/2 counts them for `SETTINGS_MAX_HEADER_LIST_SIZE`: name, value and 32
/// bytes per field.
fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}
