//! The Click SHOP API and Uzum Bank Merchant API webhooks.

use base64::{Engine, engine::general_purpose::STANDARD};
use crm_server::{
    db::entities::payment,
    proto::{self, payment_service_client::PaymentServiceClient},
};
use futures::StreamExt;
use md5::{Digest, Md5};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

use crate::{
    both_databases,
    helpers::{Backend, TestApp, spawn_app_with, with_bearer},
};

const AMOUNT: i64 = 150_000; // 1500.00 som
const CLICK_SECRET: &str = "click-test-secret";

async fn paid_payments(app: &TestApp, invoice: &str) -> u64 {
    payment::Entity::find()
        .filter(payment::Column::InvoiceId.eq(invoice))
        .filter(payment::Column::Status.eq("PAID"))
        .count(app.db())
        .await
        .expect("count")
}

/// Click's fields for one call, signed as Click signs them.
fn click_fields(
    trans: i64,
    invoice: &str,
    amount: &str,
    action: u8,
    prepare_id: Option<i64>,
    error: i64,
) -> Vec<(String, String)> {
    let sign_time = "2026-11-21 10:15:30";
    let mut text = format!("{trans}3001{CLICK_SECRET}{invoice}");
    if let Some(p) = prepare_id {
        text.push_str(&p.to_string());
    }
    text.push_str(&format!("{amount}{action}{sign_time}"));
    let mut fields = vec![
        ("click_trans_id", trans.to_string()),
        ("service_id", "3001".into()),
        ("click_paydoc_id", (trans + 7).to_string()),
        ("merchant_trans_id", invoice.into()),
        ("amount", amount.into()),
        ("action", action.to_string()),
        ("error", error.to_string()),
        (
            "error_note",
            if error < 0 {
                "Card blocked".into()
            } else {
                "Success".into()
            },
        ),
        ("sign_time", sign_time.into()),
        ("sign_string", hex::encode(Md5::digest(text.as_bytes()))),
    ];
    if let Some(p) = prepare_id {
        fields.push(("merchant_prepare_id", p.to_string()));
    }
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

async fn click(app: &TestApp, stage: &str, fields: &[(String, String)]) -> Value {
    let res = app
        .http
        .post(app.url(&format!("/webhooks/click/{stage}")))
        .form(fields)
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200, "Click is always answered with HTTP 200");
    res.json().await.expect("json")
}

fn set(fields: &mut [(String, String)], key: &str, value: &str) {
    for (k, v) in fields.iter_mut() {
        if k == key {
            *v = value.to_owned();
        }
    }
}

async fn uzum_with(app: &TestApp, auth: &str, action: &str, body: Value) -> (u16, Value) {
    let res = app
        .http
        .post(app.url(&format!("/webhooks/uzum/{action}")))
        .header("authorization", auth)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.expect("json"))
}

async fn uzum(app: &TestApp, action: &str, body: Value) -> (u16, Value) {
    let auth = format!("Basic {}", STANDARD.encode("uzum:uzum-test-password"));
    uzum_with(app, &auth, action, body).await
}

fn uzum_body(trans: &str, invoice: &str) -> Value {
    json!({"serviceId": 5003, "timestamp": chrono::Utc::now().timestamp_millis(), "transId": trans, "params": {"order_id": invoice}, "amount": AMOUNT})
}

fn error_code(answer: &(u16, Value)) -> &str {
    assert_eq!(answer.0, 400, "failures are HTTP 400: {answer:?}");
    assert_eq!(answer.1["status"], "FAILED");
    answer.1["errorCode"].as_str().expect("string errorCode")
}

