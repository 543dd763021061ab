//! Change notifications for live streams, on every replica.
//!
//! On PostgreSQL a notice goes through `pg_notify` to every replica listening (this one too);
//! each replica loads the changed object and broadcasts it to its local subscribers. On SQLite
//! there is only one process: the change is broadcast locally after it commits.
//!
//! A notice reaches PostgreSQL one of two ways:
//! - [`Notifier::announce`], inside the change's own transaction: it goes out exactly when,
//!   and only if, the change commits. The price: a transaction that notifies holds a
//!   database-wide lock from its commit until its WAL is on disk, so notifying commits cannot
//!   share a flush and run one at a time (pgbench, 32 clients, here: 6 100 inserts/s, 1 800
//!   to 2 400 with `pg_notify` in the same statement). Payments use it: they are few, and
//!   their watchers wait for exactly that change.
//! - [`Notifier::after_commit`], once the change has committed: queued and sent in batches by
//!   a task of its own (`SELECT pg_notify(..), pg_notify(..)` on a pool that commits without
//!   waiting for the disk), so the bulk of writes never queue behind that lock. Applications
//!   use it (bots submit them by the thousand). The one gap: a replica that dies in the few
//!   milliseconds between a commit and its batch takes that live notice with it; the change is
//!   committed, and watchers see it when they next list.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    sea_query::{Func, Query, SelectStatement},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

/// Subscribers further behind than this many events are told to reconnect.
const BUFFER: usize = 1024;
/// Notices of committed changes waiting for the announcer; past this, new ones are dropped
/// (and logged): the database has been unreachable for a while.
const OUTBOX: usize = 8192;
/// Notices per `SELECT pg_notify(..), ..` (each is a bound pair of parameters).
const BATCH: usize = 128;
/// How long a batch is retried while PostgreSQL does not answer.
const RETRY_FOR: Duration = Duration::from_secs(5);

/// What travels through PostgreSQL: which object changed, and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notice {
    pub kind: String,
    pub id: String,
}

/// Turns a notice into the event subscribers receive (`None`: nothing to send).
pub type Loader<T> = fn(DatabaseConnection, Notice) -> BoxFuture<'static, Result<Option<T>, DbErr>>;

pub struct Notifier<T> {
    channel: &'static str,
    tx: broadcast::Sender<T>,
    postgres: bool,
    load: Loader<T>,
    /// Payloads queued by [`Self::after_commit`], and their receiving end until the
    /// announcer takes it.
    outbox: mpsc::Sender<String>,
    outbox_rx: Mutex<Option<mpsc::Receiver<String>>>,
}

