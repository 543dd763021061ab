//! `crm-bench baseline-payme <sqlite-url> <pool-size>`: a bare axum handler at
//! `POST /webhooks/payme` doing the database work of the server's Payme webhook
//! (`src/payments/payme/mod.rs`, `transactions.rs`, `service.rs`) statement for statement,
//! with raw sqlx on the same SQLite file and the same answers. It checks the Basic credentials
//! (`PAYME_LOGIN`/`PAYME_SECRET_KEY` from the environment) like any handler must.
//!
//! Every call is audited as the server audits it: one `audit_log` row per call, queued and
//! written in multi-row INSERTs of up to 500 by a background task (`src/audit.rs`); a call
//! waits for room in a full queue, as the server's provider calls do.
//!
//! What it leaves out are the server's layers: request context and span, metrics, security
//! headers, transport limits, throttling of unauthenticated callers, and the in-process change
//! broadcast. Only the happy paths the bench drives are mirrored exactly; refusals answer a
//! plain Payme error.
//!
//! The statements, in order:
//! - CheckPerformTransaction: the invoice by id; an active transaction holding it.
//! - CreateTransaction: the transaction by (provider, Payme id); the invoice; the invoice's
//!   pending Payme payment (pre-created, as CreatePayment does); INSERT … RETURNING the
//!   transaction.
//! - PerformTransaction: the transaction by (provider, Payme id); then in one transaction:
//!   UPDATE it CREATED → PERFORMED; the invoice; its pending payment; UPDATE the payment to
//!   PAID; read it back; UPDATE the invoice to PAID; its other pending payments; INSERT the
//!   audit row; COMMIT; then the transaction read back.

use std::sync::Arc;

use anyhow::Context;
use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, header::AUTHORIZATION},
    routing::post,
    serve::ListenerExt,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, QueryBuilder, Row, Sqlite, SqlitePool, Transaction, sqlite::SqliteRow};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use super::{announce, pool};

const PROVIDER: &str = "PAYME";
const TIMEOUT_MS: i64 = 43_200_000;

struct Bare {
    db: SqlitePool,
    expected_auth: String,
    audit: mpsc::Sender<AuditRow>,
}

/// The per-call audit row (actor `provider`/`payme`, action `POST /webhooks/payme`).
struct AuditRow {
    occurred_at: DateTime<Utc>,
    outcome: String,
    request_id: String,
}

/// The server's audit queue: at most this many rows waiting, written this many at a time.
const AUDIT_QUEUE: usize = 10_000;
const AUDIT_BATCH: usize = 500;

async fn write_audit(db: SqlitePool, mut rx: mpsc::Receiver<AuditRow>) {
    let mut batch = Vec::with_capacity(AUDIT_BATCH);
    while rx.recv_many(&mut batch, AUDIT_BATCH).await > 0 {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO audit_log (occurred_at, actor_kind, actor_id, action, target_id, \
             outcome, client_ip, request_id, trace_id, detail) ",
        );
        insert.push_values(batch.drain(..), |mut row, audit| {
            row.push_bind(audit.occurred_at)
                .push_bind("provider")
                .push_bind("payme")
                .push_bind("POST /webhooks/payme")
                .push_bind(Option::<String>::None)
                .push_bind(audit.outcome)
                .push_bind("127.0.0.1")
                .push_bind(audit.request_id)
                .push_bind(Option::<String>::None)
                .push_bind(Option::<Value>::None);
        });
        if let Err(e) = insert.build().execute(&db).await {
            eprintln!(
                "{}",
                json!({"level": "ERROR", "message": format!("audit batch lost: {e}")})
            );
        }
    }
}

