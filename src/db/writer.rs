//! Where unsent writes ([`super::Uncommitted::writes`]) go at commit.
//!
//! - PostgreSQL: as one statement of data-modifying `WITH` clauses (all or nothing by
//!   itself, one round trip, no `BEGIN`/`COMMIT`), sent by one of a few tasks (half the
//!   pool). A change that finds them all busy waits, and the next free task sends every
//!   change waiting as one statement: one round trip, one parse and one commit for all of
//!   them. If that statement fails (one change's idempotency key was taken, say), nothing of
//!   it happened, and each change goes again alone, for its own answer.
//! - SQLite: to a task of its own that commits whatever changes are waiting as one
//!   transaction, each change in a savepoint of its own. SQLite lets one connection write at
//!   a time anyway; committed one by one from several connections, 32 submits in flight
//!   spent their time in SQLite's busy-wait sleeps, in re-reading pages (a connection's page
//!   cache is dropped whenever another connection wrote) and in a WAL checkpoint, with its
//!   two `fsync`s, every few commits. In one transaction, consecutive changes share their
//!   pages, their WAL frames and their commit. Each change is one call to the connection's
//!   thread, in a savepoint of its own: one that fails is undone alone and gets its own
//!   error; a batch whose transaction fails is retried one change per transaction, so every
//!   change still gets its own answer. A caller is answered only once its change is
//!   committed. (One call for the whole batch measured no faster: its text differs with the
//!   batch's size, so SQLite prepares it anew each time, where a change's text is prepared
//!   once and cached.)

use std::sync::Arc;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement, TransactionTrait,
    sea_query::{
        Alias, CommonTableExpression, Expr, Query, SqliteQueryBuilder, SubQueryStatement,
        WithClause, WithQuery,
    },
};
use tokio::sync::{Mutex, mpsc, oneshot};

/// Changes at most in one SQLite transaction or one PostgreSQL statement.
const BATCH: usize = 32;
/// Changes at most waiting for a writer task; senders wait beyond that.
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct Writer {
    /// The writer tasks' queue. They end when every sender is gone.
    queue: mpsc::Sender<Job>,
}

struct Job {
    writes: Vec<SubQueryStatement>,
    done: oneshot::Sender<Result<(), DbErr>>,
}

impl Writer {
    /// Starts the writer tasks on the current tokio runtime: one on SQLite, half the pool's
    /// connections on PostgreSQL.
    pub fn new(db: DatabaseConnection) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        match db.get_database_backend() {
            DbBackend::Postgres => {
                let connections = db
                    .get_postgres_connection_pool()
                    .options()
                    .get_max_connections();
                let jobs = Arc::new(Mutex::new(jobs));
                for _ in 0..(connections / 2).max(1) {
                    tokio::spawn(postgres_batches(db.clone(), jobs.clone()));
                }
            }
            _ => {
                tokio::spawn(sqlite_batches(db, jobs));
            }
        }
        Self { queue }
    }

    /// Sends the writes of one change, all or nothing; returns once they are committed.
    pub async fn send<'a>(
        &self,
        writes: impl Iterator<Item = &'a SubQueryStatement>,
    ) -> Result<(), DbErr> {
        let stopped = || DbErr::Custom("the database writer has stopped".into());
        let (done, answer) = oneshot::channel();
        let job = Job {
            writes: writes.cloned().collect(),
            done,
        };
        self.queue.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A PostgreSQL writer task: takes the changes waiting (up to [`BATCH`]) and sends them in
/// as few statements as it can ([`send_together`]).
async fn postgres_batches(db: DatabaseConnection, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if jobs.lock().await.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        // In statements of 1, 2, 4, 8… changes: each size is a statement text of its own,
        // which PostgreSQL parses and plans once per connection (prepared and cached), and a
        // new text was a slow answer for all of its changes.
        while !batch.is_empty() {
            let size = 1 << batch.len().ilog2();
            send_together(&db, batch.drain(..size).collect()).await;
        }
    }
}

/// The changes as one statement. When PostgreSQL refuses it, nothing of it happened, and
/// each change goes again as a statement of its own, for its own answer; when the connection
/// failed, each is told so and none goes again.
async fn send_together(db: &DatabaseConnection, jobs: Vec<Job>) {
    if jobs.len() > 1 {
        let all = one_statement(jobs.iter().flat_map(|job| &job.writes));
        match db.execute(&all).await {
            Ok(_) => {
                for job in jobs {
                    let _ = job.done.send(Ok(()));
                }
                return;
            }
            // PostgreSQL refused the statement: nothing of it happened, each goes again alone.
            Err(e) if refused_by_database(&e) => {}
            // The connection failed: whether the statement was committed is not known, so
            // none is sent again (a retry with the same idempotency key finds out).
            Err(e) => {
                let cause = e.to_string();
                for job in jobs {
                    let e = DbErr::Conn(RuntimeErr::Internal(cause.clone()));
                    let _ = job.done.send(Err(e));
                }
                return;
            }
        }
    }
    // One after another, in the order they came: the first of two changes that collide wins.
    for job in jobs {
        let result = db.execute(&one_statement(job.writes.iter())).await;
        let _ = job.done.send(result.map(drop));
    }
}

