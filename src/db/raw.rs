//! Single-row reads straight through sqlx on the pool, decoded into sea-orm models, for the
//! lookups every payment-provider call makes. On those, sea-orm's own query path (building the
//! statement, its connection wrapper, the large futures it moves) cost about twice the query
//! itself (README, Benchmarks). Writes and transactions stay with sea-orm.

use sea_orm::{
    DatabaseConnection, DbBackend, DbErr, FromQueryResult, QueryResult, RuntimeErr,
    sqlx::{self, Database},
};

/// The one row `sql` selects, if any. `sql` is portable (`$1`, `$2`… parameters, which both
/// databases read positionally) and selects the model's columns by name; `params` are bound in
/// order.
pub async fn one<M: FromQueryResult>(
    db: &DatabaseConnection,
    sql: &'static str,
    params: &[&str],
) -> Result<Option<M>, DbErr> {
    let row: Option<QueryResult> = match db.get_database_backend() {
        DbBackend::Postgres => bind(sqlx::query(sql), params)
            .fetch_optional(db.get_postgres_connection_pool())
            .await
            .map_err(query_err)?
            .map(Into::into),
        DbBackend::Sqlite => bind(sqlx::query(sql), params)
            .fetch_optional(db.get_sqlite_connection_pool())
            .await
            .map_err(query_err)?
            .map(Into::into),
        other => return Err(DbErr::Custom(format!("unsupported database {other:?}"))),
    };
    row.map(|row| M::from_query_result(&row, "")).transpose()
}

fn bind<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as Database>::Arguments>,
    params: &[&'q str],
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments>
where
    DB: Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for param in params {
        query = query.bind(*param);
    }
    query
}

/// As sea-orm reports a failed query, so `db::is_connection_error` reads both alike.
pub(crate) fn query_err(e: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(e.into()))
}
