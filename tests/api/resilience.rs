//! Faults under load: the database going away and coming back, SIGTERM while calls are in
//! flight, two replicas sharing one database, and clients that give up mid-call. Whatever
//! happens, every acknowledged application and payment exists exactly once.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use crm_server::{
    db::entities::{application, invoice, payment, provider_transaction},
    proto::{self, payment_service_client::PaymentServiceClient},
};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    helpers::{Backend, TestApp, payme_basic, reason, spawn_app_with, with_bearer, with_token},
    transport::wait_for_health,
};

const AMOUNT: i64 = 500_000;
/// How long a client keeps retrying one request before the test gives up on it.
const RETRY_FOR: Duration = Duration::from_secs(60);

fn submit_request(
    phone: &str,
    key: &str,
    token: &str,
) -> tonic::Request<proto::SubmitApplicationRequest> {
    let mut request = with_token(
        proto::SubmitApplicationRequest {
            full_name: "Resilience Tester".into(),
            phone: phone.into(),
            language: "uz".into(),
            ..Default::default()
        },
        token,
    );
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().expect("ascii"));
    request
}

/// Submits until acknowledged, retrying with the same idempotency key as a bot does.
async fn submit_until_acknowledged(app: &TestApp, phone: &str, key: &str) -> String {
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        let attempt = async {
            let mut client = app.applications().await;
            client
                .submit_application(submit_request(phone, key, &app.bot1_token))
                .await
        };
        match attempt.await {
            Ok(response) => return response.into_inner().id,
            Err(status) => {
                let retryable = matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::Aborted
                        | Code::Cancelled
                        | Code::Unknown
                        | Code::Internal
                );
                assert!(retryable, "not a transient failure: {status:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never acknowledged: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One Payme call, repeated (as Payme does) while the answer is -32400 or the connection fails.
async fn payme_until_answered(app: &TestApp, method: &str, params: Value) -> Value {
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        let sent = app
            .http
            .post(app.url("/webhooks/payme"))
            .header("authorization", payme_basic())
            .json(&json!({"method": method, "params": params, "id": 1}))
            .send()
            .await;
        if let Ok(response) = sent {
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.expect("json");
            if body["error"]["code"] != -32400 {
                return body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Payme never got an answer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn pay_with_payme(app: &TestApp, invoice_id: &str, tx: &str) {
    let account = json!({"order_id": invoice_id});
    let time = chrono::Utc::now().timestamp_millis();
    let created = payme_until_answered(
        app,
        "CreateTransaction",
        json!({"id": tx, "time": time, "amount": AMOUNT, "account": account}),
    )
    .await;
    assert_eq!(created["result"]["state"], 1, "{created}");
    let performed = payme_until_answered(app, "PerformTransaction", json!({"id": tx})).await;
    assert_eq!(performed["result"]["state"], 2, "{performed}");
}

async fn readyz(app: &TestApp) -> u16 {
    let res = app.http.get(app.url("/readyz")).send().await;
    res.expect("readyz").status().as_u16()
}

/// Makes the test's database refuse connections and drops the open ones, as a restart would.
async fn take_database_down(app: &TestApp, down: bool) {
    let pg = app.pg().expect("pg");
    let admin = sea_orm::Database::connect(pg.admin_url())
        .await
        .expect("admin");
    let allow = if down { "false" } else { "true" };
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS {allow}",
            pg.name()
        ))
        .await
        .expect("alter");
    if down {
        admin
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                pg.name()
            ))
            .await
            .expect("terminate");
    }
    let _ = admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_load_loses_nothing_and_doubles_nothing() {
    let Some(app) = spawn_app_with(Backend::Postgres, &[("RATE_LIMIT_ENABLED", "false")]).await
    else {
        eprintln!("TEST_DATABASE_URL is not set: outage test skipped");
        return;
    };
    let app = Arc::new(app);
    wait_for_health(&app, ServingStatus::Serving).await;
    let mut invoices = Vec::new();
    for i in 0..6 {
        invoices.push(
            app.unpaid_invoice(&format!("+99893444{i:04}"), AMOUNT)
                .await
                .0,
        );
    }

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (app, acknowledged) = (app.clone(), acknowledged.clone());
        load.push(tokio::spawn(async move {
            for n in 0..25 {
                let phone = format!("+9989{worker}{n:07}");
                let key = format!("outage-test-{worker}-{n:04}");
                let id = submit_until_acknowledged(&app, &phone, &key).await;
                acknowledged.lock().expect("ids").push((phone, id));
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }
    for (i, invoice_id) in invoices.iter().cloned().enumerate() {
        let app = app.clone();
        load.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300 * i as u64)).await;
            pay_with_payme(&app, &invoice_id, &format!("outage-tx-{i:03}")).await;
        }));
    }

    // The outage, while the load runs.
    tokio::time::sleep(Duration::from_millis(700)).await;
    take_database_down(&app, true).await;
    wait_for_health(&app, ServingStatus::NotServing).await;
    assert_eq!(readyz(&app).await, 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    take_database_down(&app, false).await;
    // The same pool recovers: no restart.
    wait_for_health(&app, ServingStatus::Serving).await;
    assert_eq!(readyz(&app).await, 200);
    for task in load {
        task.await.expect("load task");
    }

    // Reconciliation: every acknowledged application exactly once, nothing unacknowledged.
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(acknowledged.len(), 100);
    let db = app.db();
    assert_eq!(
        application::Entity::find().count(db).await.expect("count"),
        100,
        "none doubled, none extra"
    );
    for (phone, id) in &acknowledged {
        let rows = application::Entity::find()
            .filter(application::Column::Phone.eq(phone.as_str()))
            .all(db)
            .await
            .expect("rows");
        assert_eq!(rows.len(), 1, "{phone}");
        assert_eq!(&rows[0].id, id, "the acknowledged id is the stored one");
    }
    // Every invoice paid exactly once, by one payment and one provider transaction.
    for (i, invoice_id) in invoices.iter().enumerate() {
        let inv = invoice::Entity::find_by_id(invoice_id.as_str())
            .one(db)
            .await
            .expect("invoice")
            .expect("exists");
        assert_eq!(inv.status, "PAID");
        let paid = payment::Entity::find()
            .filter(payment::Column::InvoiceId.eq(invoice_id.as_str()))
            .filter(payment::Column::Status.eq("PAID"))
            .count(db)
            .await
            .expect("count");
        assert_eq!(paid, 1);
        let txs = provider_transaction::Entity::find()
            .filter(provider_transaction::Column::InvoiceId.eq(invoice_id.as_str()))
            .all(db)
            .await
            .expect("txs");
        assert_eq!(txs.len(), 1);
        assert_eq!(txs[0].provider_tx_id, format!("outage-tx-{i:03}"));
    }
    Arc::into_inner(app).expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_what_was_acknowledged_and_writes_nothing_half() {
    let app = spawn_app_with(
        Backend::Sqlite,
        &[
            ("RATE_LIMIT_ENABLED", "false"),
            ("SHUTDOWN_GRACE_SECONDS", "5"),
        ],
    )
    .await
    .expect("app");
    let channel = app.channel().await;
    let token = app.bot1_token.clone();
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (channel, token, acknowledged) = (channel.clone(), token.clone(), acknowledged.clone());
        load.push(tokio::spawn(async move {
            let mut client =
                proto::application_service_client::ApplicationServiceClient::new(channel);
            let mut refused = 0;
            for n in 0..1000 {
                let request = submit_request(
                    &format!("+9989{worker}{n:07}"),
                    &format!("sigterm-test-{worker}-{n:05}"),
                    &token,
                );
                match client.submit_application(request).await {
                    Ok(response) => {
                        acknowledged
                            .lock()
                            .expect("ids")
                            .insert(response.into_inner().id);
                    }
                    // After the signal: refused cleanly (the connection is going away), never
                    // an error from a handler that ran halfway.
                    Err(status) => {
                        let transport = std::error::Error::source(&status).is_some();
                        assert!(
                            transport
                                || matches!(status.code(), Code::Unavailable | Code::Cancelled),
                            "{status:?}"
                        );
                        refused += 1;
                        if refused > 3 {
                            return;
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = app.channel().await;
    let db = app.db().clone();
    let started = std::time::Instant::now();
    let state = app.state.clone();
    // SIGTERM, as the binary's signal handler would deliver it.
    let stopping = tokio::spawn(app.stop());
    // Health goes NOT_SERVING first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = tonic_health::pb::health_client::HealthClient::new(health.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await;
        match status {
            Ok(r) if r.get_ref().status() == ServingStatus::NotServing => break,
            Err(_) => break,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "health never left SERVING"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    assert!(state.is_shutting_down());
    // Kept to the end: the checks below read the database the server left.
    let _storage = stopping.await.expect("stopped within the grace period");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    for task in load {
        task.await.expect("load task");
    }
    // Every acknowledged application is stored, with its audit row; nothing else is.
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert!(!acknowledged.is_empty());
    let rows = application::Entity::find().all(&db).await.expect("rows");
    let stored: HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
    assert!(
        acknowledged.is_subset(&stored),
        "an acknowledged application is missing"
    );
    use crm_server::db::entities::audit_log;
    for row in &rows {
        let audited = audit_log::Entity::find()
            .filter(audit_log::Column::TargetId.eq(row.id.as_str()))
            .count(&db)
            .await
            .expect("audit");
        assert!(
            audited >= 1,
            "application {} has no audit row: half-written",
            row.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replayed_to_the_other_replica_gets_the_stored_answer() {
    let Some(a) = spawn_app_with(Backend::Postgres, &[("RATE_LIMIT_ENABLED", "false")]).await
    else {
        eprintln!("TEST_DATABASE_URL is not set: two-replica test skipped");
        return;
    };
    let b = a.replica().await;
    let key = "replica-replay-key-0001";
    let first = a
        .applications()
        .await
        .submit_application(submit_request("+998905550777", key, &a.bot1_token))
        .await
        .expect("first");
    let second = b
        .applications()
        .await
        .submit_application(submit_request("+998905550777", key, &a.bot1_token))
        .await
        .expect("replayed");
    assert_eq!(
        first.get_ref(),
        second.get_ref(),
        "byte-for-byte the stored answer"
    );
    assert_eq!(
        second
            .metadata()
            .get("x-idempotency-replay")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(
        application::Entity::find()
            .count(a.db())
            .await
            .expect("count"),
        1
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_mid_call_and_retries_ends_with_one_payment() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(app) = spawn_app_with(backend, &[("RATE_LIMIT_ENABLED", "false")]).await else {
            continue;
        };
        let (invoice_id, payer) = app.unpaid_invoice("+998935557000", AMOUNT).await;
        let key = "give-up-and-retry-0001";
        let request = || {
            let mut r = with_bearer(
                proto::CreatePaymentRequest {
                    invoice_id: invoice_id.clone(),
                    provider: proto::Provider::Payme.into(),
                    return_url: None,
                },
                &payer,
            );
            r.metadata_mut()
                .insert("idempotency-key", key.parse().expect("ascii"));
            r
        };
        // Several attempts abandoned at different moments (the connection is dropped with them).
        for wait_us in [0u64, 200, 1_000, 3_000, 10_000] {
            let mut client = PaymentServiceClient::new(app.channel().await);
            let _ = tokio::time::timeout(
                Duration::from_micros(wait_us),
                client.create_payment(request()),
            )
            .await;
        }
        // Then one that waits, retrying while an abandoned attempt still holds the key.
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let payment = loop {
            match PaymentServiceClient::new(app.channel().await)
                .create_payment(request())
                .await
            {
                Ok(response) => break response.into_inner(),
                Err(status)
                    if reason(&status) == "IDEMPOTENCY_KEY_IN_PROGRESS"
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        };
        let payments = payment::Entity::find()
            .filter(payment::Column::InvoiceId.eq(invoice_id.as_str()))
            .all(app.db())
            .await
            .expect("payments");
        assert_eq!(payments.len(), 1, "{backend:?}: one payment");
        assert_eq!(payments[0].id, payment.id);
        app.stop().await;
    }
}
