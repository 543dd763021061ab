//! Quotas (security.md "Rate limits") on every transport, one replica or two on one Redis, and
//! the transport limits that keep the server standing under oversized or slow input.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use crm_server::{
    auth::Role,
    proto::{self, payment_service_client::PaymentServiceClient},
};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::{Code, metadata::MetadataMap};

use crate::helpers::{
    Backend, RedisServer, TestApp, payme_basic, reason, spawn_app_with, with_bearer, with_token,
};

/// The three `x-ratelimit-*` values of a gRPC answer.
fn quota_headers(meta: &MetadataMap) -> (u32, u32, u64) {
    let get = |name: &str| -> u64 {
        meta.get(name)
            .unwrap_or_else(|| panic!("{name} missing from {meta:?}"))
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number")
    };
    (
        get("x-ratelimit-limit") as u32,
        get("x-ratelimit-remaining") as u32,
        get("x-ratelimit-reset"),
    )
}

fn retry_after(status: &tonic::Status) -> u64 {
    status
        .metadata()
        .get("retry-after")
        .expect("retry-after")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds")
}

async fn login_from(
    app: &TestApp,
    login: &str,
    forwarded_for: Option<&str>,
) -> Result<tonic::Response<proto::AuthResponse>, tonic::Status> {
    let mut request = tonic::Request::new(proto::LoginRequest {
        login: login.into(),
        password: "not-the-password".into(),
    });
    if let Some(xff) = forwarded_for {
        request
            .metadata_mut()
            .insert("x-forwarded-for", xff.parse().expect("ascii"));
    }
    app.auth().await.login(request).await
}

fn submit_request(phone: &str) -> proto::SubmitApplicationRequest {
    proto::SubmitApplicationRequest {
        full_name: "Quota Tester".into(),
        phone: phone.into(),
        language: "en".into(),
        ..Default::default()
    }
}

