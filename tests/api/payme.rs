//! The Payme Merchant API webhook, replaying the sandbox scenarios of providers.md §1.11 and
//! the extra cases listed there, against the real server.

use std::sync::atomic::{AtomicI64, Ordering};

use base64::{Engine, engine::general_purpose::STANDARD};
use crm_server::{
    db::entities::{payment, provider_transaction},
    proto::{self},
};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

use crate::{
    both_databases,
    helpers::{Backend, TestApp, spawn_app_with},
};

const AMOUNT: i64 = 500_000;
const HOUR_MS: i64 = 3_600_000;
static NEXT_ID: AtomicI64 = AtomicI64::new(1);

fn basic(login: &str, key: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{login}:{key}")))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sends one JSON-RPC call; every answer must be HTTP 200 and echo the id.
async fn call_with(app: &TestApp, auth: Option<&str>, method: &str, params: Value) -> Value {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut req = app
        .http
        .post(app.url("/webhooks/payme"))
        .header("content-type", "text/json; charset=UTF-8")
        .body(json!({"method": method, "params": params, "id": id}).to_string());
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let res = req.send().await.expect("request");
    assert_eq!(res.status(), 200, "Payme reads anything but 200 as -32400");
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["id"], json!(id), "the request id is echoed");
    body
}

async fn call(app: &TestApp, method: &str, params: Value) -> Value {
    call_with(
        app,
        Some(&basic("Paycom", "payme-test-key")),
        method,
        params,
    )
    .await
}

fn code(body: &Value) -> i64 {
    body["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {body}"))
}

fn result(body: &Value) -> &Value {
    assert!(body.get("error").is_none(), "expected a result, got {body}");
    &body["result"]
}

fn account(invoice: &str) -> Value {
    json!({"order_id": invoice})
}