impl<T: Clone + Send + 'static> Notifier<T> {
    pub fn new(db: &DatabaseConnection, channel: &'static str, load: Loader<T>) -> Self {
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        Self {
            channel,
            tx: broadcast::channel(BUFFER).0,
            postgres: db.get_database_backend() == DbBackend::Postgres,
            load,
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<T> {
        self.tx.subscribe()
    }

    /// Part of the change's transaction: on PostgreSQL, the notice every replica receives.
    pub async fn announce<C: ConnectionTrait>(
        &self,
        txn: &C,
        notice: &Notice,
    ) -> Result<(), DbErr> {
        if let Some(announcement) = self.announcement(notice)? {
            txn.execute(&announcement).await?;
        }
        Ok(())
    }

    /// The `SELECT pg_notify(..)` of [`Self::announce`]; `None` on SQLite.
    fn announcement(&self, notice: &Notice) -> Result<Option<SelectStatement>, DbErr> {
        if !self.postgres {
            return Ok(None);
        }
        let payload = serde_json::to_string(notice).map_err(|e| DbErr::Custom(e.to_string()))?;
        let notify = Func::cust("pg_notify").arg(self.channel).arg(payload);
        Ok(Some(Query::select().expr(notify).to_owned()))
    }

    /// After a change that announced itself ([`Self::announce`]) committed: on SQLite, the
    /// local broadcast (PostgreSQL's listener does it there).
    pub fn committed(&self, event: T) {
        if !self.postgres {
            let _ = self.tx.send(event);
        }
    }

    /// After a change that did not announce itself committed: on SQLite, the local
    /// broadcast; on PostgreSQL, its notice is queued for the announcer (module note).
    pub fn after_commit(&self, notice: &Notice, event: T) {
        if !self.postgres {
            let _ = self.tx.send(event);
            return;
        }
        let queued = serde_json::to_string(notice)
            .map_err(|e| e.to_string())
            .and_then(|payload| self.outbox.try_send(payload).map_err(|e| e.to_string()));
        if let Err(e) = queued {
            tracing::warn!(error = %e, channel = self.channel, id = %notice.id, "a change notice was dropped");
        }
    }

    /// On PostgreSQL: listens until shutdown, reconnecting by itself, and announces what
    /// [`Self::after_commit`] queued through `announcer` (a pool that commits without waiting
    /// for the disk: a notice needs no durability), sending what is still queued at shutdown.
    /// Returns once `LISTEN` is in place, so no change made after start-up is missed.
    pub async fn start_listener(
        self: &Arc<Self>,
        url: &str,
        db: DatabaseConnection,
        announcer: DatabaseConnection,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, DbErr> {
        use sea_orm::sqlx::postgres::PgListener;
        if !self.postgres {
            return Ok(None);
        }
        let outbox = self
            .outbox_rx
            .lock()
            .map_err(|_| DbErr::Custom("notifier lock poisoned".into()))?
            .take()
            .ok_or_else(|| DbErr::Custom("the listener is already started".into()))?;
        let conn_err = |e: sea_orm::sqlx::Error| DbErr::Custom(format!("LISTEN: {e}"));
        let mut listener = PgListener::connect(url).await.map_err(conn_err)?;
        listener.listen(self.channel).await.map_err(conn_err)?;
        let this = self.clone();
        let announcing = self
            .clone()
            .announce_queued(announcer, outbox, shutdown.clone());
        let listening = async move {
            loop {
                let notice = tokio::select! {
                    n = listener.recv() => n,
                    _ = shutdown.changed() => return,
                };
                match notice {
                    Ok(n) => this.deliver(&db, n.payload()).await,
                    Err(e) => {
                        tracing::warn!(error = %e, channel = this.channel, "listener lost PostgreSQL; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        Ok(Some(tokio::spawn(async move {
            tokio::join!(listening, announcing);
        })))
    }

    /// Sends the queued notices in batches, as they come, until shutdown; then sends what is
    /// left, once and without retrying (the process is exiting), and returns.
    async fn announce_queued(
        self: Arc<Self>,
        db: DatabaseConnection,
        mut outbox: mpsc::Receiver<String>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let stopping = tokio::select! {
                _ = outbox.recv_many(&mut batch, BATCH) => false,
                _ = shutdown.changed() => true,
            };
            if stopping {
                while let Ok(payload) = outbox.try_recv() {
                    batch.push(payload);
                }
            }
            let retry_for = if stopping { Duration::ZERO } else { RETRY_FOR };
            for chunk in batch.chunks(BATCH) {
                self.send_batch(&db, chunk, retry_for).await;
            }
            batch.clear();
            if stopping {
                return;
            }
        }
    }

    /// One `SELECT pg_notify($1, $2), pg_notify($1, $3), ..`, retried for `retry_for` if
    /// PostgreSQL does not answer; past that the notices are dropped and logged.
    async fn send_batch(&self, db: &DatabaseConnection, payloads: &[String], retry_for: Duration) {
        if payloads.is_empty() {
            return;
        }
        let mut select = Query::select();
        for payload in payloads {
            select.expr(
                Func::cust("pg_notify")
                    .arg(self.channel)
                    .arg(payload.as_str()),
            );
        }
        let deadline = tokio::time::Instant::now() + retry_for;
        let mut delay = Duration::from_millis(50);
        loop {
            match db.execute(&select).await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(error = %e, channel = self.channel, "announcing changes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(error = %e, channel = self.channel, dropped = payloads.len(), "announcing changes failed; their live notices are lost");
                    return;
                }
            }
        }
    }

    async fn deliver(&self, db: &DatabaseConnection, payload: &str) {
        // Nobody watches on this replica: loading the object would only cost a query.
        if self.tx.receiver_count() == 0 {
            return;
        }
        let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
            tracing::warn!(payload, "malformed notice ignored");
            return;
        };
        match (self.load)(db.clone(), notice).await {
            Ok(Some(event)) => {
                let _ = self.tx.send(event);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, channel = self.channel, "loading a notified object failed")
            }
        }
    }
}
