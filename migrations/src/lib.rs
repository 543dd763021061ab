//! Forward-only schema migrations, run on SQLite and PostgreSQL alike.
//!
//! One file per change, listed here in the order they apply. A migration that has landed is
//! never edited: a later change is a new file.

pub use sea_orm_migration::prelude::*;

mod m20261121_000001_core_tables;
mod m20261121_000002_seed_programs;
mod m20261121_000003_users_and_sessions;
mod m20261121_000004_payments;
mod m20261122_000005_provider_refs;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_core_tables::Migration),
            Box::new(m20261121_000002_seed_programs::Migration),
            Box::new(m20261121_000003_users_and_sessions::Migration),
            Box::new(m20261121_000004_payments::Migration),
            Box::new(m20261122_000005_provider_refs::Migration),
        ]
    }
}