pub fn run(database_url: &str, pool_size: &str) -> anyhow::Result<()> {
    let size: u32 = pool_size.parse().context("pool size")?;
    let key = std::env::var("PAYME_SECRET_KEY").context("PAYME_SECRET_KEY")?;
    let login = std::env::var("PAYME_LOGIN").unwrap_or_else(|_| "Paycom".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let db = pool::sqlite(database_url, size).await?;
        let (audit, queue) = mpsc::channel(AUDIT_QUEUE);
        tokio::spawn(write_audit(db.clone(), queue));
        let bare = Bare {
            db,
            expected_auth: format!("Basic {}", STANDARD.encode(format!("{login}:{key}"))),
            audit,
        };
        let app = Router::new()
            .route("/webhooks/payme", post(webhook))
            .with_state(Arc::new(bare));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        announce(listener.local_addr()?);
        // TCP_NODELAY on every connection, as the server sets it.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

async fn webhook(State(bare): State<Arc<Bare>>, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let (code, answer) = answer(&bare, &headers, &body).await;
    let row = AuditRow {
        occurred_at: crm_server::db::now(),
        outcome: code,
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    // Like the server (`AuditSink::record_waiting`): a provider's call waits for room in a
    // full queue rather than lose its row.
    if bare.audit.send(row).await.is_err() {
        eprintln!(
            "{}",
            json!({"level": "ERROR", "message": "audit writer stopped; an audit row was dropped"})
        );
    }
    Json(answer)
}

/// The answer, and the outcome the audit row records (`OK` or the Payme error code).
async fn answer(bare: &Bare, headers: &HeaderMap, body: &[u8]) -> (String, Value) {
    let authorized = headers
        .get(AUTHORIZATION)
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(bare.expected_auth.as_bytes())));
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return ("-32700".into(), error(&Value::Null, -32700));
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let (Some(method), Some(params)) = (
        request.get("method").and_then(Value::as_str),
        request.get("params").filter(|p| p.is_object()),
    ) else {
        return ("-32600".into(), error(&id, -32600));
    };
    if !authorized {
        return ("-32504".into(), error(&id, -32504));
    }
    let outcome = match method {
        "CheckPerformTransaction" => check_perform(&bare.db, params).await,
        "CreateTransaction" => create(&bare.db, params).await,
        "PerformTransaction" => perform(&bare.db, params).await,
        _ => Err(Refusal::Code(-32601)),
    };
    match outcome {
        Ok(result) => (
            "OK".into(),
            json!({"jsonrpc": "2.0", "id": id, "result": result}),
        ),
        Err(Refusal::Code(code)) => (code.to_string(), error(&id, code)),
        Err(Refusal::Db(e)) => {
            eprintln!("{}", json!({"level": "ERROR", "message": e.to_string()}));
            ("-32400".into(), error(&id, -32400))
        }
    }
}

fn error(id: &Value, code: i32) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {
        "code": code,
        "message": {"ru": "Ошибка", "uz": "Xato", "en": "Error"},
    }})
}

