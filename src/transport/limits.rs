//! Limits every route shares, whatever the protocol: the total size of the request headers
//! and the request deadline, both enforced by the context layer (`transport::context`).
//! Refusals are answered in the caller's own protocol: a gRPC status to gRPC (and gRPC-web)
//! callers, the provider's format on webhook routes, and the JSON error body elsewhere.
//!
//! Body limits live with each route (gRPC's decode limit, the REST routes' own), and the
//! HTTP/2 header-list limit is also set on the connection, so oversized headers are refused
//! before they are even buffered when the client speaks HTTP/2.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::{
    error::{AppError, Reason},
    transport::rest::{ProviderRefusal, provider_refusal},
};

/// Request headers, in total (security.md).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    HeaderSize,
    Deadline,
}

/// The answer to a request refused by `exceeded`, in the caller's protocol: gRPC callers get a
/// status, provider routes (`path`, kept only for them) their format, others the JSON error.
pub fn refusal(exceeded: Exceeded, is_grpc: bool, path: Option<&str>) -> Response {
    match exceeded {
        Exceeded::HeaderSize => refuse(
            path,
            is_grpc,
            AppError::refused(Reason::ValidationFailed, "request headers exceed 8 KiB"),
            ProviderRefusal::Malformed,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
        Exceeded::Deadline => refuse(
            path,
            is_grpc,
            AppError::Unavailable("request deadline exceeded".into()),
            ProviderRefusal::Failed,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    }
}

fn refuse(
    path: Option<&str>,
    is_grpc: bool,
    error: AppError,
    refusal: ProviderRefusal,
    rest_status: StatusCode,
) -> Response {
    if is_grpc {
        return error.into_status().into_http();
    }
    if let Some(answer) = path.and_then(|path| provider_refusal(path, refusal)) {
        return answer;
    }
    let mut response = error.into_response();
    *response.status_mut() = rest_status;
    response
}

/// Header bytes as HTTP/2 counts them for `SETTINGS_MAX_HEADER_LIST_SIZE`: name, value and 32
/// bytes per field.
pub fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}
