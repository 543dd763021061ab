//! `AppError`: every failure a caller can see, with its stable reason, mapped in one table to a
//! gRPC status (plus `google.rpc` details) and to the REST body `{"error": {"code", "detail"}}`.

use std::{collections::HashMap, time::Duration};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every `google.rpc.ErrorInfo` we send.
pub const ERROR_DOMAIN: &str = "crm.v1";

/// Declares `Reason` and the list of all its variants from one list of names.
macro_rules! reasons {
    ($($variant:ident),* $(,)?) => {
        /// The stable reasons of api.md. The string form is the contract; the enum keeps it
        /// typo-free.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant),*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];
        }
    };
}

reasons!(
    ServiceTokenRequired,
    ServiceTokenInvalid,
    ServiceNotAllowed,
    Forbidden,
    AuthRequired,
    TokenInvalid,
    TokenExpired,
    InvalidCredentials,
    RefreshTokenInvalid,
    ValidationFailed,
    IdempotencyKeyRequired,
    IdempotencyKeyInvalid,
    NotFound,
    AlreadyExists,
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidState,
    RateLimited,
    Unavailable,
    Internal,
);

impl Reason {
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// The one table: reason -> (wire name, gRPC code, HTTP status).
    const fn spec(self) -> (&'static str, Code, StatusCode) {
        use Reason::*;
        match self {
            // 403 on REST for the bots' existing contract, although gRPC says UNAUTHENTICATED.
            ServiceTokenRequired => (
                "SERVICE_TOKEN_REQUIRED",
                Code::Unauthenticated,
                StatusCode::FORBIDDEN,
            ),
            ServiceTokenInvalid => (
                "SERVICE_TOKEN_INVALID",
                Code::Unauthenticated,
                StatusCode::FORBIDDEN,
            ),
            ServiceNotAllowed => (
                "SERVICE_NOT_ALLOWED",
                Code::PermissionDenied,
                StatusCode::FORBIDDEN,
            ),
            Forbidden => ("FORBIDDEN", Code::PermissionDenied, StatusCode::FORBIDDEN),
            AuthRequired => (
                "AUTH_REQUIRED",
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            TokenInvalid => (
                "TOKEN_INVALID",
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            TokenExpired => (
                "TOKEN_EXPIRED",
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            InvalidCredentials => (
                "INVALID_CREDENTIALS",
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            RefreshTokenInvalid => (
                "REFRESH_TOKEN_INVALID",
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            ValidationFailed => (
                "VALIDATION_FAILED",
                Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
            ),
            IdempotencyKeyRequired => (
                "IDEMPOTENCY_KEY_REQUIRED",
                Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
            ),
            IdempotencyKeyInvalid => (
                "IDEMPOTENCY_KEY_INVALID",
                Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
            ),
            NotFound => ("NOT_FOUND", Code::NotFound, StatusCode::NOT_FOUND),
            AlreadyExists => ("ALREADY_EXISTS", Code::AlreadyExists, StatusCode::CONFLICT),
            IdempotencyKeyInProgress => (
                "IDEMPOTENCY_KEY_IN_PROGRESS",
                Code::Aborted,
                StatusCode::CONFLICT,
            ),
            IdempotencyKeyReused => (
                "IDEMPOTENCY_KEY_REUSED",
                Code::FailedPrecondition,
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            InvalidState => (
                "INVALID_STATE",
                Code::FailedPrecondition,
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            RateLimited => (
                "RATE_LIMITED",
                Code::ResourceExhausted,
                StatusCode::TOO_MANY_REQUESTS,
            ),
            Unavailable => (
                "UNAVAILABLE",
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            Internal => (
                "INTERNAL",
                Code::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.spec().0
    }

    pub const fn grpc_code(self) -> Code {
        self.spec().1
    }

    pub const fn http_status(self) -> StatusCode {
        self.spec().2
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed rule on one request field, reported as a `google.rpc.BadRequest` violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// An error as the caller sees it. Internal causes are logged once, where the error is turned
/// into a response, and never sent.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Any refusal with a stable reason and a human-readable detail.
    #[error("{reason}: {detail}")]
    Refused { reason: Reason, detail: String },
    /// One violation per failed field.
    #[error("VALIDATION_FAILED: {}", summarize(.0))]
    Validation(Vec<FieldViolation>),
    /// A refusal the caller may retry after the given delay.
    #[error("{reason}: retry after {retry_after:?}")]
    RetryLater {
        reason: Reason,
        retry_after: Duration,
    },
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0:#}")]
    Internal(#[source] anyhow::Error),
}

fn summarize(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl AppError {
    pub fn refused(reason: Reason, detail: impl Into<String>) -> Self {
        Self::Refused {
            reason,
            detail: detail.into(),
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::refused(Reason::NotFound, format!("{what} not found"))
    }

    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Validation(vec![FieldViolation::new(field, description)])
    }

    /// A final outcome is stored for idempotent replay; a transient one (the caller may retry
    /// and succeed) releases the key.
    pub fn is_final(&self) -> bool {
        match self {
            Self::Refused { reason, .. } => !matches!(
                reason,
                Reason::RateLimited | Reason::Unavailable | Reason::Internal
            ),
            Self::Validation(_) => true,
            Self::RetryLater { .. } | Self::Unavailable(_) | Self::Internal(_) => false,
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Self::Refused { reason, .. } | Self::RetryLater { reason, .. } => *reason,
            Self::Validation(_) => Reason::ValidationFailed,
            Self::Unavailable(_) => Reason::Unavailable,
            Self::Internal(_) => Reason::Internal,
        }
    }

    /// The text sent to the caller: never an internal cause.
    pub fn public_detail(&self) -> String {
        match self {
            Self::Refused { detail, .. } => detail.clone(),
            Self::Validation(v) => format!("invalid request: {}", summarize(v)),
            Self::RetryLater { retry_after, .. } => format!(
                "try again in {} s",
                crate::ratelimit::ceil_secs(*retry_after)
            ),
            Self::Unavailable(_) => "the service is temporarily unavailable".to_owned(),
            Self::Internal(_) => "internal error".to_owned(),
        }
    }

    /// Logs server-side failures once, with their cause; refusals are the caller's business.
    fn log(&self) {
        match self {
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error")
            }
            Self::Unavailable(cause) => tracing::warn!(error = %cause, "dependency unavailable"),
            _ => {}
        }
    }

    pub fn into_status(self) -> tonic::Status {
        self.log();
        let reason = self.reason();
        let mut details = ErrorDetails::new();
        details.set_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new());
        match &self {
            Self::Validation(violations) => {
                for v in violations {
                    details.add_bad_request_violation(&v.field, &v.description);
                }
            }
            Self::RetryLater { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
            }
            _ => {}
        }
        let mut status =
            tonic::Status::with_error_details(reason.grpc_code(), self.public_detail(), details);
        if let Self::RetryLater { retry_after, .. } = &self {
            status.metadata_mut().insert(
                "retry-after",
                crate::ratelimit::ceil_secs(*retry_after).into(),
            );
        }
        status
    }
}

/// Built RATE_LIMITED answers by whole seconds to wait: quotas are per minute, so a wait is
/// at most 60 s.
static RATE_LIMITED_ANSWERS: [std::sync::OnceLock<http::HeaderMap>; 61] =
    [const { std::sync::OnceLock::new() }; 61];

impl AppError {
    /// The trailers-only gRPC answer of a refusal. A RATE_LIMITED answer depends only on its
    /// whole seconds to wait, so each is built once and then copied: a flood over quota is
    /// answered for the price of copying a header map.
    pub fn into_grpc_response<B: Default>(self) -> http::Response<B> {
        if let Self::RetryLater {
            reason: Reason::RateLimited,
            retry_after,
        } = &self
        {
            let secs = crate::ratelimit::ceil_secs(*retry_after);
            if let Some(slot) = RATE_LIMITED_ANSWERS.get(secs as usize) {
                let headers = slot.get_or_init(|| {
                    let whole = AppError::RetryLater {
                        reason: Reason::RateLimited,
                        retry_after: Duration::from_secs(secs),
                    };
                    whole.into_status().into_http::<()>().into_parts().0.headers
                });
                let mut response = http::Response::new(B::default());
                *response.headers_mut() = headers.clone();
                return response;
            }
        }
        self.into_status().into_http()
    }
}

impl From<AppError> for tonic::Status {
    fn from(err: AppError) -> Self {
        err.into_status()
    }
}

impl From<sea_orm::DbErr> for AppError {
    fn from(err: sea_orm::DbErr) -> Self {
        if crate::db::is_connection_error(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<sea_orm::TransactionError<AppError>> for AppError {
    fn from(err: sea_orm::TransactionError<AppError>) -> Self {
        match err {
            sea_orm::TransactionError::Connection(db) => db.into(),
            sea_orm::TransactionError::Transaction(app) => app,
        }
    }
}

/// The REST error body of api.md.
#[derive(serde::Serialize)]
struct RestErrorBody<'a> {
    error: RestError<'a>,
}

#[derive(serde::Serialize)]
struct RestError<'a> {
    code: &'a str,
    detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    fields: Vec<RestFieldError<'a>>,
}

#[derive(serde::Serialize)]
struct RestFieldError<'a> {
    field: &'a str,
    description: &'a str,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        self.log();
        let reason = self.reason();
        let fields = match &self {
            Self::Validation(v) => v
                .iter()
                .map(|v| RestFieldError {
                    field: &v.field,
                    description: &v.description,
                })
                .collect(),
            _ => Vec::new(),
        };
        let body = RestErrorBody {
            error: RestError {
                code: reason.as_str(),
                detail: self.public_detail(),
                fields,
            },
        };
        let mut response = (reason.http_status(), Json(body)).into_response();
        // For the request metrics; extensions never reach the wire.
        response.extensions_mut().insert(reason);
        if let Self::RetryLater { retry_after, .. } = &self {
            let secs = crate::ratelimit::ceil_secs(*retry_after);
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_maps_to_the_documented_codes() {
        assert_eq!(
            Reason::ServiceTokenInvalid.http_status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            Reason::ServiceTokenRequired.grpc_code(),
            Code::Unauthenticated
        );
        assert_eq!(Reason::IdempotencyKeyInProgress.grpc_code(), Code::Aborted);
        assert_eq!(
            Reason::InvalidState.http_status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(Reason::RateLimited.as_str(), "RATE_LIMITED");
    }

    #[test]
    fn every_reason_round_trips_through_its_name() {
        assert_eq!(Reason::ALL.len(), 20, "the 20 reasons of api.md");
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
        }
        assert_eq!(Reason::parse("OK"), None);
    }

    #[test]
    fn internal_errors_are_opaque_to_the_caller() {
        let status =
            AppError::Internal(anyhow::anyhow!("disk on fire at /var/secret")).into_status();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert_eq!(
            status.get_details_error_info().map(|i| i.reason),
            Some("INTERNAL".to_owned())
        );
    }

    #[test]
    fn validation_errors_carry_one_violation_per_field() {
        let status = AppError::Validation(vec![
            FieldViolation::new("phone", "must be E.164"),
            FieldViolation::new("language", "must be uz, ru or en"),
        ])
        .into_status();
        let bad = status
            .get_details_bad_request()
            .expect("bad request details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["phone", "language"]);
    }
}
