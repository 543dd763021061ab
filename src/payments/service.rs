//! Use-cases on invoices and payments, with ownership checked on every object: a payer sees
//! only their own; staff and admins see all. Another user's object is `NOT_FOUND`.

use std::sync::Arc;

use futures::FutureExt;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, Set, TransactionTrait,
    sea_query::{Expr, ExprTrait, Query},
};

use crate::{
    audit::{self, Actor, AuditEvent},
    auth::UserPrincipal,
    config::Settings,
    db::{
        self, Uncommitted,
        entities::{application, invoice, payment, user},
    },
    error::{AppError, Reason},
    notify::{Notice, Notifier},
    paging::{self},
    payments::{
        checkout,
        model::{Invoice, InvoiceStatus, Payment, PaymentStatus, Provider},
    },
    validate::Violations,
};

const CHANNEL: &str = "crm_payment_events";
/// One trillion som: far above any tuition, well inside i64.
const MAX_AMOUNT_TIYIN: i64 = 100_000_000_000_000;
const MAX_DESCRIPTION_CHARS: usize = 500;

pub type PaymentEvents = Notifier<Payment>;

/// What a provider reported about an invoice, as the webhooks hand it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderOutcome {
    /// The money arrived: the payment and the invoice become PAID.
    Paid,
    /// The provider cancelled before payment: the pending payment becomes CANCELLED.
    Cancelled,
    /// The provider gave up before payment: the pending payment becomes FAILED.
    Failed,
    /// A paid payment was refunded: payment and invoice become REFUNDED.
    Refunded,
}

#[derive(Debug, Clone)]
pub struct ProviderEvent {
    pub provider: Provider,
    pub invoice_id: String,
    pub outcome: ProviderOutcome,
}

#[derive(Clone)]
pub struct Payments {
    db: DatabaseConnection,
    settings: Arc<Settings>,
    events: Arc<PaymentEvents>,
}

fn not_found(what: &str) -> AppError {
    AppError::not_found(what)
}

fn invalid_state(detail: impl Into<String>) -> AppError {
    AppError::refused(Reason::InvalidState, detail)
}

pub fn notifier(db: &DatabaseConnection) -> PaymentEvents {
    Notifier::new(db, CHANNEL, |db, notice| {
        async move {
            payment::Entity::find_by_id(notice.id)
                .one(&db)
                .await?
                .map(Payment::try_from)
                .transpose()
        }
        .boxed()
    })
}

fn notice(payment_id: &str) -> Notice {
    Notice {
        kind: "updated".into(),
        id: payment_id.to_owned(),
    }
}

impl Payments {
    pub fn new(
        db: DatabaseConnection,
        settings: Arc<Settings>,
        events: Arc<PaymentEvents>,
    ) -> Self {
        Self {
            db,
            settings,
            events,
        }
    }

    pub fn events(&self) -> &PaymentEvents {
        &self.events
    }

