//! The audit log: who did what to which object, with what outcome. Never secrets.
//!
//! State changes write their row inside their own transaction (`AuditEvent::write`). Events with
//! no transaction of their own, such as refused credentials, go through `AuditSink`: a bounded
//! queue written in batches in the background, so that a flood of bad tokens costs no database
//! round trip on the request path and cannot grow memory without bound.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, Set};
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

#[derive(Debug, Clone)]
pub struct AuditEvent {
    row: audit_log::ActiveModel,
}

impl AuditEvent {
    pub fn new(actor: &Actor, action: impl Into<String>, outcome: &str) -> Self {
        Self {
            row: audit_log::ActiveModel {
                occurred_at: Set(crate::db::now()),
                actor_kind: Set(actor.kind.to_owned()),
                actor_id: Set(truncate(&actor.id, 64)),
                action: Set(truncate(&action.into(), 128)),
                target_id: Set(None),
                outcome: Set(outcome.to_owned()),
                client_ip: Set(actor.client_ip.clone()),
                request_id: Set(actor.request_id.as_deref().map(|r| truncate(r, 128))),
                trace_id: Set(actor.trace_id.clone()),
                detail: Set(None),
                ..Default::default()
            },
        }
    }

    pub fn target(mut self, id: &str) -> Self {
        self.row.target_id = Set(Some(truncate(id, 64)));
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.row.detail = Set(Some(detail));
        self
    }

    /// Writes the row on `conn`: pass the transaction that makes the audited change.
    pub async fn write<C: ConnectionTrait>(self, conn: &C) -> Result<(), DbErr> {
        audit_log::Entity::insert(self.row)
            .exec_without_returning(conn)
            .await?;
        Ok(())
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
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
        let rows: Vec<_> = batch.drain(..).map(|e| e.row).collect();
        let count = rows.len();
        // A failed batch is retried a few times (the database may be restarting), then logged.
        for attempt in 1..=3 {
            match audit_log::Entity::insert_many(rows.clone())
                .exec_without_returning(&db)
                .await
            {
                Ok(_) => break,
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, attempt, "audit batch write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                }
                Err(e) => tracing::error!(error = %e, count, "audit batch lost"),
            }
        }
    }
}
