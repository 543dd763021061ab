//! `POST /webhooks/uzum/{check,create,confirm,reverse,status}`: the Uzum Bank Merchant API
//! (providers.md §3 and its Decisions). HTTP Basic plus `serviceId` on every call, an optional
//! HMAC-SHA256 `X-Signature`; failures are HTTP 400 with `status: "FAILED"` and a string
//! `errorCode`; replays answer their own codes with no second effect.

use std::time::Duration;

use axum::{
    Extension, Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode},
};
use hmac::{Hmac, KeyInit, Mac};
use sea_orm::{ActiveModelTrait, EntityTrait, Set};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::telemetry::metrics;
use crate::{
    audit::{Actor, AuditEvent},
    db::{
        self,
        entities::{invoice, provider_transaction as ptx},
    },
    error::AppError,
    payments::{InvoiceStatus, Provider, ProviderOutcome, checkout::som, transactions},
    state::AppState,
    transport::context::RequestContext,
};

pub const BODY_LIMIT: usize = 64 * 1024;
/// A CREATED transaction not confirmed within this is failed by the sweep (Decisions).
pub const EXPIRY: Duration = Duration::from_secs(30 * 60);

const ACCESS_DENIED: &str = "10001";
pub const JSON_ERROR: &str = "10002";
const BAD_OPERATION: &str = "10003";
const MISSING_PARAMS: &str = "10005";
const BAD_SERVICE: &str = "10006";
const ORDER_NOT_FOUND: &str = "10007";
const ALREADY_PAID: &str = "10008";
const ORDER_CANCELLED: &str = "10009";
const ALREADY_CREATED: &str = "10010";
const BAD_AMOUNT: &str = "10011";
const TX_NOT_FOUND: &str = "10014";
const TX_CANCELLED: &str = "10015";
const ALREADY_CONFIRMED: &str = "10016";
const CANNOT_REVERSE: &str = "10017";
const ALREADY_REVERSED: &str = "10018";
pub const INTERNAL: &str = "99999";

type Answer = (StatusCode, Json<Value>);

fn ms(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn failed(service_id: &Value, code: &str) -> Answer {
    (
        StatusCode::BAD_REQUEST,
        Json(
            json!({"serviceId": service_id, "timestamp": ms(db::now()), "status": "FAILED", "errorCode": code}),
        ),
    )
}

pub async fn webhook(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    Path(action): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let (answer, authenticated) = handle(&state, &action, &method, &headers, body).await;
    if !authenticated && super::throttled(&state, &ctx).await {
        metrics::webhook_call("uzum", "THROTTLED");
        return failed(&Value::Null, ACCESS_DENIED);
    }
    let (_, Json(body)) = &answer;
    let outcome = body["errorCode"].as_str().unwrap_or("OK").to_owned();
    metrics::webhook_call("uzum", &outcome);
    crate::transport::context::record_principal("provider", "uzum");
    let actor = Actor {
        kind: "provider",
        id: "uzum".into(),
        ..Actor::from_request(None, &ctx)
    };
    let mut event = AuditEvent::new(&actor, format!("POST /webhooks/uzum/{action}"), &outcome);
    if let Some(id) = body["transId"].as_str() {
        event = event.target(id);
    }
    state.auth.audit.record_waiting(event).await;
    answer
}

async fn handle(
    state: &AppState,
    action: &str,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
) -> (Answer, bool) {
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return (failed(&Value::Null, JSON_ERROR), false);
    };
    if !authorized(state, headers, &bytes) {
        return (failed(&Value::Null, ACCESS_DENIED), false);
    }
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(&bytes) else {
        return (failed(&Value::Null, JSON_ERROR), true);
    };
    let request = Value::Object(request);
    let service_id = request.get("serviceId").cloned().unwrap_or(Value::Null);
    if method != Method::POST
        || !["check", "create", "confirm", "reverse", "status"].contains(&action)
    {
        return (failed(&service_id, BAD_OPERATION), true);
    }
    let ours = state.settings.uzum.service_id.as_deref();
    let matches = match &service_id {
        Value::Number(n) => Some(n.to_string()).as_deref() == ours,
        Value::String(s) => Some(s.as_str()) == ours,
        _ => false,
    };
    if service_id.is_null() {
        return (failed(&service_id, MISSING_PARAMS), true);
    }
    if !matches {
        return (failed(&service_id, BAD_SERVICE), true);
    }
    let uzum = Uzum {
        state,
        service_id: service_id.clone(),
    };
    let answer = match uzum.dispatch(action, &request).await {
        Ok(Ok(result)) => (StatusCode::OK, Json(result)),
        Ok(Err(code)) => failed(&service_id, code),
        Err(e) => {
            tracing::error!(error = %e, action, "uzum webhook failed");
            failed(&service_id, INTERNAL)
        }
    };
    (answer, true)
}

