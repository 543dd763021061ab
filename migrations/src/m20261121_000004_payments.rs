//! Money: invoices, the payments that settle them, provider transactions, and the
//! idempotency keys of retried calls. The invariants are constraints, so races cannot break
//! them: a nullable "key" column is set only while a row is in the state the rule is about,
//! and a unique index on it (NULLs never collide, on SQLite and PostgreSQL alike) allows one
//! such row.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Invoices::Table)
                    .col(string_len(Invoices::Id, 36).primary_key())
                    .col(string_len(Invoices::PayerUserId, 36))
                    .col(string_len_null(Invoices::ApplicationId, 36))
                    .col(big_integer(Invoices::AmountTiyin))
                    .col(string_len(Invoices::Currency, 3))
                    .col(text(Invoices::Description))
                    .col(string_len(Invoices::Status, 16))
                    .col(timestamp_with_time_zone(Invoices::CreatedAt))
                    .col(timestamp_with_time_zone(Invoices::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Invoices::PaidAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_invoices_payer")
                            .from(Invoices::Table, Invoices::PayerUserId)
                            .to(Users::Table, Users::Id),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_invoices_application")
                            .from(Invoices::Table, Invoices::ApplicationId)
                            .to(Applications::Table, Applications::Id),
                    )
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "ix_invoices_payer",
            Invoices::Table,
            Invoices::PayerUserId,
            false,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(Payments::Table)
                    .col(string_len(Payments::Id, 36).primary_key())
                    .col(string_len(Payments::InvoiceId, 36))
                    .col(string_len(Payments::Provider, 16))
                    .col(big_integer(Payments::AmountTiyin))
                    .col(string_len(Payments::Status, 16))
                    .col(text(Payments::CheckoutUrl))
                    // "<invoice>:<provider>" while PENDING: one pending payment per provider.
                    .col(string_len_null(Payments::PendingKey, 64))
                    // The invoice id while PAID or REFUNDED: an invoice is paid at most once.
                    .col(string_len_null(Payments::PaidKey, 36))
                    .col(timestamp_with_time_zone(Payments::CreatedAt))
                    .col(timestamp_with_time_zone(Payments::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_payments_invoice")
                            .from(Payments::Table, Payments::InvoiceId)
                            .to(Invoices::Table, Invoices::Id),
                    )
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "ix_payments_invoice",
            Payments::Table,
            Payments::InvoiceId,
            false,
        )
        .await?;
        index(
            manager,
            "ux_payments_pending",
            Payments::Table,
            Payments::PendingKey,
            true,
        )
        .await?;
        index(
            manager,
            "ux_payments_paid",
            Payments::Table,
            Payments::PaidKey,
            true,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(ProviderTransactions::Table)
                    .col(string_len(ProviderTransactions::Id, 36).primary_key())
                    .col(string_len(ProviderTransactions::Provider, 16))
                    .col(string_len(ProviderTransactions::ProviderTxId, 128))
                    .col(string_len(ProviderTransactions::InvoiceId, 36))
                    .col(string_len(ProviderTransactions::PaymentId, 36))
                    .col(big_integer(ProviderTransactions::AmountTiyin))
                    // CREATED, PERFORMED, CANCELLED, CANCELLED_AFTER_PERFORM, FAILED
                    .col(string_len(ProviderTransactions::State, 32))
                    // The invoice id while CREATED or PERFORMED: one active transaction per
                    // invoice across all providers.
                    .col(string_len_null(ProviderTransactions::ActiveKey, 36))
                    // The provider's own clock (Payme `time`, ms), when it sends one.
                    .col(big_integer_null(ProviderTransactions::ProviderTime))
                    .col(integer_null(ProviderTransactions::Reason))
                    .col(json_null(ProviderTransactions::Data))
                    .col(timestamp_with_time_zone(ProviderTransactions::CreatedAt))
                    .col(timestamp_with_time_zone_null(
                        ProviderTransactions::PerformedAt,
                    ))
                    .col(timestamp_with_time_zone_null(
                        ProviderTransactions::CancelledAt,
                    ))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_provider_transactions_payment")
                            .from(ProviderTransactions::Table, ProviderTransactions::PaymentId)
                            .to(Payments::Table, Payments::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_provider_transactions_id")
                    .table(ProviderTransactions::Table)
                    .col(ProviderTransactions::Provider)
                    .col(ProviderTransactions::ProviderTxId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "ux_provider_transactions_active",
            ProviderTransactions::Table,
            ProviderTransactions::ActiveKey,
            true,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(IdempotencyKeys::Table)
                    // user id or service name (principal), gRPC method, the caller's key
                    .col(string_len(IdempotencyKeys::Principal, 64))
                    .col(string_len(IdempotencyKeys::Method, 128))
                    .col(string_len(IdempotencyKeys::Key, 255))
                    .col(string_len(IdempotencyKeys::Fingerprint, 64))
                    // NULL while the first request runs; the stored answer once it finished.
                    .col(text_null(IdempotencyKeys::Response))
                    .col(timestamp_with_time_zone(IdempotencyKeys::LockedAt))
                    .col(timestamp_with_time_zone(IdempotencyKeys::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(IdempotencyKeys::Principal)
                            .col(IdempotencyKeys::Method)
                            .col(IdempotencyKeys::Key),
                    )
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "ix_idempotency_keys_created",
            IdempotencyKeys::Table,
            IdempotencyKeys::CreatedAt,
            false,
        )
        .await
    }
}

async fn index<T: IntoIden + 'static, C: IntoIden + 'static>(
    manager: &SchemaManager<'_>,
    name: &str,
    table: T,
    col: C,
    unique: bool,
) -> Result<(), DbErr> {
    let mut index = Index::create();
    index.name(name).table(table).col(col);
    if unique {
        index.unique();
    }
    manager.create_index(index.to_owned()).await
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Applications {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Invoices {
    Table,
    Id,
    PayerUserId,
    ApplicationId,
    AmountTiyin,
    Currency,
    Description,
    Status,
    CreatedAt,
    UpdatedAt,
    PaidAt,
}

#[derive(DeriveIden)]
enum Payments {
    Table,
    Id,
    InvoiceId,
    Provider,
    AmountTiyin,
    Status,
    CheckoutUrl,
    PendingKey,
    PaidKey,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ProviderTransactions {
    Table,
    Id,
    Provider,
    ProviderTxId,
    InvoiceId,
    PaymentId,
    AmountTiyin,
    State,
    ActiveKey,
    ProviderTime,
    Reason,
    Data,
    CreatedAt,
    PerformedAt,
    CancelledAt,
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    Principal,
    Method,
    Key,
    Fingerprint,
    Response,
    LockedAt,
    CreatedAt,
}