    /// A new invoice, with its audit row, in a transaction left open for the caller to add to
    /// (the idempotent answer) and commit.
    pub async fn create_invoice(
        &self,
        payer_user_id: &str,
        application_id: Option<&str>,
        amount_tiyin: i64,
        description: &str,
        actor: &Actor,
    ) -> Result<Uncommitted<Invoice>, AppError> {
        let mut v = Violations::default();
        let payer = match uuid::Uuid::try_parse(payer_user_id) {
            Ok(_) => {
                user::Entity::find_by_id(payer_user_id)
                    .one(&self.db)
                    .await?
            }
            Err(_) => None,
        };
        v.check(
            "payer_user_id",
            payer.map(|_| ()).ok_or_else(|| "no such user".to_owned()),
        );
        if let Some(app_id) = application_id {
            let found = match uuid::Uuid::try_parse(app_id) {
                Ok(_) => {
                    application::Entity::find_by_id(app_id)
                        .one(&self.db)
                        .await?
                }
                Err(_) => None,
            };
            v.check(
                "application_id",
                found
                    .map(|_| ())
                    .ok_or_else(|| "no such application".to_owned()),
            );
        }
        v.check(
            "amount_tiyin",
            (1..=MAX_AMOUNT_TIYIN)
                .contains(&amount_tiyin)
                .then_some(())
                .ok_or_else(|| "must be a positive amount in tiyin".to_owned()),
        );
        let description = description.trim();
        v.check(
            "description",
            (description.chars().count() <= MAX_DESCRIPTION_CHARS)
                .then_some(())
                .ok_or_else(|| format!("at most {MAX_DESCRIPTION_CHARS} characters")),
        );
        v.into_result()?;

        let now = db::now();
        let row = invoice::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            payer_user_id: Set(payer_user_id.to_owned()),
            application_id: Set(application_id.map(str::to_owned)),
            amount_tiyin: Set(amount_tiyin),
            currency: Set("UZS".into()),
            description: Set(description.to_owned()),
            status: Set(InvoiceStatus::Unpaid.as_str().into()),
            created_at: Set(now),
            updated_at: Set(now),
            paid_at: Set(None),
        };
        let txn = self.db.begin().await?;
        let model = row.insert(&txn).await?;
        AuditEvent::new(actor, "/crm.v1.PaymentService/CreateInvoice", audit::OK)
            .target(&model.id)
            .detail(
                serde_json::json!({"amount_tiyin": amount_tiyin, "payer_user_id": payer_user_id}),
            )
            .write(&txn)
            .await?;
        Ok(Uncommitted::new(txn, Invoice::try_from(model)?))
    }

    /// The invoice if the caller may see it.
    pub async fn invoice(&self, caller: &UserPrincipal, id: &str) -> Result<Invoice, AppError> {
        if uuid::Uuid::try_parse(id).is_err() {
            return Err(not_found("invoice"));
        }
        let found = invoice::Entity::find_by_id(id).one(&self.db).await?;
        match found {
            Some(m) if caller.is_staff() || m.payer_user_id == caller.id => {
                Ok(Invoice::try_from(m)?)
            }
            _ => Err(not_found("invoice")),
        }
    }

    pub async fn list_invoices(
        &self,
        caller: &UserPrincipal,
        payer_user_id: Option<&str>,
        status: Option<InvoiceStatus>,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Invoice>, String), AppError> {
        use invoice::Column as C;
        let mut select = invoice::Entity::find();
        // A payer sees their own, whatever filter they send.
        let payer = if caller.is_staff() {
            payer_user_id
        } else {
            Some(caller.id.as_str())
        };
        if let Some(payer) = payer {
            select = select.filter(C::PayerUserId.eq(payer));
        }
        if let Some(status) = status {
            select = select.filter(C::Status.eq(status.as_str()));
        }
        paging::newest_first(
            &self.db,
            select,
            (C::CreatedAt, C::Id),
            page_size,
            page_token,
            |m| ((m.created_at, m.id.clone()), Invoice::try_from(m)),
        )
        .await
    }

    /// A payment for the caller's invoice. A second call while one is PENDING for the same
    /// invoice and provider returns that one (the unique pending key settles races). A new
    /// payment comes in a transaction left open for the caller to add to and commit.
    pub async fn create_payment(
        &self,
        caller: &UserPrincipal,
        invoice_id: &str,
        provider: Provider,
        return_url: Option<&str>,
        actor: &Actor,
    ) -> Result<Uncommitted<Payment>, AppError> {
        if let Some(url) = return_url {
            checkout::validate_return_url(url)?;
        }
        let invoice = self.invoice(caller, invoice_id).await?;
        if invoice.status != InvoiceStatus::Unpaid {
            return Err(invalid_state(format!(
                "the invoice is {}",
                invoice.status.as_str()
            )));
        }
        let checkout_url = checkout::url(
            &self.settings,
            provider,
            &invoice.id,
            invoice.amount_tiyin,
            return_url,
        )?;
        if let Some(existing) = self.pending(&self.db, &invoice.id, provider).await? {
            return Ok(Uncommitted::settled(existing));
        }
        let now = db::now();
        let row = payment::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            invoice_id: Set(invoice.id.clone()),
            provider: Set(provider.as_str().into()),
            amount_tiyin: Set(invoice.amount_tiyin),
            status: Set(PaymentStatus::Pending.as_str().into()),
            checkout_url: Set(checkout_url),
            pending_key: Set(Some(pending_key(&invoice.id, provider))),
            paid_key: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        };
        let txn = self.db.begin().await?;
        let model = match row.insert(&txn).await {
            Ok(model) => model,
            Err(e) if db::is_unique_violation(&e) => {
                drop(txn);
                // Someone else created it a moment ago: theirs is the one.
                return self
                    .pending(&self.db, &invoice.id, provider)
                    .await?
                    .map(Uncommitted::settled)
                    .ok_or_else(|| invalid_state("the invoice changed meanwhile; retry"));
            }
            Err(e) => return Err(e.into()),
        };
        AuditEvent::new(actor, "/crm.v1.PaymentService/CreatePayment", audit::OK)
            .target(&model.id)
            .detail(serde_json::json!({"invoice_id": invoice.id, "provider": provider.as_str()}))
            .write(&txn)
            .await?;
        self.events.announce(&txn, &notice(&model.id)).await?;
        let payment = Payment::try_from(model)?;
        let (this, created) = (self.clone(), payment.clone());
        Ok(Uncommitted::new(txn, payment).on_commit(move || this.committed(created)))
    }

    async fn pending<C: ConnectionTrait>(
        &self,
        conn: &C,
        invoice_id: &str,
        provider: Provider,
    ) -> Result<Option<Payment>, DbErr> {
        payment::Entity::find()
            .filter(payment::Column::PendingKey.eq(pending_key(invoice_id, provider)))
            .one(conn)
            .await?
            .map(Payment::try_from)
            .transpose()
    }

    /// The payment if the caller may see it (through its invoice).
    pub async fn payment(&self, caller: &UserPrincipal, id: &str) -> Result<Payment, AppError> {
        if uuid::Uuid::try_parse(id).is_err() {
            return Err(not_found("payment"));
        }
        let found = payment::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| not_found("payment"))?;
        // Visible exactly when its invoice is.
        self.invoice(caller, &found.invoice_id)
            .await
            .map_err(|_| not_found("payment"))?;
        Ok(Payment::try_from(found)?)
    }

    pub async fn list_payments(
        &self,
        caller: &UserPrincipal,
        invoice_id: Option<&str>,
        status: Option<PaymentStatus>,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Payment>, String), AppError> {
        use payment::Column as C;
        let mut select = payment::Entity::find();
        if !caller.is_staff() {
            select = select.filter(
                Expr::col(C::InvoiceId).in_subquery(
                    Query::select()
                        .column(invoice::Column::Id)
                        .from(invoice::Entity)
                        .and_where(Expr::col(invoice::Column::PayerUserId).eq(caller.id.as_str()))
                        .to_owned(),
                ),
            );
        }
        if let Some(invoice_id) = invoice_id {
            select = select.filter(C::InvoiceId.eq(invoice_id));
        }
        if let Some(status) = status {
            select = select.filter(C::Status.eq(status.as_str()));
        }
        paging::newest_first(
            &self.db,
            select,
            (C::CreatedAt, C::Id),
            page_size,
            page_token,
            |m| ((m.created_at, m.id.clone()), Payment::try_from(m)),
        )
        .await
    }

    /// PENDING -> CANCELLED by its owner or staff; anything else is `INVALID_STATE`.
    pub async fn cancel_payment(
        &self,
        caller: &UserPrincipal,
        id: &str,
        actor: &Actor,
    ) -> Result<Payment, AppError> {
        let current = self.payment(caller, id).await?;
        let txn = self.db.begin().await?;
        let moved = move_payment(
            &txn,
            &current.id,
            PaymentStatus::Pending,
            PaymentStatus::Cancelled,
            None,
        )
        .await?;
        let Some(payment) = moved else {
            return Err(invalid_state(format!(
                "the payment is {}",
                current.status.as_str()
            )));
        };
        AuditEvent::new(actor, "/crm.v1.PaymentService/CancelPayment", audit::OK)
            .target(&payment.id)
            .write(&txn)
            .await?;
        self.events.announce(&txn, &notice(&payment.id)).await?;
        txn.commit().await?;
        self.events.committed(payment.clone());
        Ok(payment)
    }

    /// Applies what a provider reported, inside the caller's transaction (the webhook also
    /// writes its provider transaction there): payment, invoice and audit change together.
    /// After the commit, call `committed` with the returned payment.
    pub async fn apply_provider_event<C: ConnectionTrait>(
        &self,
        txn: &C,
        event: &ProviderEvent,
        actor: &Actor,
    ) -> Result<Payment, AppError> {
        let invoice = invoice::Entity::find_by_id(event.invoice_id.as_str())
            .one(txn)
            .await?
            .ok_or_else(|| not_found("invoice"))?;
        let now = db::now();
        let payment = match event.outcome {
            ProviderOutcome::Paid => {
                if invoice.status != InvoiceStatus::Unpaid.as_str() {
                    return Err(invalid_state(format!("the invoice is {}", invoice.status)));
                }
                let pending = match self.pending(txn, &invoice.id, event.provider).await? {
                    Some(p) => p,
                    // The payer started from the provider's own app: the payment starts here.
                    None => self.insert_pending(txn, &invoice, event.provider).await?,
                };
                let paid = move_payment(
                    txn,
                    &pending.id,
                    PaymentStatus::Pending,
                    PaymentStatus::Paid,
                    Some(&invoice.id),
                )
                .await?
                .ok_or_else(|| invalid_state("the payment changed meanwhile"))?;
                let updated = invoice::Entity::update_many()
                    .col_expr(invoice::Column::Status, InvoiceStatus::Paid.as_str().into())
                    .col_expr(invoice::Column::PaidAt, now.into())
                    .col_expr(invoice::Column::UpdatedAt, now.into())
                    .filter(invoice::Column::Id.eq(invoice.id.as_str()))
                    .filter(invoice::Column::Status.eq(InvoiceStatus::Unpaid.as_str()))
                    .exec(txn)
                    .await?;
                if updated.rows_affected != 1 {
                    return Err(invalid_state("the invoice was paid meanwhile"));
                }
                // The invoice's other pending payments are moot now.
                let others: Vec<payment::Model> = payment::Entity::find()
                    .filter(payment::Column::InvoiceId.eq(invoice.id.as_str()))
                    .filter(payment::Column::Status.eq(PaymentStatus::Pending.as_str()))
                    .all(txn)
                    .await?;
                for other in others {
                    if move_payment(
                        txn,
                        &other.id,
                        PaymentStatus::Pending,
                        PaymentStatus::Cancelled,
                        None,
                    )
                    .await?
                    .is_some()
                    {
                        self.events.announce(txn, &notice(&other.id)).await?;
                    }
                }
                paid
            }
            ProviderOutcome::Cancelled | ProviderOutcome::Failed => {
                let to = if event.outcome == ProviderOutcome::Cancelled {
                    PaymentStatus::Cancelled
                } else {
                    PaymentStatus::Failed
                };
                let pending = self
                    .pending(txn, &invoice.id, event.provider)
                    .await?
                    .ok_or_else(|| invalid_state("no pending payment for this provider"))?;
                move_payment(txn, &pending.id, PaymentStatus::Pending, to, None)
                    .await?
                    .ok_or_else(|| invalid_state("the payment changed meanwhile"))?
            }
            ProviderOutcome::Refunded => {
                let paid = payment::Entity::find()
                    .filter(payment::Column::PaidKey.eq(invoice.id.as_str()))
                    .filter(payment::Column::Provider.eq(event.provider.as_str()))
                    .filter(payment::Column::Status.eq(PaymentStatus::Paid.as_str()))
                    .one(txn)
                    .await?
                    .ok_or_else(|| invalid_state("no paid payment for this provider"))?;
                let refunded = move_payment(
                    txn,
                    &paid.id,
                    PaymentStatus::Paid,
                    PaymentStatus::Refunded,
                    Some(&invoice.id),
                )
                .await?
                .ok_or_else(|| invalid_state("the payment changed meanwhile"))?;
                invoice::Entity::update_many()
                    .col_expr(
                        invoice::Column::Status,
                        InvoiceStatus::Refunded.as_str().into(),
                    )
                    .col_expr(invoice::Column::UpdatedAt, now.into())
                    .filter(invoice::Column::Id.eq(invoice.id.as_str()))
                    .exec(txn)
                    .await?;
                refunded
            }
        };
        let outcome = format!("{:?}", event.outcome).to_uppercase();
        AuditEvent::new(actor, "payment.provider_event", audit::OK)
            .target(&payment.id)
            .detail(serde_json::json!({
                "invoice_id": invoice.id,
                "provider": event.provider.as_str(),
                "outcome": outcome,
            }))
            .write(txn)
            .await?;
        self.events.announce(txn, &notice(&payment.id)).await?;
        Ok(payment)
    }

    /// The invoice's PENDING payment of `provider`, created when there is none (the payer
    /// started from the provider's own app). Concurrent callers end up with the same one.
    pub async fn ensure_pending(
        &self,
        invoice_id: &str,
        provider: Provider,
    ) -> Result<Payment, AppError> {
        if let Some(existing) = self.pending(&self.db, invoice_id, provider).await? {
            return Ok(existing);
        }
        let invoice = invoice::Entity::find_by_id(invoice_id)
            .one(&self.db)
            .await?
            .ok_or_else(|| not_found("invoice"))?;
        match self.insert_pending(&self.db, &invoice, provider).await {
            Ok(payment) => {
                self.committed(payment.clone());
                Ok(payment)
            }
            Err(_) => self
                .pending(&self.db, invoice_id, provider)
                .await?
                .ok_or_else(|| invalid_state("the invoice changed meanwhile")),
        }
    }

    /// After a transaction that created or changed a payment committed: counts it and tells
    /// the watchers.
    pub fn committed(&self, payment: Payment) {
        crate::telemetry::metrics::payment(payment.provider.as_str(), payment.status.as_str());
        self.events.committed(payment);
    }

    /// `apply_provider_event` in a transaction of its own.
    pub async fn apply_provider_event_now(
        &self,
        event: &ProviderEvent,
        actor: &Actor,
    ) -> Result<Payment, AppError> {
        let txn = self.db.begin().await?;
        let payment = self.apply_provider_event(&txn, event, actor).await?;
        txn.commit().await?;
        self.committed(payment.clone());
        Ok(payment)
    }

    async fn insert_pending<C: ConnectionTrait>(
        &self,
        txn: &C,
        invoice: &invoice::Model,
        provider: Provider,
    ) -> Result<Payment, AppError> {
        let now = db::now();
        let checkout_url = checkout::url(
            &self.settings,
            provider,
            &invoice.id,
            invoice.amount_tiyin,
            None,
        )
        .unwrap_or_default();
        let model = payment::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            invoice_id: Set(invoice.id.clone()),
            provider: Set(provider.as_str().into()),
            amount_tiyin: Set(invoice.amount_tiyin),
            status: Set(PaymentStatus::Pending.as_str().into()),
            checkout_url: Set(checkout_url),
            pending_key: Set(Some(pending_key(&invoice.id, provider))),
            paid_key: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(txn)
        .await?;
        Ok(Payment::try_from(model)?)
    }
}

