//! A change made in a transaction that is still open, so that whoever commits it can add to
//! it first: the idempotency layer stores the call's answer in the same transaction as the
//! change, so the two are committed together or not at all.

use sea_orm::DatabaseTransaction;

use crate::error::AppError;

/// The result of a change, and its transaction, not yet committed. Dropping it rolls the change
/// back.
pub struct Uncommitted<T> {
    txn: Option<DatabaseTransaction>,
    value: T,
    /// What to do once committed (live notices, logs), never before.
    on_commit: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Uncommitted<T> {
    pub fn new(txn: DatabaseTransaction, value: T) -> Self {
        Self {
            txn: Some(txn),
            value,
            on_commit: None,
        }
    }

    /// A result that needs no commit: nothing changed, or the change is already committed.
    pub fn settled(value: T) -> Self {
        Self {
            txn: None,
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

    /// The open transaction, to add to it; `None` when there is nothing to commit.
    pub fn transaction(&self) -> Option<&DatabaseTransaction> {
        self.txn.as_ref()
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Uncommitted<U> {
        Uncommitted {
            txn: self.txn,
            value: f(self.value),
            on_commit: self.on_commit,
        }
    }

    pub async fn commit(self) -> Result<T, AppError> {
        if let Some(txn) = self.txn {
            txn.commit().await?;
        }
        if let Some(effect) = self.on_commit {
            effect();
        }
        Ok(self.value)
    }
}
