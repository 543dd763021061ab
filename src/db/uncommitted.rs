//! A change not yet committed, so that whoever commits it can add to it first: the
//! idempotency layer stores the call's answer with the change, so the two are committed
//! together or not at all.
//!
//! A change is either an open transaction (it had to read or lock before writing), or writes
//! not yet sent. The latter go, on PostgreSQL, as one statement at commit: data-modifying
//! `WITH` clauses, which PostgreSQL runs all or nothing, in one round trip and with no
//! `BEGIN`/`COMMIT` of their own (round trips are most of what a write costs PostgreSQL here;
//! README, Benchmarks). SQLite's `WITH` cannot write, so there they run one by one in a
//! transaction (in-process: no round trips to save).

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, StatementBuilder,
    TransactionTrait,
    sea_query::{
        Alias, CommonTableExpression, Expr, Query, SelectStatement, SubQueryStatement, WithClause,
        WithQuery,
    },
};

use crate::error::AppError;

enum Pending {
    /// Nothing to commit.
    Nothing,
    Transaction(DatabaseTransaction),
    /// Inserts and updates, then an optional `SELECT` run for its side effect (`pg_notify`).
    /// None of them may read what another writes: on PostgreSQL they share one snapshot.
    Writes(Box<Writes>),
}

struct Writes {
    db: DatabaseConnection,
    writes: Vec<SubQueryStatement>,
    then: Option<SelectStatement>,
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

    /// Writes to send together at commit, then `then` (see the module's note).
    pub fn writes(
        db: DatabaseConnection,
        writes: Vec<SubQueryStatement>,
        then: Option<SelectStatement>,
        value: T,
    ) -> Self {
        Self::with(
            Pending::Writes(Box::new(Writes { db, writes, then })),
            value,
        )
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
            Pending::Writes(pending) => send_writes(*pending).await?,
        }
        if let Some(effect) = self.on_commit {
            effect();
        }
        Ok(self.value)
    }
}

async fn send_writes(Writes { db, writes, then }: Writes) -> Result<(), AppError> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute(&one_statement(writes, then)).await?;
        return Ok(());
    }
    let txn = db.begin().await?;
    for write in writes {
        match write {
            SubQueryStatement::InsertStatement(s) => txn.execute(&s).await?,
            SubQueryStatement::UpdateStatement(s) => txn.execute(&s).await?,
            SubQueryStatement::DeleteStatement(s) => txn.execute(&s).await?,
            SubQueryStatement::SelectStatement(s) => txn.execute(&s).await?,
            SubQueryStatement::WithStatement(s) => txn.execute(&s).await?,
        };
    }
    if let Some(select) = then {
        txn.execute(&select).await?;
    }
    txn.commit().await?;
    Ok(())
}

/// `WITH w0 AS (<write>), w1 AS (<write>) … SELECT <then>` (PostgreSQL).
fn one_statement(writes: Vec<SubQueryStatement>, then: Option<SelectStatement>) -> WithQuery {
    let mut with = WithClause::new();
    for (i, write) in writes.into_iter().enumerate() {
        with.cte(
            CommonTableExpression::new()
                .query(write)
                .table_name(Alias::new(format!("w{i}")))
                .to_owned(),
        );
    }
    let select = then.unwrap_or_else(|| Query::select().expr(Expr::val(1)).to_owned());
    with.query(select)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::sea_query::{ExprTrait, PostgresQueryBuilder};

    #[test]
    fn writes_become_one_statement_on_postgres() {
        let insert = Query::insert()
            .into_table(Alias::new("a"))
            .columns([Alias::new("x")])
            .values_panic([1.into()])
            .to_owned();
        let update = Query::update()
            .table(Alias::new("b"))
            .value(Alias::new("y"), 2)
            .and_where(Expr::col(Alias::new("z")).eq(3))
            .to_owned();
        let notify = Query::select()
            .expr(
                sea_orm::sea_query::Func::cust("pg_notify")
                    .arg("c")
                    .arg("p"),
            )
            .to_owned();
        let (sql, values) = one_statement(vec![insert.into(), update.into()], Some(notify))
            .build(PostgresQueryBuilder);
        assert_eq!(
            sql,
            r#"WITH "w0" AS (INSERT INTO "a" ("x") VALUES ($1)) , "w1" AS (UPDATE "b" SET "y" = $2 WHERE "z" = $3) SELECT pg_notify($4, $5)"#
        );
        assert_eq!(values.0.len(), 5);
    }
}