enum Refusal {
    Code(i32),
    Db(sqlx::Error),
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

type Outcome = Result<Value, Refusal>;

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

struct Invoice {
    id: String,
    amount_tiyin: i64,
    status: String,
}

/// Every column decoded, as sea-orm decodes its model.
fn invoice(row: &SqliteRow) -> Result<Invoice, sqlx::Error> {
    let _: (String, Option<String>, String, String) = (
        row.try_get("payer_user_id")?,
        row.try_get("application_id")?,
        row.try_get("currency")?,
        row.try_get("description")?,
    );
    let _: (DateTime<Utc>, DateTime<Utc>, Option<DateTime<Utc>>) = (
        row.try_get("created_at")?,
        row.try_get("updated_at")?,
        row.try_get("paid_at")?,
    );
    Ok(Invoice {
        id: row.try_get("id")?,
        amount_tiyin: row.try_get("amount_tiyin")?,
        status: row.try_get("status")?,
    })
}

struct Payment {
    id: String,
}

fn payment(row: &SqliteRow) -> Result<Payment, sqlx::Error> {
    let _: (String, String, i64, String, String) = (
        row.try_get("invoice_id")?,
        row.try_get("provider")?,
        row.try_get("amount_tiyin")?,
        row.try_get("status")?,
        row.try_get("checkout_url")?,
    );
    let _: (Option<String>, Option<String>, DateTime<Utc>, DateTime<Utc>) = (
        row.try_get("pending_key")?,
        row.try_get("paid_key")?,
        row.try_get("created_at")?,
        row.try_get("updated_at")?,
    );
    Ok(Payment {
        id: row.try_get("id")?,
    })
}

struct Ptx {
    id: String,
    invoice_id: String,
    state: String,
    provider_time: Option<i64>,
    created_at: DateTime<Utc>,
    performed_at: Option<DateTime<Utc>>,
}

fn ptx(row: &SqliteRow) -> Result<Ptx, sqlx::Error> {
    let _: (String, String, String, i64, Option<String>) = (
        row.try_get("provider")?,
        row.try_get("provider_tx_id")?,
        row.try_get("payment_id")?,
        row.try_get("amount_tiyin")?,
        row.try_get("active_key")?,
    );
    let _: (
        Option<i32>,
        Option<Value>,
        Option<DateTime<Utc>>,
        Option<i64>,
    ) = (
        row.try_get("reason")?,
        row.try_get("data")?,
        row.try_get("cancelled_at")?,
        row.try_get("local_ref")?,
    );
    Ok(Ptx {
        id: row.try_get("id")?,
        invoice_id: row.try_get("invoice_id")?,
        state: row.try_get("state")?,
        provider_time: row.try_get("provider_time")?,
        created_at: row.try_get("created_at")?,
        performed_at: row.try_get("performed_at")?,
    })
}

async fn find_invoice<'e, E>(db: E, id: &str) -> Result<Option<Invoice>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query(
        "SELECT id, payer_user_id, application_id, amount_tiyin, currency, description, \
         status, created_at, updated_at, paid_at FROM invoices WHERE id = ?1 LIMIT 1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?
    .as_ref()
    .map(invoice)
    .transpose()
}

async fn find_ptx(db: &SqlitePool, payme_id: &str) -> Result<Option<Ptx>, sqlx::Error> {
    sqlx::query(
        "SELECT id, provider, provider_tx_id, invoice_id, payment_id, amount_tiyin, state, \
         active_key, provider_time, reason, data, created_at, performed_at, cancelled_at, \
         local_ref FROM provider_transactions WHERE provider = ?1 AND provider_tx_id = ?2 \
         LIMIT 1",
    )
    .bind(PROVIDER)
    .bind(payme_id)
    .fetch_optional(db)
    .await?
    .as_ref()
    .map(ptx)
    .transpose()
}

async fn pending_payment<'e, E>(db: E, invoice_id: &str) -> Result<Option<Payment>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query(
        "SELECT id, invoice_id, provider, amount_tiyin, status, checkout_url, pending_key, \
         paid_key, created_at, updated_at FROM payments WHERE pending_key = ?1 LIMIT 1",
    )
    .bind(format!("{invoice_id}:{PROVIDER}"))
    .fetch_optional(db)
    .await?
    .as_ref()
    .map(payment)
    .transpose()
}

fn int(params: &Value, name: &str) -> Result<i64, Refusal> {
    params
        .get(name)
        .and_then(Value::as_i64)
        .ok_or(Refusal::Code(-32602))
}

fn string<'a>(params: &'a Value, name: &str) -> Result<&'a str, Refusal> {
    params
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .ok_or(Refusal::Code(-32602))
}

/// The invoice named by `account.order_id`, unpaid and for this amount.
async fn payable_invoice(db: &SqlitePool, params: &Value) -> Result<Invoice, Refusal> {
    let id = params
        .get("account")
        .and_then(|a| a.get("order_id"))
        .and_then(Value::as_str)
        .filter(|id| uuid::Uuid::try_parse(id).is_ok())
        .ok_or(Refusal::Code(-31050))?;
    let invoice = find_invoice(db, id).await?.ok_or(Refusal::Code(-31050))?;
    if int(params, "amount")? != invoice.amount_tiyin {
        return Err(Refusal::Code(-31001));
    }
    if invoice.status != "UNPAID" {
        return Err(Refusal::Code(-31008));
    }
    Ok(invoice)
}

