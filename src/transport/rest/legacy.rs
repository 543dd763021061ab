//! `POST /api/v1/{service}/application`: the route the bots use today. The same submit as the
//! gRPC method, with the bots' existing contract: `X-SERVICE-TOKEN`, `201 Created` and the
//! application as JSON, 403 with `SERVICE_TOKEN_REQUIRED`/`SERVICE_TOKEN_INVALID`.

use std::collections::BTreeMap;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::{
    applications::{Application, SubmitInput},
    audit::Actor,
    auth::{Principal, ServiceName, layer::SERVICE_TOKEN_HEADER},
    error::{AppError, FieldViolation, Reason},
    ratelimit::{self, Scope},
    state::AppState,
    transport::context::{RequestContext, record_principal},
};

const ACTION: &str = "POST /api/v1/{service}/application";

/// The application as the bots read it: enum values by short name, RFC 3339 times.
#[derive(Debug, Serialize)]
pub struct ApplicationJson {
    id: String,
    full_name: String,
    phone: String,
    email: Option<String>,
    telegram_user_id: Option<i64>,
    telegram_username: Option<String>,
    program_code: Option<String>,
    language: &'static str,
    answers: BTreeMap<String, String>,
    source: String,
    status: &'static str,
    note: String,
    created_at: String,
    updated_at: String,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl From<Application> for ApplicationJson {
    fn from(a: Application) -> Self {
        Self {
            id: a.id,
            full_name: a.full_name,
            phone: a.phone,
            email: a.email,
            telegram_user_id: a.telegram_user_id,
            telegram_username: a.telegram_username,
            program_code: a.program_code,
            language: a.language.as_str(),
            answers: a.answers,
            source: a.source,
            status: a.status.as_str(),
            note: a.note,
            created_at: rfc3339(a.created_at),
            updated_at: rfc3339(a.updated_at),
        }
    }
}

pub async fn submit(
    State(state): State<AppState>,
    Path(service): Path<String>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = headers
        .get(SERVICE_TOKEN_HEADER)
        .map(|v| v.to_str().unwrap_or_default());
    let caller = state.auth.verify_service(raw, ctx.received_at);
    if let Ok(service) = &caller {
        record_principal("service", service.as_str());
    }
    // The same bucket as the gRPC method: the service, or the address of a caller without one.
    let principal = caller.as_ref().ok().cloned().map(Principal::Service);
    let subject = ratelimit::subject(principal.as_ref(), ctx.client_ip);
    let verdict = state.limiter.check(Scope::General, &subject).await;
    let mut response = match verdict.and_then(|v| v.refusal()) {
        Some(rate_limited) => rate_limited.into_response(),
        None => match caller {
            Ok(caller) => submit_as(&state, caller, &service, &ctx, &body)
                .await
                .into_response(),
            Err(refused) => {
                state.auth.audit_token_refusal(ACTION, &refused, &ctx);
                refused.into_response()
            }
        },
    };
    if let Some(verdict) = verdict {
        verdict.write_headers(response.headers_mut());
    }
    response
}

async fn submit_as(
    state: &AppState,
    caller: ServiceName,
    service: &str,
    ctx: &RequestContext,
    body: &[u8],
) -> Result<(StatusCode, Json<ApplicationJson>), AppError> {
    if caller.as_str() != service {
        // A token of another service: refused exactly like an unknown token (the bots' contract).
        state
            .auth
            .audit_refusal(ACTION, Reason::ServiceTokenInvalid, ctx);
        return Err(AppError::refused(
            Reason::ServiceTokenInvalid,
            "invalid service token",
        ));
    }
    // The body is `SubmitApplicationRequest`'s fields in snake_case; unknown fields are
    // ignored, as the previous server did.
    let input: SubmitInput = serde_json::from_slice(body).map_err(|e| {
        AppError::Validation(vec![FieldViolation::new(
            "body",
            format!("not a valid JSON application: {e}"),
        )])
    })?;
    let actor = Actor::from_request(Some(&Principal::Service(caller.clone())), ctx);
    let app = state.applications.submit(&caller, &actor, input).await?;
    Ok((StatusCode::CREATED, Json(app.into())))
}
