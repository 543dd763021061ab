//! `POST /webhooks/payme`: the Payme Merchant API (JSON-RPC), answering exactly what Payme's
//! sandbox and production expect (providers.md §1 and its Decisions). Every answer is HTTP
//! 200, refusals included. Effects go through `Payments::apply_provider_event`, in one
//! transaction with the provider transaction row.

pub mod wire;

use std::time::Duration;

use axum::{
    Extension, Json,
    body::Body,
    extract::State,
    http::{HeaderMap, Method},
};
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, Set,
};
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
    payments::{InvoiceStatus, Payments, Provider, ProviderOutcome, transactions},
    state::AppState,
    transport::context::RequestContext,
};
use wire::*;

/// Webhook bodies are small; anything larger is refused unread (security.md).
pub const BODY_LIMIT: usize = 64 * 1024;
const PROVIDER: &str = "PAYME";
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub async fn webhook(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Json<Value> {
    let authenticated = authorized(&state, &ctx, &headers);
    if !authenticated && super::throttled(&state, &ctx).await {
        metrics::webhook_call("payme", "THROTTLED");
        return Json(RpcError::new(UNAUTHORIZED).into_body(&Value::Null));
    }
    let (id, outcome) = handle(&state, &method, authenticated, body).await;
    let (code, body) = match outcome {
        Ok((_, result)) => ("OK".to_owned(), success(&id, result)),
        Err(e) => (e.code.to_string(), e.into_body(&id)),
    };
    let actor = Actor {
        kind: "provider",
        id: "payme".into(),
        ..Actor::from_request(None, &ctx)
    };
    metrics::webhook_call("payme", &code);
    crate::transport::context::record_principal("provider", "payme");
    state
        .auth
        .audit
        .record_waiting(AuditEvent::new(&actor, "POST /webhooks/payme", &code))
        .await;
    Json(body)
}

type Outcome = Result<(&'static str, Value), RpcError>;

async fn handle(
    state: &AppState,
    method: &Method,
    authenticated: bool,
    body: Body,
) -> (Value, Outcome) {
    if method != Method::POST {
        return (Value::Null, Err(RpcError::new(NOT_POST)));
    }
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return (Value::Null, Err(RpcError::new(PARSE_ERROR)));
    };
    let Ok(request) = serde_json::from_slice::<Value>(&bytes) else {
        return (Value::Null, Err(RpcError::new(PARSE_ERROR)));
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let (Some(rpc_method), Some(params)) = (
        request.get("method").and_then(Value::as_str),
        request.get("params").filter(|p| p.is_object()),
    ) else {
        return (id, Err(RpcError::new(INVALID_REQUEST)));
    };
    if !authenticated {
        return (id, Err(RpcError::new(UNAUTHORIZED)));
    }
    let payme = Payme { state };
    let outcome = match payme.dispatch(rpc_method, params).await {
        Ok(result) => Ok((PROVIDER, result)),
        Err(Failure::Rpc(e)) => Err(e),
        Err(Failure::App(e)) => {
            // Logged once with its cause; Payme reads -32400 as "try again".
            tracing::error!(error = %e, method = rpc_method, "payme webhook failed");
            Err(RpcError::new(INTERNAL))
        }
    };
    (id, outcome)
}

/// Basic `PAYME_LOGIN:PAYME_SECRET_KEY`, compared in constant time; an unset key means the
/// provider is off. `PAYME_ALLOWED_IPS`, when set, must contain the client address.
fn authorized(state: &AppState, ctx: &RequestContext, headers: &HeaderMap) -> bool {
    let payme = &state.settings.payme;
    let Some(expected) = &payme.expected_authorization else {
        return false;
    };
    if !payme.allowed_ips.is_empty()
        && !payme.allowed_ips.iter().any(|n| n.contains(&ctx.client_ip))
    {
        return false;
    }
    headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(expected.expose_secret().as_bytes())))
}

enum Failure {
    Rpc(RpcError),
    App(AppError),
}

impl From<RpcError> for Failure {
    fn from(e: RpcError) -> Self {
        Self::Rpc(e)
    }
}

impl From<AppError> for Failure {
    fn from(e: AppError) -> Self {
        Self::App(e)
    }
}

impl From<sea_orm::DbErr> for Failure {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::App(e.into())
    }
}

fn millis(t: DateTime<Utc>) -> Millis {
    t.timestamp_millis()
}