both_databases! {
    async fn click_prepare_then_complete_pays_and_a_watcher_sees_it(app: TestApp) {
        let (inv, token) = app.unpaid_invoice("+998944440001", AMOUNT).await;
        let prepared = click(&app, "prepare", &click_fields(9001, &inv, "1500.00", 0, None, 0)).await;
        assert_eq!(prepared["error"], 0, "{prepared}");
        let prepare_id = prepared["merchant_prepare_id"].as_i64().expect("integer prepare id");
        assert_eq!(prepared["click_trans_id"], 9001);
        // A repeated Prepare answers the same prepare id.
        assert_eq!(click(&app, "prepare", &click_fields(9001, &inv, "1500.00", 0, None, 0)).await, prepared);

        let pending = payment::Entity::find().filter(payment::Column::InvoiceId.eq(inv.as_str())).one(app.db()).await.expect("q").expect("payment made for the transaction");
        let mut stream = PaymentServiceClient::new(app.channel().await).watch_payment(with_bearer(proto::WatchPaymentRequest { id: pending.id.clone() }, &token)).await.expect("watch").into_inner();
        assert_eq!(stream.next().await.expect("current").expect("ok").status(), proto::PaymentStatus::Pending);

        let complete = click_fields(9001, &inv, "1500.00", 1, Some(prepare_id), 0);
        let done = click(&app, "complete", &complete).await;
        assert_eq!((done["error"].as_i64(), done["merchant_confirm_id"].as_i64()), (Some(0), Some(prepare_id)));
        let change = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await.expect("in time").expect("change").expect("ok");
        assert_eq!(change.status(), proto::PaymentStatus::Paid);
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Paid);

        // Replayed five times now and again later: -4, and credited once.
        for _ in 0..5 {
            assert_eq!(click(&app, "complete", &complete).await["error"], -4);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(click(&app, "complete", &complete).await["error"], -4);
        assert_eq!(paid_payments(&app, &inv).await, 1);
        assert!(app.audit_rows("POST /webhooks/click/complete", 7).await.len() >= 7);
    }

    async fn click_error_codes_follow_the_reference_order(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998944440002", AMOUNT).await;
        // -8 missing or malformed fields.
        let mut missing = click_fields(9101, &inv, "1500.00", 0, None, 0);
        missing.retain(|(k, _)| k != "sign_time");
        assert_eq!(click(&app, "prepare", &missing).await["error"], -8);
        let mut bad = click_fields(9101, &inv, "1500.00", 0, None, 0);
        set(&mut bad, "click_trans_id", "abc");
        assert_eq!(click(&app, "prepare", &bad).await["error"], -8);
        assert_eq!(click(&app, "complete", &click_fields(9101, &inv, "1500.00", 1, None, 0)).await["error"], -8, "complete needs merchant_prepare_id");
        // -1 signature.
        let mut forged = click_fields(9101, &inv, "1500.00", 0, None, 0);
        set(&mut forged, "sign_string", &"0".repeat(32));
        assert_eq!(click(&app, "prepare", &forged).await["error"], -1);
        // The raw amount string is what is signed: "1500" signed as "1500.00" fails.
        let mut reformatted = click_fields(9101, &inv, "1500.00", 0, None, 0);
        set(&mut reformatted, "amount", "1500");
        assert_eq!(click(&app, "prepare", &reformatted).await["error"], -1);
        // -3 action.
        assert_eq!(click(&app, "prepare", &click_fields(9101, &inv, "1500.00", 1, None, 0)).await["error"], -3);
        // -5 unknown invoice.
        assert_eq!(click(&app, "prepare", &click_fields(9101, &uuid::Uuid::new_v4().to_string(), "1500.00", 0, None, 0)).await["error"], -5);
        // -2 amount.
        assert_eq!(click(&app, "prepare", &click_fields(9101, &inv, "1500.01", 0, None, 0)).await["error"], -2);
        // "1500" is accepted when that is what was signed.
        let prepared = click(&app, "prepare", &click_fields(9102, &inv, "1500", 0, None, 0)).await;
        assert_eq!(prepared["error"], 0);
        let prepare_id = prepared["merchant_prepare_id"].as_i64().expect("id");
        // -6 unknown prepare id.
        assert_eq!(click(&app, "complete", &click_fields(9102, &inv, "1500", 1, Some(prepare_id + 1), 0)).await["error"], -6);
        // -4: another transaction holds the invoice.
        assert_eq!(click(&app, "prepare", &click_fields(9103, &inv, "1500.00", 0, None, 0)).await["error"], -4);
        // -9: Click reports a failure: cancelled once, then -9 again.
        let cancel = click_fields(9102, &inv, "1500", 1, Some(prepare_id), -5017);
        assert_eq!(click(&app, "complete", &cancel).await["error"], -9);
        assert_eq!(click(&app, "complete", &cancel).await["error"], -9);
        assert_eq!(click(&app, "complete", &click_fields(9102, &inv, "1500", 1, Some(prepare_id), 0)).await["error"], -9, "a cancelled transaction stays cancelled");
        let cancelled = payment::Entity::find().filter(payment::Column::InvoiceId.eq(inv.as_str())).filter(payment::Column::Status.eq("CANCELLED")).count(app.db()).await.expect("count");
        assert_eq!(cancelled, 1);
        // Not POST: -8 in Click's format.
        let res = app.http.get(app.url("/webhooks/click/prepare")).send().await.expect("request");
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.expect("json")["error"], -8);
    }

    async fn concurrent_click_completes_credit_once(app: TestApp) {
        let (inv, token) = app.unpaid_invoice("+998944440003", AMOUNT).await;
        let prepared = click(&app, "prepare", &click_fields(9201, &inv, "1500.00", 0, None, 0)).await;
        let prepare_id = prepared["merchant_prepare_id"].as_i64().expect("id");
        let complete = click_fields(9201, &inv, "1500.00", 1, Some(prepare_id), 0);
        let answers = futures::future::join_all((0..10).map(|_| click(&app, "complete", &complete))).await;
        let codes: Vec<i64> = answers.iter().map(|a| a["error"].as_i64().expect("code")).collect();
        assert_eq!(codes.iter().filter(|c| **c == 0).count(), 1, "{codes:?}");
        assert!(codes.iter().all(|c| *c == 0 || *c == -4), "{codes:?}");
        assert_eq!(paid_payments(&app, &inv).await, 1);
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Paid);
    }

    async fn uzum_check_create_confirm_pays_and_replays_answer_their_codes(app: TestApp) {
        let (inv, token) = app.unpaid_invoice("+998944440004", AMOUNT).await;
        let (status, checked) = uzum(&app, "check", json!({"serviceId": 5003, "timestamp": 1, "params": {"order_id": inv}})).await;
        assert_eq!((status, checked["status"].as_str()), (200, Some("OK")));
        assert_eq!(checked["serviceId"], 5003);

        let (status, created) = uzum(&app, "create", uzum_body("uz-1", &inv)).await;
        assert_eq!((status, created["status"].as_str()), (200, Some("CREATED")), "{created}");
        assert!(created["transTime"].as_i64().is_some());
        assert_eq!(error_code(&uzum(&app, "create", uzum_body("uz-1", &inv)).await), "10010");
        let (_, st) = uzum(&app, "status", uzum_body("uz-1", &inv)).await;
        assert_eq!(st["status"], "CREATED");

        let (status, confirmed) = uzum(&app, "confirm", uzum_body("uz-1", &inv)).await;
        assert_eq!((status, confirmed["status"].as_str()), (200, Some("CONFIRMED")), "{confirmed}");
        assert_eq!(error_code(&uzum(&app, "confirm", uzum_body("uz-1", &inv)).await), "10016");
        assert_eq!(paid_payments(&app, &inv).await, 1);
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Paid);
        let (_, st) = uzum(&app, "status", uzum_body("uz-1", &inv)).await;
        assert_eq!(st["status"], "CONFIRMED");
        assert!(st["confirmTime"].as_i64().is_some());

        // Reverse of a confirmed payment refunds; a repeat is 10018.
        let (status, reversed) = uzum(&app, "reverse", uzum_body("uz-1", &inv)).await;
        assert_eq!((status, reversed["status"].as_str()), (200, Some("REVERSED")));
        assert_eq!(error_code(&uzum(&app, "reverse", uzum_body("uz-1", &inv)).await), "10018");
        assert_eq!(app.invoice_status(&inv, &token).await, proto::InvoiceStatus::Refunded);
        let (_, st) = uzum(&app, "status", uzum_body("uz-1", &inv)).await;
        assert_eq!(st["status"], "REVERSED");
        assert_eq!(error_code(&uzum(&app, "status", uzum_body("unknown", &inv)).await), "10014");
    }

    async fn uzum_refuses_bad_credentials_service_orders_and_amounts(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998944440005", AMOUNT).await;
        let wrong = format!("Basic {}", STANDARD.encode("uzum:wrong"));
        assert_eq!(error_code(&uzum_with(&app, &wrong, "check", uzum_body("u", &inv)).await), "10001");
        assert_eq!(error_code(&uzum_with(&app, "Bearer x", "check", uzum_body("u", &inv)).await), "10001");
        let mut other_service = uzum_body("u", &inv);
        other_service["serviceId"] = json!(9999);
        assert_eq!(error_code(&uzum(&app, "create", other_service).await), "10006");
        assert_eq!(error_code(&uzum(&app, "create", uzum_body("u", &uuid::Uuid::new_v4().to_string())).await), "10007");
        let mut wrong_amount = uzum_body("u", &inv);
        wrong_amount["amount"] = json!(AMOUNT - 1);
        assert_eq!(error_code(&uzum(&app, "create", wrong_amount).await), "10011");
        let res = app.http.post(app.url("/webhooks/uzum/create")).header("authorization", format!("Basic {}", STANDARD.encode("uzum:uzum-test-password"))).body("{oops").send().await.expect("request");
        assert_eq!(res.status(), 400);
        assert_eq!(res.json::<Value>().await.expect("json")["errorCode"], "10002");
        // A second transaction while one holds the invoice: "payment already made".
        uzum(&app, "create", uzum_body("u-first", &inv)).await;
        assert_eq!(error_code(&uzum(&app, "create", uzum_body("u-second", &inv)).await), "10008");
        // A created transaction reversed before confirm cannot be confirmed.
        uzum(&app, "reverse", uzum_body("u-first", &inv)).await;
        assert_eq!(error_code(&uzum(&app, "confirm", uzum_body("u-first", &inv)).await), "10015");
    }

    async fn concurrent_uzum_confirms_credit_once(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998944440006", AMOUNT).await;
        uzum(&app, "create", uzum_body("uz-c", &inv)).await;
        let answers = futures::future::join_all((0..10).map(|_| uzum(&app, "confirm", uzum_body("uz-c", &inv)))).await;
        let ok = answers.iter().filter(|a| a.0 == 200).count();
        assert_eq!(ok, 1, "{answers:?}");
        assert!(answers.iter().filter(|a| a.0 != 200).all(|a| a.1["errorCode"] == "10016"));
        assert_eq!(paid_payments(&app, &inv).await, 1);
    }

    async fn one_active_transaction_per_invoice_across_providers(app: TestApp) {
        let (inv, _) = app.unpaid_invoice("+998944440010", AMOUNT).await;
        let prepared = click(&app, "prepare", &click_fields(9301, &inv, "1500.00", 0, None, 0)).await;
        assert_eq!(prepared["error"], 0);
        // While Click holds the invoice, Uzum and Payme are told "cannot pay now".
        assert_eq!(error_code(&uzum(&app, "check", uzum_body("x", &inv)).await), "10008");
        assert_eq!(error_code(&uzum(&app, "create", uzum_body("x", &inv)).await), "10008");
        let payme = app.http.post(app.url("/webhooks/payme"))
            .header("authorization", format!("Basic {}", STANDARD.encode("Paycom:payme-test-key")))
            .json(&json!({"id": 1, "method": "CreateTransaction", "params": {"id": "p-1", "time": chrono::Utc::now().timestamp_millis(), "amount": AMOUNT, "account": {"order_id": inv}}}))
            .send().await.expect("request").json::<Value>().await.expect("json");
        assert_eq!(payme["error"]["code"], -31008);
        // Once Click's attempt is cancelled, another provider may go ahead.
        let prepare_id = prepared["merchant_prepare_id"].as_i64().expect("id");
        assert_eq!(click(&app, "complete", &click_fields(9301, &inv, "1500.00", 1, Some(prepare_id), -1)).await["error"], -9);
        let (status, _) = uzum(&app, "create", uzum_body("x", &inv)).await;
        assert_eq!(status, 200);
    }

    async fn stale_uzum_and_click_transactions_are_swept(app: TestApp) {
        use crm_server::db::entities::provider_transaction as ptx;
        use sea_orm::{ActiveModelTrait, Set};
        let (inv, _) = app.unpaid_invoice("+998944440007", AMOUNT).await;
        uzum(&app, "create", uzum_body("uz-old", &inv)).await;
        let row = ptx::Entity::find().filter(ptx::Column::ProviderTxId.eq("uz-old")).one(app.db()).await.expect("q").expect("row");
        let mut old: ptx::ActiveModel = row.into();
        old.provider_time = Set(Some(chrono::Utc::now().timestamp_millis() - 31 * 60 * 1000));
        old.update(app.db()).await.expect("age it");
        crm_server::payments::uzum::sweep(&app.state).await.expect("sweep");
        let (_, st) = uzum(&app, "status", uzum_body("uz-old", &inv)).await;
        assert_eq!(st["status"], "FAILED");
        // The invoice is free again.
        let (status, _) = uzum(&app, "create", uzum_body("uz-new", &inv)).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uzum_signature_is_required_when_a_secret_is_set_and_refunds_can_be_refused() {
    let app = spawn_app_with(
        Backend::Sqlite,
        &[
            ("UZUM_SECRET_KEY", "uzum-hmac-secret"),
            ("UZUM_ALLOW_REFUND", "false"),
        ],
    )
    .await
    .expect("app");
    let (inv, _) = app.unpaid_invoice("+998944440008", AMOUNT).await;
    let auth = format!("Basic {}", STANDARD.encode("uzum:uzum-test-password"));
    let send = |action: &'static str, body: Value, signature: Option<String>| {
        let app = &app;
        let auth = auth.clone();
        async move {
            let raw = body.to_string();
            let mut req = app
                .http
                .post(app.url(&format!("/webhooks/uzum/{action}")))
                .header("authorization", auth)
                .body(raw);
            if let Some(sig) = signature {
                req = req.header("x-signature", sig);
            }
            let res = req.send().await.expect("request");
            (
                res.status().as_u16(),
                res.json::<Value>().await.expect("json"),
            )
        }
    };
    let sign = |body: &Value| {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"uzum-hmac-secret").expect("key");
        mac.update(body.to_string().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    let body = uzum_body("sig-1", &inv);
    assert_eq!(
        error_code(&send("create", body.clone(), None).await),
        "10001"
    );
    assert_eq!(
        error_code(&send("create", body.clone(), Some("00".repeat(32))).await),
        "10001"
    );
    assert_eq!(send("create", body.clone(), Some(sign(&body))).await.0, 200);
    assert_eq!(
        send("confirm", body.clone(), Some(sign(&body))).await.0,
        200
    );
    assert_eq!(
        error_code(&send("reverse", body.clone(), Some(sign(&body))).await),
        "10017"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_without_keys_are_off() {
    let app = spawn_app_with(
        Backend::Sqlite,
        &[("CLICK_SECRET_KEY", ""), ("UZUM_PASSWORD", "")],
    )
    .await
    .expect("app");
    let (inv, _) = app.unpaid_invoice("+998944440009", AMOUNT).await;
    assert_eq!(
        click(
            &app,
            "prepare",
            &click_fields(1, &inv, "1500.00", 0, None, 0)
        )
        .await["error"],
        -1
    );
    assert_eq!(
        error_code(&uzum(&app, "check", uzum_body("x", &inv)).await),
        "10001"
    );
    app.stop().await;
}