/// Basic `UZUM_LOGIN:UZUM_PASSWORD` (constant time); with `UZUM_SECRET_KEY`, also
/// `X-Signature: hex(HMAC-SHA256(secret, raw body))`. Unset keys: the provider is off.
fn authorized(state: &AppState, headers: &HeaderMap, body: &[u8]) -> bool {
    let u = &state.settings.uzum;
    let Some(expected) = &u.expected_authorization else {
        return false;
    };
    let basic_ok = headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(expected.expose_secret().as_bytes())));
    if !basic_ok {
        return false;
    }
    let Some(secret) = &u.secret_key else {
        return true;
    };
    let Some(given) = headers
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| hex::decode(v.trim()).ok())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.expose_secret().as_bytes())
    else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

type Outcome = Result<Result<Value, &'static str>, AppError>;

fn actor() -> Actor {
    Actor {
        kind: "provider",
        id: "uzum".into(),
        client_ip: None,
        request_id: None,
        trace_id: None,
    }
}

/// Uzum's status of a stored transaction.
fn status_of(row: &ptx::Model) -> &'static str {
    match row.state.as_str() {
        "CREATED" => "CREATED",
        "PERFORMED" => "CONFIRMED",
        "FAILED" => "FAILED",
        _ => "REVERSED",
    }
}

struct Uzum<'a> {
    state: &'a AppState,
    service_id: Value,
}