fn opt_millis(t: Option<DateTime<Utc>>) -> Millis {
    t.map_or(0, millis)
}

struct Payme<'a> {
    state: &'a AppState,
}

impl Payme<'_> {
    fn db(&self) -> &DatabaseConnection {
        &self.state.db
    }

    fn payments(&self) -> &Payments {
        &self.state.payments
    }

    fn actor(&self) -> Actor {
        Actor {
            kind: "provider",
            id: "payme".into(),
            client_ip: None,
            request_id: None,
            trace_id: None,
        }
    }

    async fn dispatch(&self, method: &str, params: &Value) -> Result<Value, Failure> {
        match method {
            "CheckPerformTransaction" => self.check_perform(params).await,
            "CreateTransaction" => self.create(params).await,
            "PerformTransaction" => self.perform(params).await,
            "CancelTransaction" => self.cancel(params).await,
            "CheckTransaction" => self.check(params).await,
            "GetStatement" => self.statement(params).await,
            "SetFiscalData" => self.fiscal(params).await,
            // ChangePassword included: Payme may not rotate our key.
            other => Err(RpcError::with_data(METHOD_NOT_FOUND, other).into()),
        }
    }

    /// The invoice named by `account.<PAYME_ACCOUNT_FIELD>`, or -31050 naming that field.
    async fn invoice(&self, params: &Value) -> Result<invoice::Model, Failure> {
        let field = &self.state.settings.payme.account_field;
        let not_found = || RpcError::with_data(ACCOUNT_NOT_FOUND, field.as_str());
        let id = params
            .get("account")
            .and_then(|a| a.get(field))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|id| uuid::Uuid::try_parse(id).is_ok())
            .ok_or_else(not_found)?;
        Ok(transactions::invoice(self.state, &id)
            .await?
            .ok_or_else(not_found)?)
    }

    /// Account, amount and invoice state, in the order the sandbox checks them.
    async fn payable_invoice(&self, params: &Value) -> Result<invoice::Model, Failure> {
        let invoice = self.invoice(params).await?;
        if int(params, "amount")? != invoice.amount_tiyin {
            return Err(RpcError::new(WRONG_AMOUNT).into());
        }
        if invoice.status != InvoiceStatus::Unpaid.as_str() {
            return Err(RpcError::new(CANNOT_PERFORM).into());
        }
        Ok(invoice)
    }

    async fn check_perform(&self, params: &Value) -> Result<Value, Failure> {
        let invoice = self.payable_invoice(params).await?;
        // Another provider's (or Payme's) transaction holds the invoice.
        if transactions::invoice_held(self.state, &invoice.id).await? {
            return Err(RpcError::new(CANNOT_PERFORM).into());
        }
        Ok(json!({"allow": true}))
    }

    async fn find(&self, payme_id: &str) -> Result<Option<ptx::Model>, Failure> {
        Ok(transactions::find(self.state, Provider::Payme, payme_id).await?)
    }

    async fn create(&self, params: &Value) -> Result<Value, Failure> {
        let payme_id = string(params, "id")?.to_owned();
        let time = int(params, "time")?;
        if let Some(existing) = self.find(&payme_id).await? {
            return self.answer_existing_create(existing).await;
        }
        let invoice = self.payable_invoice(params).await?;
        let now = db::now();
        let expired = millis(now) - time > TIMEOUT_MS;
        let payment = self
            .payments()
            .ensure_pending(&invoice.id, Provider::Payme)
            .await?;
        let row = ptx::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            provider: Set(PROVIDER.into()),
            provider_tx_id: Set(payme_id.clone()),
            invoice_id: Set(invoice.id.clone()),
            payment_id: Set(payment.id.clone()),
            amount_tiyin: Set(invoice.amount_tiyin),
            // Already past Payme's 12 hours: kept (CheckTransaction answers for it) as
            // cancelled by timeout, never listed by GetStatement.
            state: Set(if expired { "CANCELLED" } else { "CREATED" }.into()),
            active_key: Set((!expired).then(|| invoice.id.clone())),
            provider_time: Set(Some(time)),
            reason: Set(expired.then_some(REASON_TIMEOUT)),
            data: Set(expired.then(|| json!({"create_failed": true}))),
            created_at: Set(now),
            performed_at: Set(None),
            cancelled_at: Set(expired.then_some(now)),
            local_ref: Set(None),
        };
        match row.insert(self.db()).await {
            Ok(_) if expired => Err(RpcError::new(CANNOT_PERFORM).into()),
            Ok(created) => Ok(create_result(&created)),
            Err(e) if db::is_unique_violation(&e) => match self.find(&payme_id).await? {
                // The same id raced in: answer as a repeat.
                Some(existing) => self.answer_existing_create(existing).await,
                // Another transaction holds the invoice.
                None => Err(RpcError::new(CANNOT_PERFORM).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    async fn answer_existing_create(&self, existing: ptx::Model) -> Result<Value, Failure> {
        if existing.state != "CREATED" {
            return Err(RpcError::new(CANNOT_PERFORM).into());
        }
        if self.expire_if_stale(&existing).await? {
            return Err(RpcError::new(CANNOT_PERFORM).into());
        }
        Ok(create_result(&existing))
    }

    /// Cancels a state-1 transaction past Payme's 12 hours (reason 4); true if it did.
    async fn expire_if_stale(&self, row: &ptx::Model) -> Result<bool, Failure> {
        let stale = row.state == "CREATED"
            && row
                .provider_time
                .is_some_and(|t| millis(db::now()) - t > TIMEOUT_MS);
        if !stale {
            return Ok(false);
        }
        self.finish(
            row,
            "CREATED",
            "CANCELLED",
            Some(REASON_TIMEOUT),
            ProviderOutcome::Cancelled,
        )
        .await?;
        Ok(true)
    }

    async fn finish(
        &self,
        row: &ptx::Model,
        from: &str,
        to: &str,
        reason: Option<i32>,
        outcome: ProviderOutcome,
    ) -> Result<bool, Failure> {
        Ok(transactions::finish(self.state, row, from, to, reason, outcome, &self.actor()).await?)
    }

    async fn existing(&self, params: &Value) -> Result<ptx::Model, Failure> {
        let payme_id = string(params, "id")?;
        Ok(self
            .find(payme_id)
            .await?
            .ok_or_else(|| RpcError::new(TX_NOT_FOUND))?)
    }

    async fn reload(&self, row: &ptx::Model) -> Result<ptx::Model, Failure> {
        match transactions::reload(self.state, row).await {
            Err(e) if e.reason() == crate::error::Reason::NotFound => {
                Err(RpcError::new(TX_NOT_FOUND).into())
            }
            found => Ok(found?),
        }
    }

    async fn perform(&self, params: &Value) -> Result<Value, Failure> {
        let row = self.existing(params).await?;
        match row.state.as_str() {
            "CREATED" => {
                if self.expire_if_stale(&row).await? {
                    return Err(RpcError::new(CANNOT_PERFORM).into());
                }
                self.finish(&row, "CREATED", "PERFORMED", None, ProviderOutcome::Paid)
                    .await?;
                let row = self.reload(&row).await?;
                if row.state == "PERFORMED" {
                    Ok(perform_result(&row))
                } else {
                    Err(RpcError::new(CANNOT_PERFORM).into())
                }
            }
            "PERFORMED" => Ok(perform_result(&row)),
            _ => Err(RpcError::new(CANNOT_PERFORM).into()),
        }
    }

    async fn cancel(&self, params: &Value) -> Result<Value, Failure> {
        let reason = int(params, "reason")? as i32;
        let row = self.existing(params).await?;
        match row.state.as_str() {
            "CREATED" => {
                self.finish(
                    &row,
                    "CREATED",
                    "CANCELLED",
                    Some(reason),
                    ProviderOutcome::Cancelled,
                )
                .await?;
            }
            "PERFORMED" => {
                if !self.state.settings.payme.allow_refund {
                    return Err(RpcError::new(CANNOT_CANCEL).into());
                }
                self.finish(
                    &row,
                    "PERFORMED",
                    "CANCELLED_AFTER_PERFORM",
                    Some(reason),
                    ProviderOutcome::Refunded,
                )
                .await?;
            }
            _ => {}
        }
        // Whoever moved it, the stored result is the answer (a repeat is identical).
        Ok(cancel_result(&self.reload(&row).await?))
    }

    async fn check(&self, params: &Value) -> Result<Value, Failure> {
        let row = self.existing(params).await?;
        self.expire_if_stale(&row).await?;
        Ok(check_result(&self.reload(&row).await?))
    }

    async fn statement(&self, params: &Value) -> Result<Value, Failure> {
        let (from, to) = (int(params, "from")?, int(params, "to")?);
        let rows = ptx::Entity::find()
            .filter(ptx::Column::Provider.eq(PROVIDER))
            .filter(ptx::Column::ProviderTime.gte(from))
            .filter(ptx::Column::ProviderTime.lte(to))
            .order_by_asc(ptx::Column::ProviderTime)
            .order_by_asc(ptx::Column::Id)
            .all(self.db())
            .await?;
        let field = &self.state.settings.payme.account_field;
        let transactions: Vec<Value> = rows
            .iter()
            .filter(|r| {
                !r.data
                    .as_ref()
                    .is_some_and(|d| d["create_failed"] == json!(true))
            })
            .map(|r| {
                let mut account = serde_json::Map::new();
                account.insert(field.clone(), json!(r.invoice_id));
                json!({
                    "id": r.provider_tx_id,
                    "time": r.provider_time,
                    "amount": r.amount_tiyin,
                    "account": account,
                    "create_time": millis(r.created_at),
                    "perform_time": opt_millis(r.performed_at),
                    "cancel_time": opt_millis(r.cancelled_at),
                    "transaction": r.id,
                    "state": state_number(&r.state),
                    "reason": r.reason,
                    "receivers": Value::Null,
                })
            })
            .collect();
        Ok(json!({"transactions": transactions}))
    }

    async fn fiscal(&self, params: &Value) -> Result<Value, Failure> {
        let kind = string(params, "type")?;
        if kind != "PERFORM" && kind != "CANCEL" {
            return Err(RpcError::with_data(INVALID_PARAMS, "type").into());
        }
        let fiscal = params
            .get("fiscal_data")
            .filter(|f| f.is_object())
            .cloned()
            .ok_or_else(|| RpcError::with_data(INVALID_PARAMS, "fiscal_data"))?;
        let row = self.existing(params).await?;
        let mut data = row.data.clone().unwrap_or_else(|| json!({}));
        data["fiscal"][kind] = fiscal;
        let mut active: ptx::ActiveModel = row.into();
        active.data = Set(Some(data));
        active.update(self.db()).await?;
        Ok(json!({"success": true}))
    }
}

fn create_result(r: &ptx::Model) -> Value {
    json!({
        "create_time": millis(r.created_at),
        "transaction": r.id,
        "state": state_number(&r.state),
        "receivers": Value::Null,
    })
}

fn perform_result(r: &ptx::Model) -> Value {
    json!({
        "transaction": r.id,
        "perform_time": opt_millis(r.performed_at),
        "state": state_number(&r.state),
    })
}

fn cancel_result(r: &ptx::Model) -> Value {
    json!({
        "transaction": r.id,
        "cancel_time": opt_millis(r.cancelled_at),
        "state": state_number(&r.state),
    })
}

fn check_result(r: &ptx::Model) -> Value {
    json!({
        "create_time": millis(r.created_at),
        "perform_time": opt_millis(r.performed_at),
        "cancel_time": opt_millis(r.cancelled_at),
        "transaction": r.id,
        "state": state_number(&r.state),
        "reason": r.reason,
    })
}

/// Cancels state-1 Payme transactions older than 12 hours (reason 4), every minute.
pub async fn run_sweep(state: AppState, shutdown: tokio::sync::watch::Receiver<bool>) {
    crate::background::every(SWEEP_EVERY, "payme expiry sweep", shutdown, || {
        sweep(&state)
    })
    .await;
}

pub async fn sweep(state: &AppState) -> Result<(), AppError> {
    let cutoff = millis(db::now()) - TIMEOUT_MS;
    let stale = ptx::Entity::find()
        .filter(ptx::Column::Provider.eq(PROVIDER))
        .filter(ptx::Column::State.eq("CREATED"))
        .filter(ptx::Column::ProviderTime.lt(cutoff))
        .all(&state.db)
        .await?;
    let payme = Payme { state };
    for row in stale {
        match payme.expire_if_stale(&row).await {
            Ok(_) => {}
            Err(Failure::App(e)) => return Err(e),
            Err(Failure::Rpc(e)) => {
                tracing::warn!(code = e.code, "payme sweep skipped a transaction")
            }
        }
    }
    Ok(())
}
