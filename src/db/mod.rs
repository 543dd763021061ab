//! The database: connecting (SQLite or PostgreSQL), migrating, and classifying errors.

pub mod entities;
pub mod raw;
mod uncommitted;
mod writer;

pub use uncommitted::{Claimed, Uncommitted};
pub use writer::Writer;

use std::{path::Path, time::Duration};

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, RuntimeErr};
use secrecy::ExposeSecret;

use crate::config::Settings;

/// Opens the pool. For SQLite, creates the file's folder and sets WAL with a busy timeout so
/// that concurrent writers queue instead of failing.
pub async fn connect(settings: &Settings) -> Result<DatabaseConnection, DbErr> {
    let url = settings.database_url.expose_secret();
    if let Some(parent) = sqlite_path(url)
        .and_then(|path| Path::new(path).parent())
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| DbErr::Custom(format!("cannot create {}: {e}", parent.display())))?;
    }
    Database::connect(options(url, settings.database_pool_size)).await
}

/// Its statements are short (claims, notices); see [`connect_async_commit`].
const ASYNC_COMMIT_POOL_SIZE: u32 = 2;

/// A second, small pool whose commits on PostgreSQL do not wait for the disk
/// (`synchronous_commit = off`), for writes that must not cost a disk flush of their own:
/// - idempotency claims of the claim-first path: the WAL is written in order, so the flush of
///   the claimed change's own (synchronous) commit makes the claim durable too, and a claim
///   lost in a database crash had no committed change behind it, so the retry that finds no
///   claim runs the call as it should;
/// - notices of committed changes (`notify`): a notice is not durable in any case.
///
/// On SQLite (one writer, `synchronous = NORMAL` in WAL mode) it is the main pool.
pub async fn connect_async_commit(
    settings: &Settings,
    main: &DatabaseConnection,
) -> Result<DatabaseConnection, DbErr> {
    if main.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(main.clone());
    }
    let mut options = options(
        settings.database_url.expose_secret(),
        ASYNC_COMMIT_POOL_SIZE,
    );
    options.map_sqlx_postgres_opts(|opts| opts.options([("synchronous_commit", "off")]));
    Database::connect(options).await
}

fn options(url: &str, pool_size: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(pool_size)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        // A connection idle for a while is checked before use, so a restarted database
        // costs one failed ping instead of one failed request.
        .test_before_acquire(false)
        .test_before_acquire_if_idle_for(Duration::from_secs(10))
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|opts| {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            opts.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        })
        .map_sqlx_sqlite_pool_opts(|pool| {
            pool.after_connect(|conn, _| {
                Box::pin(async move { stable_plans(conn, true).await.map(drop) })
            })
        });
    options
}

/// Turns on SQLite's query planner stability guarantee for a connection (or, with `on`
/// false, only reads it); returns whether it is on. Without it, a statement whose `LIMIT`
/// is a bound parameter (every sea-orm `.one()`, every page) is planned again on each
/// execution, since SQLite may plan by the bound value: that re-parse was about 120 000
/// instructions per query, most of a Payme `CheckPerformTransaction`.
async fn stable_plans(
    conn: &mut sea_orm::sqlx::SqliteConnection,
    on: bool,
) -> Result<bool, sea_orm::sqlx::Error> {
    use libsqlite3_sys::{SQLITE_DBCONFIG_ENABLE_QPSG, SQLITE_OK, sqlite3_db_config};
    use std::ffi::c_int;
    let mut handle = conn.lock_handle().await?;
    let mut enabled: c_int = 0;
    // SAFETY: the handle is this open connection's, locked for the duration of the call;
    // ENABLE_QPSG takes an int (1 on, -1 read only) and a pointer to an int for the result.
    let rc = unsafe {
        sqlite3_db_config(
            handle.as_raw_handle().as_ptr(),
            SQLITE_DBCONFIG_ENABLE_QPSG,
            if on { 1 } else { -1 } as c_int,
            &mut enabled as *mut c_int,
        )
    };
    if rc != SQLITE_OK {
        return Err(sea_orm::sqlx::Error::Configuration(
            format!("sqlite3_db_config(ENABLE_QPSG) failed with code {rc}").into(),
        ));
    }
    Ok(enabled == 1)
}

pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

/// The file path of a `sqlite:` URL, if it names a file.
fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// `url` naming database `name` instead of its own (query string kept): how the tests and the
/// benchmark give themselves a database of their own on a PostgreSQL server.
pub fn with_database_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// The current time at the precision both databases store (microseconds), so that what a
/// call returns is exactly what a later read returns.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
}

/// True when the database could not be reached (as opposed to a query being refused).
pub fn is_connection_error(err: &DbErr) -> bool {
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(
                e.as_ref(),
                sea_orm::sqlx::Error::Io(_)
                    | sea_orm::sqlx::Error::PoolTimedOut
                    | sea_orm::sqlx::Error::PoolClosed
                    | sea_orm::sqlx::Error::WorkerCrashed
            )
        }
        _ => false,
    }
}

/// True for a unique-constraint violation, matched on the database's error code.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

#[cfg(test)]
mod tests {
    use super::{options, sqlite_path, stable_plans, with_database_name};

    #[tokio::test]
    async fn sqlite_connections_plan_each_statement_once() {
        let db = sea_orm::Database::connect(options("sqlite::memory:", 1))
            .await
            .expect("in-memory database");
        let mut conn = db
            .get_sqlite_connection_pool()
            .acquire()
            .await
            .expect("a connection");
        assert!(stable_plans(&mut conn, false).await.expect("read back"));
    }

    #[test]
    fn a_url_is_pointed_at_another_database() {
        assert_eq!(
            with_database_name("postgres://u@h:5432/postgres", "crm_test_1"),
            "postgres://u@h:5432/crm_test_1"
        );
        assert_eq!(
            with_database_name("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database_name("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn sqlite_paths_are_extracted_from_urls() {
        assert_eq!(
            sqlite_path("sqlite://data/crm.db?mode=rwc"),
            Some("data/crm.db")
        );
        assert_eq!(sqlite_path("sqlite:/tmp/x.db"), Some("/tmp/x.db"));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://localhost/crm"), None);
    }
}