impl Uzum<'_> {
    async fn dispatch(&self, action: &str, request: &Value) -> Outcome {
        match action {
            "check" => self.check(request).await,
            "create" => self.create(request).await,
            "confirm" => self.confirm(request).await,
            "reverse" => self.reverse(request).await,
            _ => self.status(request).await,
        }
    }

    fn data(invoice_id: &str, amount: i64) -> Value {
        json!({"order_id": {"value": invoice_id}, "amount": {"value": som(amount)}})
    }

    /// The invoice named by `params.order_id`, if it can be paid now.
    async fn payable(
        &self,
        request: &Value,
    ) -> Result<Result<invoice::Model, &'static str>, AppError> {
        let Some(order_id) = request
            .get("params")
            .and_then(|p| p.get("order_id"))
            .and_then(Value::as_str)
        else {
            return Ok(Err(MISSING_PARAMS));
        };
        let found = match uuid::Uuid::try_parse(order_id) {
            Ok(_) => transactions::invoice(self.state, order_id).await?,
            Err(_) => None,
        };
        let Some(invoice) = found else {
            return Ok(Err(ORDER_NOT_FOUND));
        };
        if invoice.status == InvoiceStatus::Paid.as_str() {
            return Ok(Err(ALREADY_PAID));
        }
        if invoice.status != InvoiceStatus::Unpaid.as_str() {
            return Ok(Err(ORDER_CANCELLED));
        }
        Ok(Ok(invoice))
    }

    async fn check(&self, request: &Value) -> Outcome {
        let invoice = match self.payable(request).await? {
            Ok(i) => i,
            Err(code) => return Ok(Err(code)),
        };
        if transactions::invoice_held(self.state, &invoice.id).await? {
            return Ok(Err(ALREADY_PAID));
        }
        Ok(Ok(json!({
            "serviceId": self.service_id, "timestamp": ms(db::now()), "status": "OK",
            "data": Self::data(&invoice.id, invoice.amount_tiyin),
        })))
    }

    fn trans_id(request: &Value) -> Option<&str> {
        request
            .get("transId")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.len() <= 128)
    }

    fn result(&self, row: &ptx::Model, status: &str, time_field: &str, time: i64) -> Value {
        let mut body = json!({
            "serviceId": self.service_id, "transId": row.provider_tx_id, "status": status,
            "data": Self::data(&row.invoice_id, row.amount_tiyin), "amount": row.amount_tiyin,
        });
        body[time_field] = json!(time);
        body
    }

    async fn create(&self, request: &Value) -> Outcome {
        let Some(trans_id) = Self::trans_id(request) else {
            return Ok(Err(MISSING_PARAMS));
        };
        if transactions::find(self.state, Provider::Uzum, trans_id)
            .await?
            .is_some()
        {
            return Ok(Err(ALREADY_CREATED));
        }
        let invoice = match self.payable(request).await? {
            Ok(i) => i,
            Err(code) => return Ok(Err(code)),
        };
        if request.get("amount").and_then(Value::as_i64) != Some(invoice.amount_tiyin) {
            return Ok(Err(BAD_AMOUNT));
        }
        let payment = self
            .state
            .payments
            .ensure_pending(&invoice.id, Provider::Uzum)
            .await?;
        let now = db::now();
        let row = ptx::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            provider: Set(Provider::Uzum.as_str().into()),
            provider_tx_id: Set(trans_id.to_owned()),
            invoice_id: Set(invoice.id.clone()),
            payment_id: Set(payment.id.clone()),
            amount_tiyin: Set(invoice.amount_tiyin),
            state: Set("CREATED".into()),
            active_key: Set(Some(invoice.id.clone())),
            provider_time: Set(Some(ms(now))),
            reason: Set(None),
            data: Set(None),
            created_at: Set(now),
            performed_at: Set(None),
            cancelled_at: Set(None),
            local_ref: Set(None),
        };
        match row.insert(&self.state.db).await {
            Ok(row) => Ok(Ok(self.result(
                &row,
                "CREATED",
                "transTime",
                ms(row.created_at),
            ))),
            Err(e) if db::is_unique_violation(&e) => {
                if transactions::find(self.state, Provider::Uzum, trans_id)
                    .await?
                    .is_some()
                {
                    Ok(Err(ALREADY_CREATED))
                } else {
                    Ok(Err(ALREADY_PAID))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn existing(
        &self,
        request: &Value,
    ) -> Result<Result<ptx::Model, &'static str>, AppError> {
        let Some(trans_id) = Self::trans_id(request) else {
            return Ok(Err(MISSING_PARAMS));
        };
        Ok(transactions::find(self.state, Provider::Uzum, trans_id)
            .await?
            .ok_or(TX_NOT_FOUND))
    }

    async fn confirm(&self, request: &Value) -> Outcome {
        let row = match self.existing(request).await? {
            Ok(r) => r,
            Err(code) => return Ok(Err(code)),
        };
        match row.state.as_str() {
            "PERFORMED" => return Ok(Err(ALREADY_CONFIRMED)),
            "CREATED" => {}
            _ => return Ok(Err(TX_CANCELLED)),
        }
        if expired(&row) {
            transactions::finish(
                self.state,
                &row,
                "CREATED",
                "FAILED",
                None,
                ProviderOutcome::Failed,
                &actor(),
            )
            .await?;
            return Ok(Err(TX_CANCELLED));
        }
        if !transactions::finish(
            self.state,
            &row,
            "CREATED",
            "PERFORMED",
            None,
            ProviderOutcome::Paid,
            &actor(),
        )
        .await?
        {
            let now = transactions::reload(self.state, &row).await?;
            return Ok(Err(if now.state == "PERFORMED" {
                ALREADY_CONFIRMED
            } else {
                TX_CANCELLED
            }));
        }
        let row = transactions::reload(self.state, &row).await?;
        Ok(Ok(self.result(
            &row,
            "CONFIRMED",
            "confirmTime",
            row.performed_at.map_or(0, ms),
        )))
    }

    async fn reverse(&self, request: &Value) -> Outcome {
        let row = match self.existing(request).await? {
            Ok(r) => r,
            Err(code) => return Ok(Err(code)),
        };
        let moved = match row.state.as_str() {
            "CREATED" => {
                transactions::finish(
                    self.state,
                    &row,
                    "CREATED",
                    "CANCELLED",
                    None,
                    ProviderOutcome::Cancelled,
                    &actor(),
                )
                .await?
            }
            "PERFORMED" if !self.state.settings.uzum.allow_refund => {
                return Ok(Err(CANNOT_REVERSE));
            }
            "PERFORMED" => {
                transactions::finish(
                    self.state,
                    &row,
                    "PERFORMED",
                    "CANCELLED_AFTER_PERFORM",
                    None,
                    ProviderOutcome::Refunded,
                    &actor(),
                )
                .await?
            }
            _ => return Ok(Err(ALREADY_REVERSED)),
        };
        if !moved {
            return Ok(Err(ALREADY_REVERSED));
        }
        let row = transactions::reload(self.state, &row).await?;
        Ok(Ok(self.result(
            &row,
            "REVERSED",
            "reverseTime",
            row.cancelled_at.map_or(0, ms),
        )))
    }

    async fn status(&self, request: &Value) -> Outcome {
        let row = match self.existing(request).await? {
            Ok(r) => r,
            Err(code) => return Ok(Err(code)),
        };
        let status = status_of(&row);
        let mut body = self.result(&row, status, "transTime", ms(row.created_at));
        body["confirmTime"] = row.performed_at.map_or(Value::Null, |t| json!(ms(t)));
        body["reverseTime"] = match status {
            "REVERSED" => row.cancelled_at.map_or(Value::Null, |t| json!(ms(t))),
            _ => Value::Null,
        };
        Ok(Ok(body))
    }
}

fn expired(row: &ptx::Model) -> bool {
    row.provider_time
        .is_some_and(|t| ms(db::now()) - t > EXPIRY.as_millis() as i64)
}

/// Fails CREATED Uzum transactions and cancels prepared Click ones older than 30 minutes.
pub async fn sweep(state: &AppState) -> Result<(), AppError> {
    use sea_orm::{ColumnTrait, QueryFilter};
    let cutoff = ms(db::now()) - EXPIRY.as_millis() as i64;
    let stale = ptx::Entity::find()
        .filter(ptx::Column::Provider.is_in([Provider::Uzum.as_str(), Provider::Click.as_str()]))
        .filter(ptx::Column::State.eq("CREATED"))
        .filter(ptx::Column::ProviderTime.lt(cutoff))
        .all(&state.db)
        .await?;
    for row in stale {
        let (to, outcome) = if row.provider == Provider::Uzum.as_str() {
            ("FAILED", ProviderOutcome::Failed)
        } else {
            ("CANCELLED", ProviderOutcome::Cancelled)
        };
        transactions::finish(state, &row, "CREATED", to, None, outcome, &actor()).await?;
    }
    Ok(())
}

pub async fn run_sweep(state: AppState, shutdown: tokio::sync::watch::Receiver<bool>) {
    crate::background::every(
        Duration::from_secs(60),
        "uzum/click expiry sweep",
        shutdown,
        || sweep(&state),
    )
    .await;
}
