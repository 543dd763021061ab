//! The audit log: who did what to which object, with what outcome. Never secrets.
//!
//! State changes write their row inside their own transaction (`AuditEvent::write`). Events with
//! no transaction of their own, such as refused credentials, go through `AuditSink`: a bounded
//! queue written in batches in the background, so that a flood of bad tokens costs no database
//! round trip on the request path and cannot grow memory without bound.

use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryTrait, Set,
    sea_query::InsertStatement,
};
use tokio::sync::mpsc;

use crate::{auth::Principal, db::entities::audit_log, transport::context::RequestContext};

/// The outcome of a successful action; failures record their reason.
pub const OK: &str = "OK";

const QUEUE_CAPACITY: usize = 10_000;
const BATCH: usize = 500;

/// Who acted, and the request it came through.
#[derive(Debug, Clone)]
pub struct Actor {
    pub kind: &'static str,
    pub id: String,
    pub client_ip: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
}

impl Actor {
    /// The caller of a request; without a principal, the client address stands for it.
    pub fn from_request(principal: Option<&Principal>, ctx: &RequestContext) -> Self {
        let client_ip = ctx.client_ip.to_string();
        let (kind, id) = match principal {
            Some(p) => {
                let (kind, id) = p.actor();
                (kind, id.to_owned())
            }
            None => ("anonymous", client_ip.clone()),
        };
        Self {
            kind,
            id,
            client_ip: Some(client_ip),
            request_id: Some(ctx.request_id.clone()),
            trace_id: ctx.trace_id.clone(),
        }
    }

    /// An operator at the command line.
    pub fn operator() -> Self {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        Self {
            kind: "operator",
            id: format!("cli:{user}"),
            client_ip: None,
            request_id: None,
            trace_id: None,
        }
    }
}

/// One audit row, its values cut to the columns' sizes.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    occurred_at: chrono::DateTime<chrono::Utc>,
    actor_kind: &'static str,
    actor_id: String,
    action: String,
    target_id: Option<String>,
    outcome: String,
    client_ip: Option<String>,
    request_id: Option<String>,
    trace_id: Option<String>,
    detail: Option<serde_json::Value>,
}

impl AuditEvent {
    pub fn new(actor: &Actor, action: impl AsRef<str>, outcome: &str) -> Self {
        Self {
            occurred_at: crate::db::now(),
            actor_kind: actor.kind,
            actor_id: truncate(&actor.id, 64),
            action: truncate(action.as_ref(), 128),
            target_id: None,
            outcome: outcome.to_owned(),
            client_ip: actor.client_ip.clone(),
            request_id: actor.request_id.as_deref().map(|r| truncate(r, 128)),
            trace_id: actor.trace_id.clone(),
            detail: None,
        }
    }