/// True when the database answered the statement with an error (so it did nothing), as
/// opposed to a connection that failed on the way.
fn refused_by_database(e: &DbErr) -> bool {
    match e {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(e.as_ref(), sea_orm::sqlx::Error::Database(_))
        }
        _ => false,
    }
}

/// The SQLite writer task: waits for a change, takes whatever else is waiting with it (up to
/// [`BATCH`]) and commits them.
async fn sqlite_batches(db: DatabaseConnection, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        commit(&db, std::mem::take(&mut batch)).await;
    }
}

async fn commit(db: &DatabaseConnection, jobs: Vec<Job>) {
    if jobs.len() > 1 {
        match together(db, &jobs).await {
            Ok(results) => {
                for (job, result) in jobs.into_iter().zip(results) {
                    let _ = job.done.send(result);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, changes = jobs.len(), "a batch of SQLite writes failed; committing them one by one");
            }
        }
    }
    for job in jobs {
        let _ = job.done.send(alone(db, &job.writes).await);
    }
}

/// The changes in one transaction, each in its savepoint: one that fails is rolled back to
/// its savepoint and keeps its error. `Err` when the transaction itself failed: then none of
/// it is committed.
async fn together(db: &DatabaseConnection, jobs: &[Job]) -> Result<Vec<Result<(), DbErr>>, DbErr> {
    let txn = db.begin().await?;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        match txn.execute_raw(in_savepoint(job.writes.iter())).await {
            Ok(_) => results.push(Ok(())),
            Err(e) => {
                // Fails when SQLite already rolled back the whole transaction (it does on
                // some errors, such as a full disk): the `?` gives up on the batch.
                txn.execute_unprepared(&format!("ROLLBACK TO {SAVEPOINT}; RELEASE {SAVEPOINT}"))
                    .await?;
                results.push(Err(e));
            }
        }
    }
    txn.commit().await?;
    Ok(results)
}

async fn alone(db: &DatabaseConnection, writes: &[SubQueryStatement]) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    txn.execute_raw(in_savepoint(writes.iter())).await?;
    txn.commit().await
}

const SAVEPOINT: &str = "change";

/// `SAVEPOINT change; <write>; <write>; …; RELEASE change` with the writes' values in order
/// (SQLite: its driver runs the statements one after the other and binds each its share of
/// the values, in one call to the connection's thread). A failing write stops the string,
/// leaving the savepoint for the caller to roll back.
fn in_savepoint<'a>(writes: impl Iterator<Item = &'a SubQueryStatement>) -> Statement {
    let mut sql = format!("SAVEPOINT {SAVEPOINT}");
    let mut values = Vec::new();
    for write in writes {
        let (text, mut bound) = match write {
            SubQueryStatement::InsertStatement(s) => s.build(SqliteQueryBuilder),
            SubQueryStatement::UpdateStatement(s) => s.build(SqliteQueryBuilder),
            SubQueryStatement::DeleteStatement(s) => s.build(SqliteQueryBuilder),
            SubQueryStatement::SelectStatement(s) => s.build(SqliteQueryBuilder),
            SubQueryStatement::WithStatement(s) => s.build(SqliteQueryBuilder),
        };
        sql.push_str("; ");
        sql.push_str(&text);
        values.append(&mut bound.0);
    }
    sql.push_str(&format!("; RELEASE {SAVEPOINT}"));
    Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
}

