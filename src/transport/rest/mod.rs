//! REST routes: the bots' legacy submit route and the operators' health probes. Payment
//! provider webhooks join here in their own modules.

pub mod health;
pub mod legacy;
pub mod web;

use axum::{
    Router,
    response::{IntoResponse, Response},
    routing::{any, get, post},
};

use crate::{
    error::{AppError, Reason},
    state::AppState,
};

/// The legacy route's body limit (security.md).
pub const LEGACY_BODY_LIMIT: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/api/v1/{service}/application",
            post(legacy::submit).layer(axum::extract::DefaultBodyLimit::max(LEGACY_BODY_LIMIT)),
        )
        // Any HTTP method: Payme's protocol answers a non-POST with -32300, in HTTP 200.
        .route("/webhooks/payme", any(crate::payments::payme::webhook))
        .route(
            "/webhooks/click/prepare",
            any(crate::payments::click::prepare),
        )
        .route(
            "/webhooks/click/complete",
            any(crate::payments::click::complete),
        )
        .route(
            "/webhooks/uzum/{action}",
            any(crate::payments::uzum::webhook),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        // The web app (web/dist, embedded): the page and its two assets; anything else 404s.
        .route("/", get(web::index))
        .route("/app.js", get(web::script))
        .route("/app.css", get(web::style))
        .with_state(state)
}

/// Kept from the previous system: a query string carrying script is refused before routing
/// (`Dispatch` asks this of every REST request; `None` lets it through). REST routes take no
/// query parameters, so nothing legitimate is lost. Synchronous on purpose: a middleware of
/// its own would box a future and clone the router on every call, query or not.
pub fn refuse_script_query(uri: &http::Uri) -> Option<Response> {
    let decoded = percent_decode(uri.query()?).to_ascii_lowercase();
    if !(decoded.contains("<script") || decoded.contains("javascript:")) {
        return None;
    }
    // Providers get every refusal in their own format.
    Some(
        provider_refusal(uri.path(), ProviderRefusal::Malformed).unwrap_or_else(|| {
            AppError::refused(Reason::ValidationFailed, "query string refused").into_response()
        }),
    )
}

/// Why a provider route refuses a request before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderRefusal {
    /// Too large, or refused by a filter: the provider's "bad request".
    Malformed,
    /// Our side could not answer in time: the provider's "internal error, try again".
    Failed,
}

/// The refusal in the provider's own format, when `path` is a provider webhook (api.md).
pub fn provider_refusal(path: &str, refusal: ProviderRefusal) -> Option<Response> {
    use crate::payments::{click, payme, uzum};
    let malformed = refusal == ProviderRefusal::Malformed;
    if path == "/webhooks/payme" {
        let code = if malformed {
            payme::wire::INVALID_REQUEST
        } else {
            payme::wire::INTERNAL
        };
        let rpc = payme::wire::RpcError::new(code);
        return Some(axum::Json(rpc.into_body(&serde_json::Value::Null)).into_response());
    }
    if path.starts_with("/webhooks/click/") {
        let code = if malformed {
            click::wire::BAD_REQUEST
        } else {
            click::wire::UPDATE_FAILED
        };
        let answer = click::wire::answer(&click::wire::Fields::new(), code, None);
        return Some(axum::Json(answer).into_response());
    }
    if path.starts_with("/webhooks/uzum/") {
        let code = if malformed {
            uzum::JSON_ERROR
        } else {
            uzum::INTERNAL
        };
        return Some(uzum::failed(&serde_json::Value::Null, code).into_response());
    }
    None
}

/// Decodes `%XX` escapes and `+`, repeatedly, so double encoding does not hide anything.
fn percent_decode(s: &str) -> String {
    let mut current = s.replace('+', " ");
    for _ in 0..3 {
        let bytes = current.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
            {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        let next = String::from_utf8_lossy(&out).into_owned();
        if next == current {
            break;
        }
        current = next;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn nested_percent_encoding_is_decoded() {
        assert_eq!(percent_decode("a=%3Cscript%3E"), "a=<script>");
        assert_eq!(percent_decode("a=%253Cscript"), "a=<script");
        assert_eq!(
            percent_decode("x=javascript%3Aalert(1)"),
            "x=javascript:alert(1)"
        );
        assert_eq!(percent_decode("q=%"), "q=%");
    }
}
