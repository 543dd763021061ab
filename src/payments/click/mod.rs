//! `POST /webhooks/click/prepare` and `/webhooks/click/complete`: the Click SHOP API
//! (providers.md §2 and its Decisions). Always HTTP 200 with Click's JSON answer; checks in
//! the order of Click's reference code (-8, -1, -3, -5, -6, -4, -2, -9).

pub mod wire;

use std::time::Duration;

use axum::{Extension, Json, body::Body, extract::State};
use sea_orm::{ActiveModelTrait, Set};
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
    payments::{InvoiceStatus, Provider, ProviderOutcome, transactions},
    state::AppState,
    transport::context::RequestContext,
};
use wire::*;

pub const BODY_LIMIT: usize = 64 * 1024;
/// A prepared transaction not completed within this is cancelled (Decisions: 30 min).
pub const EXPIRY: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Prepare,
    Complete,
}

pub async fn prepare(
    state: State<AppState>,
    ctx: Extension<RequestContext>,
    method: axum::http::Method,
    body: Body,
) -> Json<Value> {
    endpoint(state, ctx, method, body, Stage::Prepare).await
}

pub async fn complete(
    state: State<AppState>,
    ctx: Extension<RequestContext>,
    method: axum::http::Method,
    body: Body,
) -> Json<Value> {
    endpoint(state, ctx, method, body, Stage::Complete).await
}

async fn endpoint(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    method: axum::http::Method,
    body: Body,
    stage: Stage,
) -> Json<Value> {
    // Not POST, oversized or unreadable: no fields, so the -8 check answers.
    let fields = match axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .ok()
        .and_then(|b| parse_fields(&b))
    {
        Some(fields) if method == axum::http::Method::POST => fields,
        _ => Fields::new(),
    };
    let answer = match handle(&state, &fields, stage).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, "click webhook failed");
            wire::answer(&fields, wire::UPDATE_FAILED, None)
        }
    };
    // -8 and -1 are the answers to a caller that did not prove it is Click.
    let code = answer["error"].as_i64();
    let unauthenticated = code == Some(BAD_REQUEST.into()) || code == Some(SIGN_FAILED.into());
    if unauthenticated && super::throttled(&state, &ctx).await {
        metrics::webhook_call("click", "THROTTLED");
        return Json(wire::answer(&fields, BAD_REQUEST, None));
    }
    let actor = Actor {
        kind: "provider",
        id: "click".into(),
        ..Actor::from_request(None, &ctx)
    };
    let action = match stage {
        Stage::Prepare => "POST /webhooks/click/prepare",
        Stage::Complete => "POST /webhooks/click/complete",
    };
    let outcome = answer["error"].to_string();
    let outcome = if outcome == "0" { "OK" } else { &outcome };
    metrics::webhook_call("click", outcome);
    crate::transport::context::record_principal("provider", "click");
    let mut event = AuditEvent::new(&actor, action, outcome);
    if let Some(id) = fields.get("click_trans_id") {
        event = event.target(id);
    }
    state.auth.audit.record_waiting(event).await;
    Json(answer)
}

fn actor() -> Actor {
    Actor {
        kind: "provider",
        id: "click".into(),
        client_ip: None,
        request_id: None,
        trace_id: None,
    }
}

async fn handle(state: &AppState, f: &Fields, stage: Stage) -> Result<Value, AppError> {
    let fail = |code| Ok(answer(f, code, None));
    // -8: every field present and well-formed.
    let mut required = vec![
        "click_trans_id",
        "service_id",
        "click_paydoc_id",
        "merchant_trans_id",
        "amount",
        "action",
        "error",
        "sign_time",
        "sign_string",
    ];
    if stage == Stage::Complete {
        required.push("merchant_prepare_id");
    }
    let ints_ok = ["click_trans_id", "service_id", "action", "error"]
        .iter()
        .chain(if stage == Stage::Complete {
            ["merchant_prepare_id"].iter()
        } else {
            [].iter()
        })
        .all(|k| f.get(*k).is_some_and(|v| v.parse::<i64>().is_ok()));
    if !required
        .iter()
        .all(|k| f.get(*k).is_some_and(|v| !v.is_empty()))
        || !ints_ok
    {
        return fail(BAD_REQUEST);
    }
    // -1: provider on, our service, and the signature over the raw strings.
    let click = &state.settings.click;
    let (Some(secret), Some(service_id)) = (&click.secret_key, &click.service_id) else {
        return fail(SIGN_FAILED);
    };
    let expected = sign(f, secret.expose_secret(), stage == Stage::Complete);
    let given = f["sign_string"].to_ascii_lowercase();
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
        || &f["service_id"] != service_id
        || click.merchant_id.is_none()
    {
        return fail(SIGN_FAILED);
    }
    // -3: the action of this endpoint.
    let action = f["action"].parse::<i64>().unwrap_or(-1);
    if action != if stage == Stage::Prepare { 0 } else { 1 } {
        return fail(ACTION_NOT_FOUND);
    }
    // -5: the invoice.
    let invoice_id = &f["merchant_trans_id"];
    let invoice = match uuid::Uuid::try_parse(invoice_id) {
        Ok(_) => transactions::invoice(state, invoice_id).await?,
        Err(_) => None,
    };
    let Some(invoice) = invoice else {
        return fail(USER_NOT_FOUND);
    };
    let existing = transactions::find(state, Provider::Click, &f["click_trans_id"]).await?;
    match stage {
        Stage::Prepare => prepare_stage(state, f, &invoice, existing).await,
        Stage::Complete => complete_stage(state, f, &invoice, existing).await,
    }
}