/// `WITH w0 AS (<write>), w1 AS (<write>) … SELECT 1` (PostgreSQL).
fn one_statement<'a>(writes: impl Iterator<Item = &'a SubQueryStatement>) -> WithQuery {
    let mut with = WithClause::new();
    for (i, write) in writes.enumerate() {
        with.cte(
            CommonTableExpression::new()
                .query(write.clone())
                .table_name(Alias::new(format!("w{i}")))
                .to_owned(),
        );
    }
    with.query(Query::select().expr(Expr::val(1)).to_owned())
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
        let (sql, values) =
            one_statement([insert.into(), update.into()].iter()).build(PostgresQueryBuilder);
        assert_eq!(
            sql,
            r#"WITH "w0" AS (INSERT INTO "a" ("x") VALUES ($1)) , "w1" AS (UPDATE "b" SET "y" = $2 WHERE "z" = $3) SELECT $4"#
        );
        assert_eq!(values.0.len(), 4);
    }

    fn insert_x(x: i32) -> SubQueryStatement {
        insert_into("a", x)
    }

    fn insert_into(table: &str, x: i32) -> SubQueryStatement {
        Query::insert()
            .into_table(Alias::new(table))
            .columns([Alias::new("x")])
            .values_panic([x.into()])
            .to_owned()
            .into()
    }

    async fn xs(db: &DatabaseConnection) -> Vec<i32> {
        xs_of(db, "a").await
    }

    async fn xs_of(db: &DatabaseConnection, table: &str) -> Vec<i32> {
        let select = Statement::from_string(
            db.get_database_backend(),
            format!("SELECT x FROM {table} ORDER BY x"),
        );
        let rows = db.query_all_raw(select).await.expect("select");
        rows.iter()
            .map(|row| row.try_get_by_index(0).expect("x"))
            .collect()
    }

    async fn sqlite() -> (Writer, DatabaseConnection) {
        let db = sea_orm::Database::connect(super::super::options("sqlite::memory:", 1))
            .await
            .expect("connect");
        db.execute_unprepared("CREATE TABLE a (x INTEGER NOT NULL UNIQUE)")
            .await
            .expect("create");
        (Writer::new(db.clone()), db)
    }

    #[test]
    fn sqlite_writes_are_one_string_in_a_savepoint() {
        let statement = in_savepoint([insert_x(1), insert_x(2)].iter());
        assert_eq!(
            statement.sql,
            r#"SAVEPOINT change; INSERT INTO "a" ("x") VALUES (?); INSERT INTO "a" ("x") VALUES (?); RELEASE change"#
        );
        assert_eq!(statement.values.map(|v| v.0.len()), Some(2));
    }

    /// A change is all of its writes or, when one fails, none of them, and the writer goes
    /// on with the next.
    #[tokio::test]
    async fn a_sqlite_change_is_all_or_nothing() {
        let (writer, db) = sqlite().await;
        writer
            .send([insert_x(1), insert_x(2)].iter())
            .await
            .expect("send");
        let e = writer
            .send([insert_x(3), insert_x(2), insert_x(4)].iter())
            .await
            .expect_err("duplicate");
        assert!(crate::db::is_unique_violation(&e), "{e}");
        writer.send([insert_x(5)].iter()).await.expect("send");
        assert_eq!(xs(&db).await, [1, 2, 5]);
    }

    /// Changes sent at once share a transaction (the writer task runs only once all 40 are
    /// queued); the one that fails is undone alone, its first write too, with its own error,
    /// and the others are committed.
    #[tokio::test]
    async fn concurrent_sqlite_changes_fail_alone() {
        let (writer, db) = sqlite().await;
        let expected = forty_changes_fail_alone(&writer, insert_x).await;
        assert_eq!(xs(&db).await, expected);
    }

    /// Forty changes at once, every fourth breaking the unique key of the change before it;
    /// `insert` makes change `i`'s writes from its two values.
    async fn forty_changes_fail_alone(
        writer: &Writer,
        insert: impl Fn(i32) -> SubQueryStatement,
    ) -> Vec<i32> {
        let sends = (0..40).map(|i| {
            let x = if i % 4 == 3 { i - 1 } else { i };
            let writes = [insert(1000 + i), insert(100 + x)];
            async move { writer.send(writes.iter()).await }
        });
        let results = futures::future::join_all(sends).await;
        for (i, result) in results.iter().enumerate() {
            match result {
                Err(e) if i % 4 == 3 => assert!(crate::db::is_unique_violation(e), "{e}"),
                Ok(()) if i % 4 != 3 => {}
                other => panic!("change {i}: {other:?}"),
            }
        }
        (0..40)
            .filter(|i| i % 4 != 3)
            .map(|i| 100 + i)
            .chain((0..40).filter(|i| i % 4 != 3).map(|i| 1000 + i))
            .collect()
    }

    /// On PostgreSQL (with `TEST_DATABASE_URL`): changes waiting together go as one
    /// statement; when it fails, each goes again alone and gets its own answer.
    #[tokio::test]
    async fn concurrent_postgres_changes_fail_alone() {
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            return;
        };
        let db = sea_orm::Database::connect(super::super::options(&url, 4))
            .await
            .expect("connect");
        let table = format!("writer_test_{}", uuid::Uuid::new_v4().simple());
        db.execute_unprepared(&format!("CREATE TABLE {table} (x INTEGER NOT NULL UNIQUE)"))
            .await
            .expect("create");
        let writer = Writer::new(db.clone());
        let expected = forty_changes_fail_alone(&writer, |x| insert_into(&table, x)).await;
        // And a batch where nothing fails is committed whole.
        let sends = (0..20).map(|i| {
            let writes = [insert_into(&table, 5000 + i)];
            let writer = &writer;
            async move { writer.send(writes.iter()).await }
        });
        for result in futures::future::join_all(sends).await {
            result.expect("send");
        }
        let stored = xs_of(&db, &table).await;
        db.execute_unprepared(&format!("DROP TABLE {table}"))
            .await
            .expect("drop");
        let expected: Vec<i32> = expected.into_iter().chain(5000..5020).collect();
        assert_eq!(stored, expected);
    }
}
