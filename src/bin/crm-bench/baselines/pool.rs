//! Raw sqlx pools opened the way the server opens its own (`src/db/mod.rs`): same size, same
//! SQLite settings (WAL, synchronous NORMAL, 10 s busy timeout, foreign keys), no ping before
//! each acquire. sqlx is sea-orm's own copy (`sea_orm::sqlx`), so nothing new is compiled.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sea_orm::sqlx::{
    self,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};

pub enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Pool {
    pub async fn open(url: &str, size: u32) -> anyhow::Result<Self> {
        if url.starts_with("postgres") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(size)
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .test_before_acquire(false)
                .connect_with(options)
                .await
                .with_context(|| format!("connect {url}"))?;
            Ok(Self::Postgres(pool))
        } else {
            Ok(Self::Sqlite(sqlite(url, size).await?))
        }
    }

    /// `SELECT count(*) …` or any one-integer query.
    pub async fn count(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(match self {
            Self::Postgres(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await?,
            Self::Sqlite(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await?,
        })
    }

    pub async fn close(&self) {
        match self {
            Self::Postgres(p) => p.close().await,
            Self::Sqlite(p) => p.close().await,
        }
    }
}

pub async fn sqlite(url: &str, size: u32) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    SqlitePoolOptions::new()
        .max_connections(size)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .with_context(|| format!("open {url}"))
}
