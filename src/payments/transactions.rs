//! What every provider webhook shares: moving a provider transaction between states and
//! applying the outcome to payment and invoice in the same database transaction.

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, TransactionTrait};

use crate::{
    audit::Actor,
    db::{
        self,
        entities::{invoice, provider_transaction as ptx},
        raw,
    },
    error::AppError,
    payments::{Provider, ProviderEvent, ProviderOutcome},
    state::AppState,
};

/// Moves `row` from `from` to `to` only if it is still in `from`, and applies `outcome`, in
/// one transaction. False when someone else moved it first (nothing is applied then).
pub async fn finish(
    state: &AppState,
    row: &ptx::Model,
    from: &str,
    to: &str,
    reason: Option<i32>,
    outcome: ProviderOutcome,
    actor: &Actor,
) -> Result<bool, AppError> {
    let provider = Provider::parse(&row.provider)
        .ok_or_else(|| AppError::Internal(anyhow::anyhow!("unknown provider {}", row.provider)))?;
    let now = db::now();
    let txn = state.db.begin().await?;
    let mut update = ptx::Entity::update_many()
        .col_expr(ptx::Column::State, to.into())
        .filter(ptx::Column::Id.eq(row.id.as_str()))
        .filter(ptx::Column::State.eq(from));
    update = if to == "PERFORMED" {
        update.col_expr(ptx::Column::PerformedAt, now.into())
    } else {
        // Any end releases the invoice for other transactions.
        update
            .col_expr(ptx::Column::CancelledAt, now.into())
            .col_expr(ptx::Column::Reason, reason.into())
            .col_expr(ptx::Column::ActiveKey, Option::<String>::None.into())
    };
    if update.exec(&txn).await?.rows_affected != 1 {
        return Ok(false);
    }
    let event = ProviderEvent {
        provider,
        invoice_id: row.invoice_id.clone(),
        outcome,
    };
    let payment = state
        .payments
        .apply_provider_event(&txn, &event, actor)
        .await?;
    txn.commit().await?;
    state.payments.committed(payment);
    Ok(true)
}

/// The provider's transaction by its own id.
pub async fn find(
    state: &AppState,
    provider: Provider,
    provider_tx_id: &str,
) -> Result<Option<ptx::Model>, AppError> {
    const SQL: &str =
        "SELECT * FROM provider_transactions WHERE provider = $1 AND provider_tx_id = $2";
    Ok(raw::one(&state.db, SQL, &[provider.as_str(), provider_tx_id]).await?)
}

pub async fn reload(state: &AppState, row: &ptx::Model) -> Result<ptx::Model, AppError> {
    const SQL: &str = "SELECT * FROM provider_transactions WHERE id = $1";
    raw::one(&state.db, SQL, &[row.id.as_str()])
        .await?
        .ok_or_else(|| AppError::not_found("provider transaction"))
}

/// The invoice a provider names, by its id.
pub async fn invoice(state: &AppState, id: &str) -> Result<Option<invoice::Model>, AppError> {
    const SQL: &str = "SELECT * FROM invoices WHERE id = $1";
    Ok(raw::one(&state.db, SQL, &[id]).await?)
}

/// Whether another active transaction (of any provider) holds the invoice.
pub async fn invoice_held(state: &AppState, invoice_id: &str) -> Result<bool, AppError> {
    // `active_key` is unique: at most one row.
    const SQL: &str = "SELECT * FROM provider_transactions WHERE active_key = $1";
    Ok(raw::one::<ptx::Model>(&state.db, SQL, &[invoice_id])
        .await?
        .is_some())
}