fn pending_key(invoice_id: &str, provider: Provider) -> String {
    format!("{invoice_id}:{}", provider.as_str())
}

/// Moves a payment `from` -> `to` only if it is still in `from`; returns it when moved. The
/// pending key is kept only while PENDING; `paid_key` is the invoice id once PAID.
async fn move_payment<C: ConnectionTrait>(
    conn: &C,
    id: &str,
    from: PaymentStatus,
    to: PaymentStatus,
    paid_key: Option<&str>,
) -> Result<Option<Payment>, AppError> {
    let now = db::now();
    let mut update = payment::Entity::update_many()
        .col_expr(payment::Column::Status, to.as_str().into())
        .col_expr(payment::Column::UpdatedAt, now.into())
        .col_expr(
            payment::Column::PendingKey,
            Expr::value(Option::<String>::None),
        )
        .filter(payment::Column::Id.eq(id))
        .filter(payment::Column::Status.eq(from.as_str()));
    if let Some(key) = paid_key {
        update = update.col_expr(payment::Column::PaidKey, key.into());
    }
    let result = match update.exec(conn).await {
        Ok(r) => r,
        Err(e) if db::is_unique_violation(&e) => {
            return Err(invalid_state("the invoice is already paid"));
        }
        Err(e) => return Err(e.into()),
    };
    if result.rows_affected != 1 {
        return Ok(None);
    }
    Ok(payment::Entity::find_by_id(id)
        .one(conn)
        .await?
        .map(Payment::try_from)
        .transpose()?)
}