/// A token for a service name no other test (or earlier run) uses, so shared Redis buckets
/// start empty.
async fn fresh_service_token(app: &TestApp) -> String {
    let name = format!("rl{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    app.service_token(&name).await
}

async fn submit_as(app: &TestApp, token: &str) -> Result<proto::Application, tonic::Status> {
    app.applications()
        .await
        .submit_application(with_token(submit_request("+998901112233"), token))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_login_from_one_address_is_refused_until_retry_after() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    for i in 0..5u32 {
        // Five different identifiers: only the address bucket fills.
        let status = login_from(&app, &format!("+99890000000{i}"), None)
            .await
            .expect_err("wrong password");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        let (limit, remaining, reset) = quota_headers(status.metadata());
        assert_eq!((limit, remaining), (5, 4 - i));
        assert!((1..=60).contains(&reset), "reset {reset}");
    }
    let refused = login_from(&app, "+998900000009", None)
        .await
        .expect_err("sixth");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
    let details = tonic_types::StatusExt::get_error_details(&refused);
    let delay = details
        .retry_info()
        .and_then(|i| i.retry_delay)
        .expect("RetryInfo");
    let wait = retry_after(&refused);
    // 5 per minute: one more every 12 s.
    assert!((11..=12).contains(&wait), "retry-after {wait}");
    assert_eq!(crm_server::ratelimit::ceil_secs(delay), wait);
    assert_eq!(quota_headers(refused.metadata()).1, 0);

    tokio::time::sleep(Duration::from_secs(wait)).await;
    let after = login_from(&app, "+998900000009", None)
        .await
        .expect_err("wrong password, but no longer throttled");
    assert_eq!(reason(&after), "INVALID_CREDENTIALS");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_identifier_is_limited_whatever_the_address() {
    // Behind a trusted proxy every call comes from a different client address.
    let app = spawn_app_with(Backend::Sqlite, &[("TRUSTED_PROXIES", "127.0.0.1/32")])
        .await
        .expect("app");
    for i in 0..5 {
        let status = login_from(&app, "+998901234567", Some(&format!("198.51.100.{i}")))
            .await
            .expect_err("wrong password");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    }
    let refused = login_from(&app, "+998901234567", Some("198.51.100.77"))
        .await
        .expect_err("sixth try of one identifier");
    assert_eq!(reason(&refused), "RATE_LIMITED");
    assert!((11..=12).contains(&retry_after(&refused)));
    // Another identifier from a fresh address is unaffected.
    let other = login_from(&app, "+998907654321", Some("198.51.100.78"))
        .await
        .expect_err("wrong password");
    assert_eq!(reason(&other), "INVALID_CREDENTIALS");
    app.stop().await;
}

async fn register(
    app: &TestApp,
    i: u32,
    forwarded_for: String,
) -> Result<tonic::Response<proto::AuthResponse>, tonic::Status> {
    let mut request = tonic::Request::new(proto::RegisterRequest {
        phone: format!("+9989100000{i:02}"),
        email: None,
        password: "a-long-enough-password".into(),
        full_name: "Quota Tester".into(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", forwarded_for.parse().expect("ascii"));
    app.auth().await.register(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    // Untrusted peer: rotating X-Forwarded-For does not make new clients.
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    for i in 0..3 {
        register(&app, i, format!("203.0.113.{i}"))
            .await
            .expect("registered");
    }
    let refused = register(&app, 3, "203.0.113.99".into())
        .await
        .expect_err("fourth");
    assert_eq!(reason(&refused), "RATE_LIMITED");
    app.stop().await;

    // Through a trusted proxy the real client address is used.
    let app = spawn_app_with(Backend::Sqlite, &[("TRUSTED_PROXIES", "127.0.0.0/8")])
        .await
        .expect("app");
    for i in 0..6 {
        register(&app, i, format!("203.0.113.{i}"))
            .await
            .expect("each client registers");
    }
    for i in 10..13 {
        register(&app, i, "198.51.100.1, 127.0.0.5".into())
            .await
            .expect("registered");
    }
    let refused = register(&app, 13, "198.51.100.1".into())
        .await
        .expect_err("fourth");
    assert_eq!(reason(&refused), "RATE_LIMITED");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_quotas_belong_to_principals() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    let mut tokens = Vec::new();
    for phone in ["+998935550001", "+998935550002"] {
        app.create_user(Role::Applicant, phone, "applicant-pw-1")
            .await;
        tokens.push(app.login(phone, "applicant-pw-1").await.access_token);
    }
    let mut payments = PaymentServiceClient::new(app.channel().await);
    let list = |token: &str| with_bearer(proto::ListInvoicesRequest::default(), token);
    for i in 0..10u32 {
        let ok = payments
            .list_invoices(list(&tokens[0]))
            .await
            .expect("within quota");
        assert_eq!(quota_headers(ok.metadata()).0, 10);
        assert_eq!(quota_headers(ok.metadata()).1, 9 - i);
    }
    // All PaymentService methods share the bucket.
    let refused = payments
        .get_invoice(with_bearer(
            proto::GetInvoiceRequest {
                id: uuid::Uuid::new_v4().to_string(),
            },
            &tokens[0],
        ))
        .await
        .expect_err("eleventh");
    assert_eq!(reason(&refused), "RATE_LIMITED");
    assert!((5..=6).contains(&retry_after(&refused)));
    // The other user, on the same address and connection, has a bucket of their own.
    let other = payments
        .list_invoices(list(&tokens[1]))
        .await
        .expect("other user");
    assert_eq!(quota_headers(other.metadata()).1, 9);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_route_answers_429_and_shares_the_grpc_bucket() {
    let app = spawn_app_with(Backend::Sqlite, &[("RATE_LIMIT_PER_MINUTE", "3")])
        .await
        .expect("app");
    submit_as(&app, &app.bot1_token).await.expect("gRPC submit");
    let rest = || {
        app.http
            .post(app.url("/api/v1/bot1/application"))
            .header("x-service-token", &app.bot1_token)
            .json(&json!({"full_name": "Quota Tester", "phone": "+998901112233", "language": "ru"}))
            .send()
    };
    for left in [1, 0] {
        let res = rest().await.expect("request");
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers()["x-ratelimit-limit"], "3");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            left.to_string().as_str()
        );
        assert!(res.headers().contains_key("x-ratelimit-reset"));
    }
    let res = rest().await.expect("request");
    assert_eq!(res.status(), 429);
    let wait: u64 = res.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("secs");
    assert!((19..=20).contains(&wait), "retry-after {wait}");
    assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"]["code"], "RATE_LIMITED");
    // The gRPC method is in the same bucket now.
    assert_eq!(
        reason(&submit_as(&app, &app.bot1_token).await.expect_err("spent")),
        "RATE_LIMITED"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_callers_see_the_quota_headers() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    let res = app
        .http
        .post(app.url("/crm.v1.ApplicationService/ListPrograms"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", crate::helpers::ALLOWED_ORIGIN)
        .header("x-service-token", &app.bot1_token)
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .expect("grpc-web call");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-limit"], "60");
    assert_eq!(res.headers()["x-ratelimit-remaining"], "59");
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refusals_need_no_database() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    for i in 0..5 {
        login_from(&app, &format!("+99890000001{i}"), None)
            .await
            .expect_err("wrong password");
    }
    // From here on the server has no database at all.
    app.db().clone().close().await.expect("close pool");
    let needs_db = register(&app, 1, "203.0.113.1".into())
        .await
        .expect_err("no database");
    assert_eq!(reason(&needs_db), "UNAVAILABLE");
    // Refusals for rate are still answered, so they never needed it.
    for _ in 0..20 {
        let refused = login_from(&app, "+998900000019", None)
            .await
            .expect_err("throttled");
        assert_eq!(reason(&refused), "RATE_LIMITED", "{refused:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_over_quota_are_refused_without_an_audit_row() {
    let app = spawn_app_with(Backend::Sqlite, &[("RATE_LIMIT_PER_MINUTE", "3")])
        .await
        .expect("app");
    let mut client = app.applications().await;
    let mut reasons = Vec::new();
    for _ in 0..10 {
        let refused = client
            .list_programs(with_token(
                proto::ListProgramsRequest::default(),
                "not-a-valid-token",
            ))
            .await
            .expect_err("bad token");
        reasons.push(reason(&refused));
    }
    // The address's quota counts the bad attempts; past it, the refusal is for rate.
    assert_eq!(reasons[..3], ["SERVICE_TOKEN_INVALID"; 3]);
    assert_eq!(reasons[3..], ["RATE_LIMITED"; 7]);
    let legacy = app
        .http
        .post(app.url("/api/v1/bot1/application"))
        .header("x-service-token", "not-a-valid-token")
        .json(&json!({"full_name": "Quota Tester", "phone": "+998901112233", "language": "ru"}))
        .send()
        .await
        .expect("legacy call");
    assert_eq!(legacy.status(), 429, "the legacy route shares the bucket");
    // Only the attempts within quota were audited: a flood costs no database work. (Waits
    // the helper's full 5 s for an eleventh row that must not come.)
    let audited = app
        .audit_rows("/crm.v1.ApplicationService/ListPrograms", 4)
        .await;
    assert_eq!(audited.len(), 3);
    assert!(
        audited
            .iter()
            .all(|row| row.outcome == "SERVICE_TOKEN_INVALID")
    );
    let legacy_rows = app
        .audit_rows("POST /api/v1/{service}/application", 0)
        .await;
    assert!(legacy_rows.is_empty(), "{legacy_rows:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_can_be_switched_off_but_not_the_transport_limits() {
    let app = spawn_app_with(Backend::Sqlite, &[("RATE_LIMIT_ENABLED", "false")])
        .await
        .expect("app");
    for i in 0..12 {
        let status = login_from(&app, &format!("+9989000000{i:02}"), None)
            .await
            .expect_err("wrong password");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        assert!(status.metadata().get("x-ratelimit-limit").is_none());
    }
    let res = app
        .http
        .post(app.url("/webhooks/payme"))
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.expect("json")["error"]["code"],
        -32700
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_provider_calls_are_never_throttled() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    let (invoice, payer) = app.unpaid_invoice("+998935550010", 500_000).await;
    let check = json!({"method": "CheckPerformTransaction", "id": 1, "params": {"amount": 500_000, "account": {"order_id": invoice}}});
    // The payer is throttled on PaymentService meanwhile.
    let mut payments = PaymentServiceClient::new(app.channel().await);
    let mut throttled = 0;
    for _ in 0..15 {
        if let Err(status) = payments
            .list_invoices(with_bearer(proto::ListInvoicesRequest::default(), &payer))
            .await
        {
            assert_eq!(reason(&status), "RATE_LIMITED");
            throttled += 1;
        }
    }
    assert_eq!(throttled, 5);
    // 300 Payme calls from the same address within the minute, 20 at a time.
    let basic = payme_basic();
    let calls = futures::stream::iter(0..300).map(|_| app.payme(&basic, check.clone()));
    let answers: Vec<Value> = futures::StreamExt::buffer_unordered(calls, 20)
        .collect()
        .await;
    assert_eq!(answers.len(), 300);
    for answer in &answers {
        assert_eq!(answer["result"]["allow"], true, "{answer}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_webhook_calls_are_limited_per_address_in_the_providers_formats() {
    let app = spawn_app_with(Backend::Sqlite, &[("RATE_LIMIT_PER_MINUTE", "4")])
        .await
        .expect("app");
    let ping = json!({"method": "CheckTransaction", "id": 7, "params": {"id": "nope"}});
    let wrong = format!("Basic {}", STANDARD.encode("Paycom:wrong"));
    for _ in 0..4 {
        assert_eq!(
            app.payme(&wrong, ping.clone()).await["error"]["code"],
            -32504
        );
    }
    let audited = app.audit_rows("POST /webhooks/payme", 4).await.len();
    assert_eq!(audited, 4);
    // Over the quota: still each provider's own answer, and no audit row (no database work).
    for _ in 0..10 {
        assert_eq!(
            app.payme(&wrong, ping.clone()).await["error"]["code"],
            -32504
        );
    }
    let click = app
        .http
        .post(app.url("/webhooks/click/prepare"))
        .form(&[
            ("click_trans_id", "1"),
            ("service_id", "3001"),
            ("click_paydoc_id", "1"),
            ("merchant_trans_id", "x"),
            ("amount", "1.00"),
            ("action", "0"),
            ("error", "0"),
            ("sign_time", "2026-11-22 10:00:00"),
            ("sign_string", "00"),
        ])
        .send()
        .await
        .expect("click");
    assert_eq!(click.status(), 200);
    assert_eq!(click.json::<Value>().await.expect("json")["error"], -8);
    let uzum = app
        .http
        .post(app.url("/webhooks/uzum/check"))
        .header("authorization", "Basic d3Jvbmc6d3Jvbmc=")
        .json(&json!({"serviceId": 5003}))
        .send()
        .await
        .expect("uzum");
    assert_eq!(uzum.status(), 400);
    let body: Value = uzum.json().await.expect("json");
    assert_eq!(
        (body["status"].as_str(), body["errorCode"].as_str()),
        (Some("FAILED"), Some("10001"))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.audit_rows("POST /webhooks/payme", 0).await.len(), 4);
    assert!(
        app.audit_rows("POST /webhooks/click/prepare", 0)
            .await
            .is_empty()
    );
    assert!(
        app.audit_rows("POST /webhooks/uzum/check", 0)
            .await
            .is_empty()
    );
    // The real Payme, from the same address, is answered as always.
    let real = app.payme(&payme_basic(), ping.clone()).await;
    assert_eq!(real["error"]["code"], -31003, "{real}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_and_the_server_keeps_serving() {
    let app = spawn_app_with(Backend::Sqlite, &[("RATE_LIMIT_ENABLED", "false")])
        .await
        .expect("app");
    let mut client = app.applications().await;
    // A 5 MiB message against the default 4 MiB decode limit.
    let mut huge = submit_request("+998901112233");
    huge.full_name = "x".repeat(5 * 1024 * 1024);
    let status = client
        .submit_application(with_token(huge, &app.bot1_token))
        .await
        .expect_err("too large");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );

    // 100 KiB webhook bodies: each provider's own refusal.
    let big = "a".repeat(100 * 1024);
    let payme = app
        .http
        .post(app.url("/webhooks/payme"))
        .header("authorization", payme_basic())
        .body(big.clone())
        .send()
        .await
        .expect("payme");
    assert_eq!(payme.status(), 200);
    assert_eq!(
        payme.json::<Value>().await.expect("json")["error"]["code"],
        -32700
    );
    let click = app
        .http
        .post(app.url("/webhooks/click/complete"))
        .body(big.clone())
        .send()
        .await
        .expect("click");
    assert_eq!(click.json::<Value>().await.expect("json")["error"], -8);
    let uzum = app
        .http
        .post(app.url("/webhooks/uzum/create"))
        .body(big)
        .send()
        .await
        .expect("uzum");
    assert_eq!(uzum.status(), 400);

    // A 64 KiB header: 431 over HTTP/1.1, refused over HTTP/2 too.
    let header = "h".repeat(64 * 1024);
    let res = app
        .http
        .get(app.url("/healthz"))
        .header("x-padding", &header)
        .send()
        .await
        .expect("http/1.1");
    assert_eq!(res.status(), 431);
    let mut request = with_token(proto::ListProgramsRequest::default(), &app.bot1_token);
    request
        .metadata_mut()
        .insert("x-padding", header.parse().expect("ascii"));
    assert!(
        app.applications()
            .await
            .list_programs(request)
            .await
            .is_err()
    );

    // Still serving, on the old connection and on new ones.
    client
        .list_programs(with_token(
            proto::ListProgramsRequest::default(),
            &app.bot1_token,
        ))
        .await
        .expect("old connection");
    submit_as(&app, &app.bot1_token)
        .await
        .expect("new connection");
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_deadline_is_answered_and_the_server_keeps_serving() {
    let Some(app) = spawn_app_with(
        Backend::Postgres,
        &[
            ("REQUEST_TIMEOUT_SECONDS", "1"),
            ("RATE_LIMIT_ENABLED", "false"),
        ],
    )
    .await
    else {
        eprintln!("TEST_DATABASE_URL is not set: deadline test skipped");
        return;
    };
    let (invoice, _) = app.unpaid_invoice("+998935550020", 500_000).await;
    // Another session holds the tables, so our queries wait.
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let blocker = sea_orm::Database::connect(&app.pg().expect("pg").url)
        .await
        .expect("connect");
    let txn = blocker.begin().await.expect("begin");
    txn.execute_unprepared("LOCK TABLE applications, invoices IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");

    let started = std::time::Instant::now();
    let status = submit_as(&app, &app.bot1_token)
        .await
        .expect_err("deadline");
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unavailable, "UNAVAILABLE")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let rest = app
        .http
        .post(app.url("/api/v1/bot1/application"))
        .header("x-service-token", &app.bot1_token)
        .json(&json!({"full_name": "Quota Tester", "phone": "+998901112233", "language": "ru"}))
        .send()
        .await
        .expect("request");
    assert_eq!(rest.status(), 503);
    let check = json!({"method": "CheckPerformTransaction", "id": 3, "params": {"amount": 500_000, "account": {"order_id": invoice}}});
    assert_eq!(
        app.payme(&payme_basic(), check.clone()).await["error"]["code"],
        -32400
    );

    txn.rollback().await.expect("unlock");
    submit_as(&app, &app.bot1_token)
        .await
        .expect("serving again");
    assert_eq!(
        app.payme(&payme_basic(), check).await["result"]["allow"],
        true
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_share_one_quota() {
    let Ok(redis_url) = std::env::var("TEST_REDIS_URL") else {
        eprintln!("TEST_REDIS_URL is not set: Redis quota test skipped");
        return;
    };
    let vars = [
        ("RATE_LIMIT_BACKEND", "redis"),
        ("REDIS_URL", redis_url.as_str()),
        ("RATE_LIMIT_PER_MINUTE", "4"),
    ];
    let a = spawn_app_with(Backend::Sqlite, &vars).await.expect("app");
    let token = fresh_service_token(&a).await;
    let b = a.replica().await;
    assert!(a.state.limiter.using_redis() && b.state.limiter.using_redis());
    for app in [&a, &b, &a, &b] {
        submit_as(app, &token)
            .await
            .expect("within the shared quota");
    }
    for app in [&a, &b] {
        assert_eq!(
            reason(&submit_as(app, &token).await.expect_err("spent on both")),
            "RATE_LIMITED"
        );
    }
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_falls_back_to_local_buckets_and_comes_back() {
    if std::env::var("TEST_REDIS_URL").is_err() {
        eprintln!("TEST_REDIS_URL is not set: Redis fallback test skipped");
        return;
    }
    // A Redis of our own, so stopping it disturbs no other test.
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(
        Backend::Sqlite,
        &[
            ("RATE_LIMIT_BACKEND", "redis"),
            ("REDIS_URL", url.as_str()),
            ("RATE_LIMIT_PER_MINUTE", "3"),
        ],
    )
    .await
    .expect("app");
    let token = fresh_service_token(&app).await;
    assert!(app.state.limiter.using_redis());
    for _ in 0..3 {
        submit_as(&app, &token).await.expect("within quota");
    }
    assert_eq!(
        reason(&submit_as(&app, &token).await.expect_err("spent")),
        "RATE_LIMITED"
    );

    redis.stop();
    // Served from the local buckets, which have their own count, and still enforced.
    for _ in 0..3 {
        submit_as(&app, &token).await.expect("local quota");
    }
    assert!(!app.state.limiter.using_redis());
    assert_eq!(
        reason(&submit_as(&app, &token).await.expect_err("local spent")),
        "RATE_LIMITED"
    );

    redis.restart().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !app.state.limiter.using_redis() {
        assert!(
            std::time::Instant::now() < deadline,
            "never returned to Redis"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Back on Redis (which restarted empty): its buckets count again.
    for _ in 0..3 {
        submit_as(&app, &token).await.expect("redis quota");
    }
    assert_eq!(
        reason(&submit_as(&app, &token).await.expect_err("redis spent")),
        "RATE_LIMITED"
    );
    app.stop().await;
}
