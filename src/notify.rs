//! Change notifications for live streams, on every replica.
//!
//! On PostgreSQL a change sends `pg_notify` inside its own transaction, so the notice goes out
//! exactly when (and only if) the change commits, to every replica listening (this one too);
//! each replica loads the changed object and broadcasts it to its local subscribers. On SQLite
//! there is only one process: the change is broadcast locally after it commits.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    sea_query::{Func, Query, SelectStatement},
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Subscribers further behind than this many events are told to reconnect.
const BUFFER: usize = 1024;

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
}

impl<T: Clone + Send + 'static> Notifier<T> {
    pub fn new(db: &DatabaseConnection, channel: &'static str, load: Loader<T>) -> Self {
        Self {
            channel,
            tx: broadcast::channel(BUFFER).0,
            postgres: db.get_database_backend() == DbBackend::Postgres,
            load,
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

    /// The `SELECT pg_notify(..)` of [`Self::announce`], to run with the change it announces
    /// (`Uncommitted::writes`); `None` on SQLite.
    pub fn announcement(&self, notice: &Notice) -> Result<Option<SelectStatement>, DbErr> {
        if !self.postgres {
            return Ok(None);
        }
        let payload = serde_json::to_string(notice).map_err(|e| DbErr::Custom(e.to_string()))?;
        let notify = Func::cust("pg_notify").arg(self.channel).arg(payload);
        Ok(Some(Query::select().expr(notify).to_owned()))
    }

    /// After the change committed: on SQLite, the local broadcast (PostgreSQL's listener does
    /// it there).
    pub fn committed(&self, event: T) {
        if !self.postgres {
            let _ = self.tx.send(event);
        }
    }

    /// On PostgreSQL: listens until shutdown, reconnecting by itself. Returns once `LISTEN` is
    /// in place, so no change made after start-up is missed.
    pub async fn start_listener(
        self: &Arc<Self>,
        url: &str,
        db: DatabaseConnection,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, DbErr> {
        use sea_orm::sqlx::postgres::PgListener;
        if !self.postgres {
            return Ok(None);
        }
        let conn_err = |e: sea_orm::sqlx::Error| DbErr::Custom(format!("LISTEN: {e}"));
        let mut listener = PgListener::connect(url).await.map_err(conn_err)?;
        listener.listen(self.channel).await.map_err(conn_err)?;
        let this = self.clone();
        Ok(Some(tokio::spawn(async move {
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
        })))
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