async fn check_perform(db: &SqlitePool, params: &Value) -> Outcome {
    let invoice = payable_invoice(db, params).await?;
    let held = sqlx::query(
        "SELECT id, provider, provider_tx_id, invoice_id, payment_id, amount_tiyin, state, \
         active_key, provider_time, reason, data, created_at, performed_at, cancelled_at, \
         local_ref FROM provider_transactions WHERE active_key = ?1 LIMIT 1",
    )
    .bind(&invoice.id)
    .fetch_optional(db)
    .await?
    .as_ref()
    .map(ptx)
    .transpose()?;
    if held.is_some() {
        return Err(Refusal::Code(-31008));
    }
    Ok(json!({"allow": true}))
}

async fn create(db: &SqlitePool, params: &Value) -> Outcome {
    let payme_id = string(params, "id")?.to_owned();
    let time = int(params, "time")?;
    if let Some(existing) = find_ptx(db, &payme_id).await? {
        return if existing.state == "CREATED" {
            Ok(create_result(&existing))
        } else {
            Err(Refusal::Code(-31008))
        };
    }
    let invoice = payable_invoice(db, params).await?;
    let now = crm_server::db::now();
    if millis(now) - time > TIMEOUT_MS {
        return Err(Refusal::Code(-31008));
    }
    // The payer pressed "Pay" first (CreatePayment), so the pending payment exists.
    let payment = pending_payment(db, &invoice.id)
        .await?
        .ok_or(Refusal::Code(-31008))?;
    let row = sqlx::query(
        "INSERT INTO provider_transactions (id, provider, provider_tx_id, invoice_id, \
         payment_id, amount_tiyin, state, active_key, provider_time, reason, data, created_at, \
         performed_at, cancelled_at, local_ref) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
         ?10, ?11, ?12, ?13, ?14, ?15) RETURNING id, provider, provider_tx_id, invoice_id, \
         payment_id, amount_tiyin, state, active_key, provider_time, reason, data, created_at, \
         performed_at, cancelled_at, local_ref",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(PROVIDER)
    .bind(&payme_id)
    .bind(&invoice.id)
    .bind(&payment.id)
    .bind(invoice.amount_tiyin)
    .bind("CREATED")
    .bind(&invoice.id)
    .bind(time)
    .bind(Option::<i32>::None)
    .bind(Option::<Value>::None)
    .bind(now)
    .bind(Option::<DateTime<Utc>>::None)
    .bind(Option::<DateTime<Utc>>::None)
    .bind(Option::<i64>::None)
    .fetch_one(db)
    .await;
    match row {
        Ok(row) => Ok(create_result(&ptx(&row)?)),
        // Another transaction holds the invoice (the unique active key).
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(Refusal::Code(-31008)),
        Err(e) => Err(e.into()),
    }
}

fn create_result(r: &Ptx) -> Value {
    json!({
        "create_time": millis(r.created_at),
        "transaction": r.id,
        "state": 1,
        "receivers": Value::Null,
    })
}

async fn perform(db: &SqlitePool, params: &Value) -> Outcome {
    let payme_id = string(params, "id")?;
    let row = find_ptx(db, payme_id).await?.ok_or(Refusal::Code(-31003))?;
    match row.state.as_str() {
        "CREATED" => {
            let stale = row
                .provider_time
                .is_some_and(|t| millis(crm_server::db::now()) - t > TIMEOUT_MS);
            if stale {
                return Err(Refusal::Code(-31008));
            }
            let mut txn = db.begin().await?;
            if !pay(&mut txn, &row).await? {
                return Err(Refusal::Code(-31008));
            }
            txn.commit().await?;
            let reloaded = sqlx::query(
                "SELECT id, provider, provider_tx_id, invoice_id, payment_id, amount_tiyin, \
                 state, active_key, provider_time, reason, data, created_at, performed_at, \
                 cancelled_at, local_ref FROM provider_transactions WHERE id = ?1 LIMIT 1",
            )
            .bind(&row.id)
            .fetch_optional(db)
            .await?
            .as_ref()
            .map(ptx)
            .transpose()?
            .ok_or(Refusal::Code(-31003))?;
            if reloaded.state == "PERFORMED" {
                Ok(perform_result(&reloaded))
            } else {
                Err(Refusal::Code(-31008))
            }
        }
        "PERFORMED" => Ok(perform_result(&row)),
        _ => Err(Refusal::Code(-31008)),
    }
}