    pub fn target(mut self, id: &str) -> Self {
        self.target_id = Some(truncate(id, 64));
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Writes the row on `conn`: pass the transaction that makes the audited change.
    pub async fn write<C: ConnectionTrait>(self, conn: &C) -> Result<(), DbErr> {
        conn.execute(&self.insert_statement()).await?;
        Ok(())
    }

    /// The row's `INSERT`, to run with the change it records (`Uncommitted::writes`).
    pub fn insert_statement(self) -> InsertStatement {
        let row = audit_log::ActiveModel {
            occurred_at: Set(self.occurred_at),
            actor_kind: Set(self.actor_kind.to_owned()),
            actor_id: Set(self.actor_id),
            action: Set(self.action),
            target_id: Set(self.target_id),
            outcome: Set(self.outcome),
            client_ip: Set(self.client_ip),
            request_id: Set(self.request_id),
            trace_id: Set(self.trace_id),
            detail: Set(self.detail),
            ..Default::default()
        };
        audit_log::Entity::insert(row).into_query()
    }
}

const INSERT: &str = "INSERT INTO audit_log (occurred_at, actor_kind, actor_id, action, \
    target_id, outcome, client_ip, request_id, trace_id, detail) ";

/// Writes a batch of rows in one multi-row INSERT, through sqlx on the pool: building the
/// same statement through sea-orm cost three times the insert itself.
async fn insert_batch(db: &DatabaseConnection, rows: &[AuditEvent]) -> Result<(), DbErr> {
    use sea_orm::{DbBackend, sqlx::QueryBuilder};
    let written = match db.get_database_backend() {
        DbBackend::Postgres => values(QueryBuilder::new(INSERT), rows)
            .build()
            .execute(db.get_postgres_connection_pool())
            .await
            .map(drop),
        DbBackend::Sqlite => values(QueryBuilder::new(INSERT), rows)
            .build()
            .execute(db.get_sqlite_connection_pool())
            .await
            .map(drop),
        other => return Err(DbErr::Custom(format!("unsupported database {other:?}"))),
    };
    written.map_err(crate::db::raw::query_err)
}

fn values<'a, DB>(
    mut insert: sea_orm::sqlx::QueryBuilder<DB>,
    rows: &'a [AuditEvent],
) -> sea_orm::sqlx::QueryBuilder<DB>
where
    DB: sea_orm::sqlx::Database,
    chrono::DateTime<chrono::Utc>: sea_orm::sqlx::Encode<'a, DB> + sea_orm::sqlx::Type<DB>,
    &'a str: sea_orm::sqlx::Encode<'a, DB> + sea_orm::sqlx::Type<DB>,
    Option<&'a str>: sea_orm::sqlx::Encode<'a, DB> + sea_orm::sqlx::Type<DB>,
    Option<&'a serde_json::Value>: sea_orm::sqlx::Encode<'a, DB> + sea_orm::sqlx::Type<DB>,
{
    insert.push_values(rows, |mut row, e| {
        row.push_bind(e.occurred_at)
            .push_bind(e.actor_kind)
            .push_bind(e.actor_id.as_str())
            .push_bind(e.action.as_str())
            .push_bind(e.target_id.as_deref())
            .push_bind(e.outcome.as_str())
            .push_bind(e.client_ip.as_deref())
            .push_bind(e.request_id.as_deref())
            .push_bind(e.trace_id.as_deref())
            .push_bind(e.detail.as_ref());
    });
    insert
}

fn truncate(s: &str, max_chars: usize) -> String {
    // No more bytes than the limit means no more characters either (the usual case).
    if s.len() <= max_chars {
        return s.to_owned();
    }
    s.chars().take(max_chars).collect()
}

/// A queue for audit rows that have no transaction of their own.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
}

impl AuditSink {
    /// Starts the writer; it drains the queue and stops once every sender is gone.
    pub fn spawn(db: DatabaseConnection) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let handle = tokio::spawn(write_batches(db, rx));
        (Self { tx }, handle)
    }

    /// Queues a row. When the queue is full (a flood), the row is dropped and counted in the log
    /// rather than slowing the request that caused it.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_err() {
            tracing::warn!("audit queue full; an audit row was dropped");
        }
    }

    /// Queues a row that must not be lost (a payment provider's call): when the queue is full
    /// the request waits for room, so a flood slows down to what the database can write.
    pub async fn record_waiting(&self, event: AuditEvent) {
        if self.tx.send(event).await.is_err() {
            tracing::error!("audit writer stopped; an audit row was dropped");
        }
    }
}

async fn write_batches(db: DatabaseConnection, mut rx: mpsc::Receiver<AuditEvent>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let count = batch.len();
        // A failed batch is retried a few times (the database may be restarting), then logged.
        for attempt in 1..=3 {
            match insert_batch(&db, &batch).await {
                Ok(_) => break,
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, attempt, "audit batch write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                }
                Err(e) => tracing::error!(error = %e, count, "audit batch lost"),
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn fields_are_cut_to_a_number_of_characters_not_bytes() {
        assert_eq!(truncate("short", 8), "short");
        assert_eq!(truncate("exactly8", 8), "exactly8");
        assert_eq!(truncate("ninechars", 8), "ninechar");
        // Cyrillic: two bytes a character; cut by characters, never inside one.
        assert_eq!(truncate("привет", 4), "прив");
        assert_eq!(truncate("при", 4), "при");
    }
}