/// -2: the amount in som, exactly the invoice's.
fn amount_ok(f: &Fields, invoice: &invoice::Model) -> bool {
    som_to_tiyin(&f["amount"]) == Some(invoice.amount_tiyin)
}

async fn prepare_stage(
    state: &AppState,
    f: &Fields,
    invoice: &invoice::Model,
    existing: Option<ptx::Model>,
) -> Result<Value, AppError> {
    let prepared = |row: &ptx::Model| {
        answer(
            f,
            SUCCESS,
            Some(("merchant_prepare_id", json!(row.local_ref))),
        )
    };
    if let Some(row) = existing {
        return Ok(match row.state.as_str() {
            "PERFORMED" => answer(f, ALREADY_PAID, None),
            "CREATED" if row.invoice_id == invoice.id && amount_ok(f, invoice) => prepared(&row),
            "CREATED" => answer(f, BAD_AMOUNT, None),
            _ => answer(f, CANCELLED, None),
        });
    }
    if invoice.status == InvoiceStatus::Paid.as_str() {
        return Ok(answer(f, ALREADY_PAID, None));
    }
    if !amount_ok(f, invoice) {
        return Ok(answer(f, BAD_AMOUNT, None));
    }
    if invoice.status != InvoiceStatus::Unpaid.as_str() {
        return Ok(answer(f, CANCELLED, None));
    }
    // Another transaction holds the invoice: Click's "cannot pay now".
    if transactions::invoice_held(state, &invoice.id).await? {
        return Ok(answer(f, ALREADY_PAID, None));
    }
    let payment = state
        .payments
        .ensure_pending(&invoice.id, Provider::Click)
        .await?;
    let now = db::now();
    for _ in 0..3 {
        let local_ref = i64::from(rand::random::<u32>() >> 1).max(1);
        let row = ptx::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            provider: Set(Provider::Click.as_str().into()),
            provider_tx_id: Set(f["click_trans_id"].clone()),
            invoice_id: Set(invoice.id.clone()),
            payment_id: Set(payment.id.clone()),
            amount_tiyin: Set(invoice.amount_tiyin),
            state: Set("CREATED".into()),
            active_key: Set(Some(invoice.id.clone())),
            // The 30-minute clock starts at Prepare.
            provider_time: Set(Some(now.timestamp_millis())),
            reason: Set(None),
            data: Set(Some(json!({"click_paydoc_id": f["click_paydoc_id"]}))),
            created_at: Set(now),
            performed_at: Set(None),
            cancelled_at: Set(None),
            local_ref: Set(Some(local_ref)),
        };
        match row.insert(&state.db).await {
            Ok(row) => return Ok(prepared(&row)),
            Err(e) if db::is_unique_violation(&e) => {
                // The same click_trans_id raced in (answer as a repeat), the invoice is held,
                // or (rarely) the random reference collided: look and decide.
                if let Some(row) =
                    transactions::find(state, Provider::Click, &f["click_trans_id"]).await?
                {
                    return Box::pin(prepare_stage(state, f, invoice, Some(row))).await;
                }
                if transactions::invoice_held(state, &invoice.id).await? {
                    return Ok(answer(f, ALREADY_PAID, None));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(AppError::Internal(anyhow::anyhow!(
        "could not allocate a prepare id"
    )))
}

async fn complete_stage(
    state: &AppState,
    f: &Fields,
    invoice: &invoice::Model,
    existing: Option<ptx::Model>,
) -> Result<Value, AppError> {
    // -6: the prepare id we gave for this click_trans_id.
    let Some(row) = existing.filter(|r| {
        r.local_ref.map(|r| r.to_string()).as_deref() == Some(f["merchant_prepare_id"].as_str())
            && r.invoice_id == invoice.id
    }) else {
        return Ok(answer(f, TX_NOT_FOUND, None));
    };
    let confirmed = |row: &ptx::Model| {
        answer(
            f,
            SUCCESS,
            Some(("merchant_confirm_id", json!(row.local_ref))),
        )
    };
    match row.state.as_str() {
        // A repeated successful Complete credits nothing.
        "PERFORMED" => return Ok(answer(f, ALREADY_PAID, None)),
        "CREATED" => {}
        _ => return Ok(answer(f, CANCELLED, None)),
    }
    if !amount_ok(f, invoice) {
        return Ok(answer(f, BAD_AMOUNT, None));
    }
    let click_error = f["error"].parse::<i64>().unwrap_or(0);
    let expired = row
        .provider_time
        .is_some_and(|t| db::now().timestamp_millis() - t > EXPIRY.as_millis() as i64);
    if click_error < 0 || expired {
        // Click cancelled (or the payer took too long): release the invoice, answer -9.
        transactions::finish(
            state,
            &row,
            "CREATED",
            "CANCELLED",
            None,
            ProviderOutcome::Cancelled,
            &actor(),
        )
        .await?;
        return Ok(answer(f, CANCELLED, None));
    }
    if transactions::finish(
        state,
        &row,
        "CREATED",
        "PERFORMED",
        None,
        ProviderOutcome::Paid,
        &actor(),
    )
    .await?
    {
        return Ok(confirmed(&row));
    }
    // Someone else moved it first.
    let now = transactions::reload(state, &row).await?;
    Ok(match now.state.as_str() {
        "PERFORMED" => answer(f, ALREADY_PAID, None),
        _ => answer(f, CANCELLED, None),
    })
}