fn perform_result(r: &Ptx) -> Value {
    json!({
        "transaction": r.id,
        "perform_time": r.performed_at.map_or(0, millis),
        "state": 2,
    })
}

/// `transactions::finish` + `Payments::apply_provider_event` for a Paid outcome; false when
/// the transaction was no longer CREATED or the invoice no longer payable.
async fn pay(txn: &mut Transaction<'static, Sqlite>, row: &Ptx) -> Result<bool, Refusal> {
    let now = crm_server::db::now();
    let moved = sqlx::query(
        "UPDATE provider_transactions SET state = ?1, performed_at = ?2 WHERE id = ?3 AND \
         state = ?4",
    )
    .bind("PERFORMED")
    .bind(now)
    .bind(&row.id)
    .bind("CREATED")
    .execute(&mut **txn)
    .await?;
    if moved.rows_affected() != 1 {
        return Ok(false);
    }
    let Some(invoice) = find_invoice(&mut **txn, &row.invoice_id).await? else {
        return Ok(false);
    };
    if invoice.status != "UNPAID" {
        return Ok(false);
    }
    let Some(pending) = pending_payment(&mut **txn, &invoice.id).await? else {
        return Ok(false);
    };
    let paid = sqlx::query(
        "UPDATE payments SET status = ?1, updated_at = ?2, pending_key = ?3, paid_key = ?4 \
         WHERE id = ?5 AND status = ?6",
    )
    .bind("PAID")
    .bind(now)
    .bind(Option::<String>::None)
    .bind(&invoice.id)
    .bind(&pending.id)
    .bind("PENDING")
    .execute(&mut **txn)
    .await?;
    if paid.rows_affected() != 1 {
        return Ok(false);
    }
    let payment_row = sqlx::query(
        "SELECT id, invoice_id, provider, amount_tiyin, status, checkout_url, pending_key, \
         paid_key, created_at, updated_at FROM payments WHERE id = ?1 LIMIT 1",
    )
    .bind(&pending.id)
    .fetch_one(&mut **txn)
    .await?;
    let paid_payment = payment(&payment_row)?;
    let updated = sqlx::query(
        "UPDATE invoices SET status = ?1, paid_at = ?2, updated_at = ?3 WHERE id = ?4 AND \
         status = ?5",
    )
    .bind("PAID")
    .bind(now)
    .bind(now)
    .bind(&invoice.id)
    .bind("UNPAID")
    .execute(&mut **txn)
    .await?;
    if updated.rows_affected() != 1 {
        return Ok(false);
    }
    // The invoice's other pending payments (none here: one provider) would be cancelled.
    let others = sqlx::query(
        "SELECT id, invoice_id, provider, amount_tiyin, status, checkout_url, pending_key, \
         paid_key, created_at, updated_at FROM payments WHERE invoice_id = ?1 AND status = ?2",
    )
    .bind(&invoice.id)
    .bind("PENDING")
    .fetch_all(&mut **txn)
    .await?;
    for other in &others {
        payment(other)?;
    }
    sqlx::query(
        "INSERT INTO audit_log (occurred_at, actor_kind, actor_id, action, target_id, \
         outcome, client_ip, request_id, trace_id, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
         ?8, ?9, ?10)",
    )
    .bind(crm_server::db::now())
    .bind("provider")
    .bind("payme")
    .bind("payment.provider_event")
    .bind(&paid_payment.id)
    .bind("OK")
    .bind(Option::<String>::None)
    .bind(Option::<String>::None)
    .bind(Option::<String>::None)
    .bind(json!({"invoice_id": invoice.id, "provider": PROVIDER, "outcome": "PAID"}))
    .execute(&mut **txn)
    .await?;
    Ok(true)
}
