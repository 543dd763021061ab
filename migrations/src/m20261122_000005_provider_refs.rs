//! Our own integer reference for a provider transaction: Click's `merchant_prepare_id` and
//! `merchant_confirm_id` must be integers.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ProviderTransactions::Table)
                    .add_column(big_integer_null(ProviderTransactions::LocalRef))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_provider_transactions_local_ref")
                    .table(ProviderTransactions::Table)
                    .col(ProviderTransactions::Provider)
                    .col(ProviderTransactions::LocalRef)
                    .unique()
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ProviderTransactions {
    Table,
    Provider,
    LocalRef,
}