both_databases! {
    async fn scenario_1_create_and_cancel_an_unconfirmed_transaction(app: TestApp) {
        let (inv, token) = app.unpaid_invoice("+998935550001", AMOUNT).await;
        let create = |id: &str, time: i64| json!({"id": id, "time": time, "amount": AMOUNT, "account": account(&inv)});

        // 1.1 wrong credentials: -32504 for every method.
        for auth in [Some(basic("Paycom", "wrong-key")), Some(basic("Other", "payme-test-key")), Some("Bearer x".to_owned()), Some("Basic !!!".to_owned()), None] {
            for method in ["CheckPerformTransaction", "CreateTransaction", "PerformTransaction", "CancelTransaction", "CheckTransaction", "GetStatement"] {
                let body = call_with(&app, auth.as_deref(), method, create("t", now_ms())).await;
                assert_eq!(code(&body), -32504, "{method} with {auth:?}");
            }
        }
        // 1.2 wrong amount.
        for method in ["CheckPerformTransaction", "CreateTransaction"] {
            let body = call(&app, method, json!({"id": "x1", "time": now_ms(), "amount": AMOUNT + 1, "account": account(&inv)})).await;
            assert_eq!(code(&body), -31001, "{method}");
        }
        // 1.3 unknown invoice: -31050 with data and a localised message.
        for method in ["CheckPerformTransaction", "CreateTransaction"] {
            let body = call(&app, method, json!({"id": "x2", "time": now_ms(), "amount": AMOUNT, "account": account(&uuid::Uuid::new_v4().to_string())})).await;
            assert_eq!(code(&body), -31050, "{method}");
            assert_eq!(body["error"]["data"], "order_id");
            for lang in ["ru", "uz", "en"] {
                assert!(body["error"]["message"][lang].as_str().is_some_and(|m| !m.is_empty()), "{lang}");
            }
        }
        // 1.4
        assert_eq!(result(&call(&app, "CheckPerformTransaction", json!({"amount": AMOUNT, "account": account(&inv)})).await)["allow"], true);
        // 1.5, 1.6
        let t1_time = now_ms();
        let first = call(&app, "CreateTransaction", create("T1-scenario-1", t1_time)).await;
        assert_eq!(result(&first)["state"], 1);
        assert!(result(&first)["create_time"].as_i64().is_some_and(|t| t > 0));
        let repeat = call(&app, "CreateTransaction", create("T1-scenario-1", t1_time)).await;
        assert_eq!(result(&repeat), result(&first), "a repeat is identical");
        // 1.7
        let check = call(&app, "CheckTransaction", json!({"id": "T1-scenario-1"})).await;
        assert_eq!(result(&check)["state"], 1);
        assert_eq!((result(&check)["perform_time"].clone(), result(&check)["cancel_time"].clone(), result(&check)["reason"].clone()), (json!(0), json!(0), Value::Null));
        // 1.8 a second transaction for the same invoice.
        assert_eq!(code(&call(&app, "CreateTransaction", create("T2-scenario-1", now_ms())).await), -31008);
        // 1.9
        let cancel = call(&app, "CancelTransaction", json!({"id": "T1-scenario-1", "reason": 3})).await;
        assert_eq!(result(&cancel)["state"], -1);
        assert!(result(&cancel)["cancel_time"].as_i64().is_some_and(|t| t > 0));
        let again = call(&app, "CancelTransaction", json!({"id": "T1-scenario-1", "reason": 3})).await;
        assert_eq!(result(&again), result(&cancel));
        // 1.10
        let check = call(&app, "CheckTransaction", json!({"id": "T1-scenario-1"})).await;
        assert_eq!((result(&check)["state"].clone(), result(&check)["reason"].clone()), (json!(-1), json!(3)));
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Unpaid);
        // A cancelled transaction cannot be performed.
        assert_eq!(code(&call(&app, "PerformTransaction", json!({"id": "T1-scenario-1"})).await), -31008);
    }

    async fn scenario_2_create_perform_then_cancel_a_confirmed_transaction(app: TestApp) {
        let (inv, token) = app.unpaid_invoice("+998935550002", AMOUNT).await;
        let create = |id: &str, time: i64| json!({"id": id, "time": time, "amount": AMOUNT, "account": account(&inv)});
        assert_eq!(result(&call(&app, "CheckPerformTransaction", json!({"amount": AMOUNT, "account": account(&inv)})).await)["allow"], true);
        let time = now_ms();
        let created = call(&app, "CreateTransaction", create("T3-scenario-2", time)).await;
        assert_eq!(result(&call(&app, "CreateTransaction", create("T3-scenario-2", time)).await), result(&created));
        assert_eq!(result(&call(&app, "CheckTransaction", json!({"id": "T3-scenario-2"})).await)["state"], 1);
        assert_eq!(code(&call(&app, "CreateTransaction", create("T4-scenario-2", now_ms())).await), -31008);

        let performed = call(&app, "PerformTransaction", json!({"id": "T3-scenario-2"})).await;
        assert_eq!(result(&performed)["state"], 2);
        assert!(result(&performed)["perform_time"].as_i64().is_some_and(|t| t > 0));
        assert_eq!(result(&call(&app, "PerformTransaction", json!({"id": "T3-scenario-2"})).await), result(&performed));
        assert_eq!(result(&call(&app, "CheckTransaction", json!({"id": "T3-scenario-2"})).await)["state"], 2);
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Paid);

        let cancelled = call(&app, "CancelTransaction", json!({"id": "T3-scenario-2", "reason": 5})).await;
        assert_eq!(result(&cancelled)["state"], -2);
        assert_eq!(result(&call(&app, "CancelTransaction", json!({"id": "T3-scenario-2", "reason": 5})).await), result(&cancelled));
        let check = call(&app, "CheckTransaction", json!({"id": "T3-scenario-2"})).await;
        assert_eq!((result(&check)["state"].clone(), result(&check)["reason"].clone()), (json!(-2), json!(5)));
        assert_eq!(result(&check)["perform_time"], result(&performed)["perform_time"]);
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Refunded);
        let paid = payment::Entity::find().filter(payment::Column::InvoiceId.eq(inv.as_str())).all(app.db()).await.expect("payments");
        assert_eq!(paid.len(), 1, "the transaction attached to one payment, created for it");
        assert_eq!(paid[0].status, "REFUNDED");
    }

    async fn protocol_errors_answer_in_json_rpc_with_http_200(app: TestApp) {
        assert_eq!(code(&call(&app, "PerformTransaction", json!({"id": "nope"})).await), -31003);
        assert_eq!(code(&call(&app, "CancelTransaction", json!({"id": "nope", "reason": 1})).await), -31003);
        assert_eq!(code(&call(&app, "CheckTransaction", json!({"id": "nope"})).await), -31003);
        for method in ["ChangePassword", "DropTables"] {
            let body = call(&app, method, json!({"password": "x"})).await;
            assert_eq!((code(&body), body["error"]["data"].as_str()), (-32601, Some(method)));
        }
        let auth = basic("Paycom", "payme-test-key");
        for (body, expected) in [("{not json", -32700), (r#"{"id": 5, "params": {}}"#, -32600), (r#"{"id": 6, "method": "CheckTransaction"}"#, -32600), ("[]", -32600)] {
            let res = app.http.post(app.url("/webhooks/payme")).header("authorization", &auth).body(body).send().await.expect("request");
            assert_eq!(res.status(), 200);
            let json: Value = res.json().await.expect("json");
            assert_eq!(json["error"]["code"], expected, "{body}");
        }
        let res = app.http.post(app.url("/webhooks/payme?x=%3Cscript%3E")).header("authorization", &auth).body("{}").send().await.expect("request");
        assert_eq!(res.status(), 200, "even the script filter answers Payme in JSON-RPC");
        assert_eq!(res.json::<Value>().await.expect("json")["error"]["code"], -32600);
        let res = app.http.get(app.url("/webhooks/payme")).send().await.expect("request");
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.expect("json")["error"]["code"], -32300);
        let huge = format!(r#"{{"id": 1, "method": "CheckTransaction", "params": {{"id": "{}"}}}}"#, "x".repeat(70 * 1024));
        let res = app.http.post(app.url("/webhooks/payme")).header("authorization", &auth).body(huge).send().await.expect("request");
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.expect("json")["error"]["code"], -32700);
    }

    async fn expired_transactions_are_cancelled_with_reason_4(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998935550003", AMOUNT).await;
        // Created by Payme more than 12 hours ago: stored as cancelled by timeout, refused.
        let old = now_ms() - 13 * HOUR_MS;
        let body = call(&app, "CreateTransaction", json!({"id": "T-old", "time": old, "amount": AMOUNT, "account": account(&inv)})).await;
        assert_eq!(code(&body), -31008);
        let check = call(&app, "CheckTransaction", json!({"id": "T-old"})).await;
        assert_eq!((result(&check)["state"].clone(), result(&check)["reason"].clone()), (json!(-1), json!(4)));
        // Created just inside the window, then performed after it closed: lazily cancelled.
        let almost = now_ms() - 12 * HOUR_MS + 1_500;
        let created = call(&app, "CreateTransaction", json!({"id": "T-late", "time": almost, "amount": AMOUNT, "account": account(&inv)})).await;
        assert_eq!(result(&created)["state"], 1);
        tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
        assert_eq!(code(&call(&app, "PerformTransaction", json!({"id": "T-late"})).await), -31008);
        let check = call(&app, "CheckTransaction", json!({"id": "T-late"})).await;
        assert_eq!((result(&check)["state"].clone(), result(&check)["reason"].clone()), (json!(-1), json!(4)));
        // The invoice is free again for a new transaction.
        let fresh = call(&app, "CreateTransaction", json!({"id": "T-new", "time": now_ms(), "amount": AMOUNT, "account": account(&inv)})).await;
        assert_eq!(result(&fresh)["state"], 1);
    }

    async fn the_background_sweep_cancels_stale_transactions(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998935550004", AMOUNT).await;
        let almost = now_ms() - 12 * HOUR_MS + 1_000;
        call(&app, "CreateTransaction", json!({"id": "T-sweep", "time": almost, "amount": AMOUNT, "account": account(&inv)})).await;
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        crm_server::payments::payme::sweep(&app.state).await.expect("sweep");
        let row = provider_transaction::Entity::find().filter(provider_transaction::Column::ProviderTxId.eq("T-sweep")).one(app.db()).await.expect("q").expect("row");
        assert_eq!((row.state.as_str(), row.reason, row.active_key), ("CANCELLED", Some(4), None));
    }

    // Quotas off: signs in more often than the login quota allows.
    async fn get_statement_lists_by_payme_time_inclusive_and_ascending(app: TestApp) with { "RATE_LIMIT_ENABLED": "false" } {
        let base = now_ms() - 60_000;
        let mut ids = Vec::new();
        for (i, phone) in ["+998935550011", "+998935550012", "+998935550013"].iter().enumerate() {
            let (inv, _) = app.unpaid_invoice(phone, AMOUNT).await;
            let id = format!("S{i}");
            // Created out of time order.
            let time = base + [2_000, 0, 1_000][i];
            call(&app, "CreateTransaction", json!({"id": id, "time": time, "amount": AMOUNT, "account": account(&inv)})).await;
            ids.push((id, time));
        }
        call(&app, "CancelTransaction", json!({"id": "S1", "reason": 3})).await;
        call(&app, "PerformTransaction", json!({"id": "S2"})).await;
        call(&app, "CancelTransaction", json!({"id": "S2", "reason": 5})).await;
        let (old_inv, _) = app.unpaid_invoice("+998935550014", AMOUNT).await;
        call(&app, "CreateTransaction", json!({"id": "S-expired", "time": base + 500 - 13 * HOUR_MS, "amount": AMOUNT, "account": account(&old_inv)})).await;

        let listed = call(&app, "GetStatement", json!({"from": base, "to": base + 2_000})).await;
        let txs = result(&listed)["transactions"].as_array().expect("list").clone();
        let got: Vec<(&str, i64)> = txs.iter().map(|t| (t["id"].as_str().expect("id"), t["state"].as_i64().expect("state"))).collect();
        assert_eq!(got, [("S1", -1), ("S2", -2), ("S0", 1)], "ascending by Payme time, every state, bounds inclusive");
        assert_eq!(txs[0]["account"]["order_id"].as_str().map(str::len), Some(36));
        assert_eq!(txs[0]["amount"], AMOUNT);
        let narrow = call(&app, "GetStatement", json!({"from": base + 1, "to": base + 1_999})).await;
        assert_eq!(result(&narrow)["transactions"].as_array().map(Vec::len), Some(1));
        let none = call(&app, "GetStatement", json!({"from": base - 10 * HOUR_MS, "to": base - 9 * HOUR_MS})).await;
        assert_eq!(result(&none)["transactions"], json!([]));
    }

    async fn set_fiscal_data_is_stored(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998935550005", AMOUNT).await;
        call(&app, "CreateTransaction", json!({"id": "T-fiscal", "time": now_ms(), "amount": AMOUNT, "account": account(&inv)})).await;
        let body = call(&app, "SetFiscalData", json!({"id": "T-fiscal", "type": "PERFORM", "fiscal_data": {"receipt_id": 7, "qr_code_url": "https://ofd.uz/q"}})).await;
        assert_eq!(result(&body)["success"], true);
        let row = provider_transaction::Entity::find().filter(provider_transaction::Column::ProviderTxId.eq("T-fiscal")).one(app.db()).await.expect("q").expect("row");
        assert_eq!(row.data.expect("data")["fiscal"]["PERFORM"]["receipt_id"], 7);
        assert_eq!(code(&call(&app, "SetFiscalData", json!({"id": "T-fiscal", "type": "OTHER", "fiscal_data": {}})).await), -32602);
    }

    async fn concurrent_creates_and_performs_credit_once(app: TestApp) {
        let (inv, token) = app.unpaid_invoice("+998935550006", AMOUNT).await;
        let time = now_ms();
        let creates = (0..10).map(|_| call(&app, "CreateTransaction", json!({"id": "T-same", "time": time, "amount": AMOUNT, "account": account(&inv)})));
        let answers = futures::future::join_all(creates).await;
        let first = result(&answers[0]).clone();
        for a in &answers {
            assert_eq!(result(a), &first, "identical answers");
        }
        assert_eq!(provider_transaction::Entity::find().filter(provider_transaction::Column::ProviderTxId.eq("T-same")).count(app.db()).await.expect("count"), 1);

        let performs = (0..10).map(|_| call(&app, "PerformTransaction", json!({"id": "T-same"})));
        let answers = futures::future::join_all(performs).await;
        let first = result(&answers[0]).clone();
        for a in &answers {
            assert_eq!(result(a), &first);
        }
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Paid);
        let paid = payment::Entity::find().filter(payment::Column::InvoiceId.eq(inv.as_str())).filter(payment::Column::Status.eq("PAID")).count(app.db()).await.expect("count");
        assert_eq!(paid, 1, "one credit");

        let (other, _) = app.unpaid_invoice("+998935550007", AMOUNT).await;
        let two = ["T-a", "T-b"].map(|id| call(&app, "CreateTransaction", json!({"id": id, "time": now_ms(), "amount": AMOUNT, "account": account(&other)})));
        let [a, b] = two;
        let (a, b) = futures::join!(a, b);
        let codes: Vec<Option<i64>> = [&a, &b].iter().map(|x| x["error"]["code"].as_i64()).collect();
        assert!(codes.contains(&None) && codes.contains(&Some(-31008)), "{codes:?}");
    }

    async fn an_internal_failure_still_answers_http_200_with_32400(app: TestApp) {
        app.db().clone().close().await.expect("pool closed");
        let body = call(&app, "CheckTransaction", json!({"id": "anything"})).await;
        assert_eq!(code(&body), -32400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payme_without_keys_is_off() {
    for backend in [Backend::Sqlite] {
        let app = spawn_app_with(backend, &[("PAYME_SECRET_KEY", "")])
            .await
            .expect("app");
        let body = call(&app, "CheckTransaction", json!({"id": "x"})).await;
        assert_eq!(code(&body), -32504);
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_can_be_refused_by_configuration() {
    let app = spawn_app_with(
        Backend::Sqlite,
        &[
            ("PAYME_ALLOW_REFUND", "false"),
            ("PAYME_ALLOWED_IPS", "127.0.0.0/8"),
        ],
    )
    .await
    .expect("app");
    let (inv, _) = app.unpaid_invoice("+998935550008", AMOUNT).await;
    call(
        &app,
        "CreateTransaction",
        json!({"id": "T-keep", "time": now_ms(), "amount": AMOUNT, "account": account(&inv)}),
    )
    .await;
    call(&app, "PerformTransaction", json!({"id": "T-keep"})).await;
    assert_eq!(
        code(
            &call(
                &app,
                "CancelTransaction",
                json!({"id": "T-keep", "reason": 5})
            )
            .await
        ),
        -31007
    );
    app.stop().await;
    let app = spawn_app_with(
        Backend::Sqlite,
        &[("PAYME_ALLOWED_IPS", "185.234.113.0/28")],
    )
    .await
    .expect("app");
    assert_eq!(
        code(&call(&app, "CheckTransaction", json!({"id": "x"})).await),
        -32504,
        "not from Payme's addresses"
    );
    app.stop().await;
}
