//! A change not yet committed, so that whoever commits it can add to it first: the
//! idempotency layer stores the call's answer with the change, so the two are committed
//! together or not at all.
//!
//! A change is either an open transaction (it had to read or lock before writing), or writes
//! not yet sent. The latter go to the database's [`Writer`] at commit, together with the other
//! changes committed at the same moment: on PostgreSQL as one statement (round trips are most
//! of what a write costs PostgreSQL here; README, Benchmarks), on SQLite as one transaction.
//!
//! Unsent writes can also be committed behind a claim ([`Uncommitted::commit_claiming`]): an
//! insert sent first, with them, whose unique key decides whether they happen at all. The
//! idempotency layer claims a key and stores its answer that way, so a fresh idempotent submit
//! is one statement.

use sea_orm::{
    ConnectionTrait, DatabaseTransaction, StatementBuilder,
    sea_query::{InsertStatement, SubQueryStatement},
};

use crate::{
    db::{Writer, is_unique_violation},
    error::AppError,
};

enum Pending {
    /// Nothing to commit.
    Nothing,
    Transaction(DatabaseTransaction),
    /// Inserts and updates. None of them may read what another writes: on PostgreSQL they
    /// share one snapshot.
    Writes(Box<Writes>),
}

struct Writes {
    writer: Writer,
    writes: Vec<SubQueryStatement>,
}

/// The result of a change, and the change, not yet committed. Dropping it rolls the change
/// back (or never sends it).
pub struct Uncommitted<T> {
    pending: Pending,
    value: T,
    /// What to do once committed (live notices, logs), never before.
    on_commit: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Uncommitted<T> {
    pub fn new(txn: DatabaseTransaction, value: T) -> Self {
        Self::with(Pending::Transaction(txn), value)
    }

    /// Writes to send together at commit (see the module's note).
    pub fn writes(writer: Writer, writes: Vec<SubQueryStatement>, value: T) -> Self {
        Self::with(Pending::Writes(Box::new(Writes { writer, writes })), value)
    }

    /// A result that needs no commit: nothing changed, or the change is already committed.
    pub fn settled(value: T) -> Self {
        Self::with(Pending::Nothing, value)
    }

    fn with(pending: Pending, value: T) -> Self {
        Self {
            pending,
            value,
            on_commit: None,
        }
    }

    pub fn on_commit(mut self, effect: impl FnOnce() + Send + 'static) -> Self {
        self.on_commit = Some(Box::new(effect));
        self
    }

    pub fn value(&self) -> &T {
        &self.value
    }

    /// True when there is nothing to commit.
    pub fn is_settled(&self) -> bool {
        matches!(self.pending, Pending::Nothing)
    }

    /// True when the change is writes not yet sent: nothing of it has reached the database.
    pub fn is_unsent(&self) -> bool {
        matches!(self.pending, Pending::Writes(_))
    }

    /// Adds a write to the change: run now in its transaction, or sent with its other writes.
    pub async fn add<W>(&mut self, write: W) -> Result<(), AppError>
    where
        W: StatementBuilder + Into<SubQueryStatement>,
    {
        match &mut self.pending {
            Pending::Nothing => {
                let cause = anyhow::anyhow!("a write added to a settled change");
                return Err(AppError::Internal(cause));
            }
            Pending::Transaction(txn) => {
                txn.execute(&write).await?;
            }
            Pending::Writes(pending) => pending.writes.push(write.into()),
        }
        Ok(())
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Uncommitted<U> {
        Uncommitted {
            pending: self.pending,
            value: f(self.value),
            on_commit: self.on_commit,
        }
    }

    pub async fn commit(self) -> Result<T, AppError> {
        match self.pending {
            Pending::Nothing => {}
            Pending::Transaction(txn) => txn.commit().await?,
            Pending::Writes(pending) => pending.send(None).await?,
        }
        if let Some(effect) = self.on_commit {
            effect();
        }
        Ok(self.value)
    }
}

/// How [`Uncommitted::commit_claiming`] ended.
pub enum Claimed<T> {
    /// The claim and the writes are committed.
    Committed(T),
    /// A unique key was taken (the claim's, as a rule): nothing was written, and the change is
    /// handed back unsent.
    Taken(Uncommitted<T>),
}

impl<T> Uncommitted<T> {
    /// Commits unsent writes together with `claim`, an insert sent before them: one statement
    /// on PostgreSQL, one transaction on SQLite. When a unique constraint refuses the claim
    /// (or any of the writes), all of it is rolled back and the change comes back as
    /// [`Claimed::Taken`], for the caller to find out who holds the key. Only for an
    /// [`Self::is_unsent`] change: anything else is an internal error, as nothing could
    /// undo what it already did.
    pub async fn commit_claiming(self, claim: InsertStatement) -> Result<Claimed<T>, AppError> {
        let Pending::Writes(pending) = &self.pending else {
            let cause = anyhow::anyhow!("a claim added to a change already sent");
            return Err(AppError::Internal(cause));
        };
        let claim = SubQueryStatement::from(claim);
        match pending.send(Some(&claim)).await {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => return Ok(Claimed::Taken(self)),
            Err(e) => return Err(e.into()),
        }
        if let Some(effect) = self.on_commit {
            effect();
        }
        Ok(Claimed::Committed(self.value))
    }
}

impl Writes {
    /// Sends `first` (when given) and the writes, all or nothing; the statements are kept, so
    /// a refused change can be sent again.
    async fn send(&self, first: Option<&SubQueryStatement>) -> Result<(), sea_orm::DbErr> {
        self.writer
            .send(first.into_iter().chain(&self.writes))
            .await
    }
}
