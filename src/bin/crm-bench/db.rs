//! The orchestrator's own database work: a throw-away PostgreSQL database per run, the
//! invoices the Payme cycles pay (written straight into the server's schema, as CreateInvoice
//! and CreatePayment would leave them), and the row counts behind the correctness checks.

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD};
use sea_orm::sqlx::{
    self, AssertSqlSafe, Connection, QueryBuilder, Sqlite, SqlitePool, postgres::PgConnection,
};

use crate::process::PAYME_MERCHANT_ID;

/// `crm_bench_<pid>` on the PostgreSQL server of `admin_url`, dropped (with its connections)
/// when this value is dropped.
pub struct PgDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create(runtime: &tokio::runtime::Runtime, admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("crm_bench_{}", std::process::id());
        runtime.block_on(async {
            let mut admin = PgConnection::connect(admin_url)
                .await
                .with_context(|| format!("PostgreSQL at {admin_url} (option --postgres URL)"))?;
            sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\"")))
                .execute(&mut admin)
                .await?;
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut admin)
                .await?;
            admin.close().await?;
            anyhow::Ok(())
        })?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: crm_server::db::with_database_name(admin_url, &name),
            name,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let admin_url = self.admin_url.clone();
        // Dropped outside any runtime: a small one of its own, on a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await?;
                sqlx::query(AssertSqlSafe(sql)).execute(&mut admin).await?;
                admin.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
    }
}

/// `n` unpaid invoices of `payer`, each with the PENDING Payme payment that the payer's
/// "Pay" click (CreatePayment) leaves; multi-row INSERTs in one transaction. Returns the
/// invoice ids.
pub async fn create_invoices(
    db: &SqlitePool,
    payer: &str,
    n: usize,
    amount: i64,
) -> anyhow::Result<Vec<String>> {
    /// Rows per INSERT (10 columns each, well under SQLite's 32766 variables).
    const CHUNK: usize = 500;
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let now = crm_server::db::now();
    let mut txn = db.begin().await?;
    for chunk in ids.chunks(CHUNK) {
        let mut invoices = QueryBuilder::<Sqlite>::new(
            "INSERT INTO invoices (id, payer_user_id, application_id, amount_tiyin, currency, \
             description, status, created_at, updated_at, paid_at) ",
        );
        invoices.push_values(chunk, |mut row, id| {
            row.push_bind(id)
                .push_bind(payer)
                .push_bind(Option::<String>::None)
                .push_bind(amount)
                .push_bind("UZS")
                .push_bind("bench")
                .push_bind("UNPAID")
                .push_bind(now)
                .push_bind(now)
                .push_bind(Option::<chrono::DateTime<chrono::Utc>>::None);
        });
        invoices.build().execute(&mut *txn).await?;
        let mut payments = QueryBuilder::<Sqlite>::new(
            "INSERT INTO payments (id, invoice_id, provider, amount_tiyin, status, \
             checkout_url, pending_key, paid_key, created_at, updated_at) ",
        );
        payments.push_values(chunk, |mut row, id| {
            let checkout = format!(
                "https://checkout.paycom.uz/{}",
                STANDARD.encode(format!("m={PAYME_MERCHANT_ID};ac.order_id={id};a={amount}"))
            );
            row.push_bind(uuid::Uuid::now_v7().to_string())
                .push_bind(id)
                .push_bind("PAYME")
                .push_bind(amount)
                .push_bind("PENDING")
                .push_bind(checkout)
                .push_bind(format!("{id}:PAYME"))
                .push_bind(Option::<String>::None)
                .push_bind(now)
                .push_bind(now);
        });
        payments.build().execute(&mut *txn).await?;
    }
    txn.commit().await?;
    Ok(ids)
}

/// Paid invoices, performed Payme transactions, and invoices paid more than once.
pub async fn payme_counts(db: &SqlitePool) -> anyhow::Result<(i64, i64, i64)> {
    let paid = sqlx::query_scalar("SELECT count(*) FROM invoices WHERE status = 'PAID'")
        .fetch_one(db)
        .await?;
    let performed = sqlx::query_scalar(
        "SELECT count(*) FROM provider_transactions WHERE provider = 'PAYME' AND \
         state = 'PERFORMED'",
    )
    .fetch_one(db)
    .await?;
    let twice = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT invoice_id FROM payments WHERE status = 'PAID' \
         GROUP BY invoice_id HAVING count(*) > 1)",
    )
    .fetch_one(db)
    .await?;
    Ok((paid, performed, twice))
}
