//! Bots submit applications through gRPC and through their legacy REST route.

use std::collections::BTreeMap;

use crm_server::{db::entities::application, proto};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};
use tonic::Code;

use crate::{
    both_databases,
    helpers::{BOT2_ENV_TOKEN, TestApp, reason, with_token},
};

const SUBMIT: &str = "/crm.v1.ApplicationService/SubmitApplication";

/// `request` from the bot holding `token`, under an `idempotency-key`.
fn keyed<T>(request: T, token: &str, key: &str) -> tonic::Request<T> {
    let mut request = with_token(request, token);
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().expect("ascii key"));
    request
}

/// One change that breaks one rule.
type Mutation = Box<dyn Fn(&mut proto::SubmitApplicationRequest)>;

fn valid_request() -> proto::SubmitApplicationRequest {
    proto::SubmitApplicationRequest {
        full_name: "Aziz Karimov".into(),
        phone: "+998901234567".into(),
        email: Some("aziz@example.uz".into()),
        telegram_user_id: Some(123_456_789),
        telegram_username: Some("@aziz_k".into()),
        program_code: Some("CS-BSC".into()),
        language: "uz".into(),
        answers: BTreeMap::from([("school".to_owned(), "Lyceum 1".to_owned())]),
    }
}

fn valid_json() -> Value {
    json!({
        "full_name": "Dilnoza Rahimova",
        "phone": "+998935554433",
        "language": "ru",
        "program_code": "MBA",
        "answers": {"experience": "3 years"}
    })
}

/// Submits over gRPC and returns the field names of the violations.
async fn violations(app: &TestApp, request: proto::SubmitApplicationRequest) -> Vec<String> {
    use tonic_types::StatusExt;
    let status = app
        .applications()
        .await
        .submit_application(with_token(request, &app.bot1_token))
        .await
        .expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "VALIDATION_FAILED");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

both_databases! {
    async fn a_bot_with_a_database_token_submits_over_grpc(app: TestApp) {
        let created = app
            .applications()
            .await
            .submit_application(with_token(valid_request(), &app.bot1_token))
            .await
            .expect("submitted")
            .into_inner();
        assert_eq!(created.source, "bot1");
        assert_eq!(created.status(), proto::ApplicationStatus::New);
        assert_eq!(created.telegram_username.as_deref(), Some("aziz_k"), "the @ is dropped");
        assert_eq!(created.answers.get("school").map(String::as_str), Some("Lyceum 1"));
        assert!(created.created_at.is_some());

        let stored = application::Entity::find_by_id(created.id.as_str())
            .one(app.db())
            .await
            .expect("query")
            .expect("row stored");
        assert_eq!(stored.source, "bot1");
        assert_eq!(stored.phone, "+998901234567");

        let audit = app.audit_rows("/crm.v1.ApplicationService/SubmitApplication", 1).await;
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].actor_kind, "service");
        assert_eq!(audit[0].actor_id, "bot1");
        assert_eq!(audit[0].target_id.as_deref(), Some(created.id.as_str()));
        assert_eq!(audit[0].outcome, "OK");
        assert!(audit[0].request_id.is_some());
    }

    async fn a_bot_with_an_environment_token_submits_and_the_source_is_never_taken_from_the_request(app: TestApp) {
        let created = app
            .applications()
            .await
            .submit_application(with_token(valid_request(), BOT2_ENV_TOKEN))
            .await
            .expect("submitted")
            .into_inner();
        assert_eq!(created.source, "bot2");

        // The legacy body cannot choose the source either.
        let mut body = valid_json();
        body["source"] = json!("bot1");
        let res = app
            .http
            .post(app.url("/api/v1/bot2/application"))
            .header("X-SERVICE-TOKEN", BOT2_ENV_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 201);
        let json: Value = res.json().await.expect("json");
        assert_eq!(json["source"], "bot2");
    }

    async fn the_legacy_route_answers_201_with_the_application_as_json(app: TestApp) {
        let res = app
            .http
            .post(app.url("/api/v1/bot1/application"))
            .header("X-SERVICE-TOKEN", &app.bot1_token)
            .json(&valid_json())
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers()["content-type"], "application/json");
        let json: Value = res.json().await.expect("json");
        assert_eq!(json["status"], "NEW");
        assert_eq!(json["source"], "bot1");
        assert_eq!(json["language"], "ru");
        assert_eq!(json["program_code"], "MBA");
        assert_eq!(json["email"], Value::Null);
        assert_eq!(json["answers"]["experience"], "3 years");
        let created = json["created_at"].as_str().expect("created_at");
        assert!(chrono::DateTime::parse_from_rfc3339(created).is_ok(), "{created}");
        uuid::Uuid::parse_str(json["id"].as_str().expect("id")).expect("uuid id");
    }

    async fn the_legacy_route_reports_bad_input_as_a_field_error_and_stores_nothing(app: TestApp) {
        for body in ["not json", r#"{"full_name": "A", "phone": "x", "language": "de"}"#, r#"{"telegram_user_id": "abc"}"#] {
            let res = app
                .http
                .post(app.url("/api/v1/bot1/application"))
                .header("X-SERVICE-TOKEN", &app.bot1_token)
                .body(body)
                .send()
                .await
                .expect("request");
            assert_eq!(res.status(), 400, "{body}");
            let json: Value = res.json().await.expect("json");
            assert_eq!(json["error"]["code"], "VALIDATION_FAILED");
            assert!(json["error"]["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
        let count = application::Entity::find().count(app.db()).await.expect("count");
        assert_eq!(count, 0);
    }

    async fn every_validation_rule_is_refused_with_a_violation_on_its_field(app: TestApp) {
        let cases: Vec<(&str, Mutation)> = vec![
            ("full_name", Box::new(|r| r.full_name = "A".into())),
            ("full_name", Box::new(|r| r.full_name = "x".repeat(201))),
            ("full_name", Box::new(|r| r.full_name = "   ".into())),
            ("phone", Box::new(|r| r.phone = "998901234567".into())),
            ("phone", Box::new(|r| r.phone = "+99890".into())),
            ("phone", Box::new(|r| r.phone = "+9989012345678901".into())),
            ("email", Box::new(|r| r.email = Some("not-an-email".into()))),
            ("telegram_user_id", Box::new(|r| r.telegram_user_id = Some(-5))),
            ("telegram_username", Box::new(|r| r.telegram_username = Some("ab".into()))),
            ("telegram_username", Box::new(|r| r.telegram_username = Some("bad name!".into()))),
            ("program_code", Box::new(|r| r.program_code = Some("NOPE".into()))),
            ("language", Box::new(|r| r.language = "de".into())),
            ("language", Box::new(|r| r.language = String::new())),
            ("answers", Box::new(|r| {
                r.answers = (0..51).map(|i| (format!("q{i}"), "a".to_owned())).collect();
            })),
            ("answers", Box::new(|r| {
                r.answers = BTreeMap::from([("k".repeat(65), "a".to_owned())]);
            })),
            ("answers", Box::new(|r| {
                r.answers = BTreeMap::from([("q".to_owned(), "a".repeat(2001))]);
            })),
        ];
        for (field, mutate) in cases {
            let mut request = valid_request();
            mutate(&mut request);
            assert_eq!(violations(&app, request).await, [field]);
        }

        // The limits themselves are accepted.
        let mut edge = valid_request();
        edge.full_name = "Ю".repeat(200);
        edge.answers = (0..50).map(|i| (format!("{i:0>64}"), "я".repeat(2000))).collect();
        edge.email = None;
        edge.telegram_username = None;
        app.applications()
            .await
            .submit_application(with_token(edge, &app.bot1_token))
            .await
            .expect("limits are inclusive");

        // Several failures are reported together, one violation per field.
        let mut many = valid_request();
        many.phone = "nope".into();
        many.language = "xx".into();
        many.full_name = String::new();
        let mut fields = violations(&app, many).await;
        fields.sort();
        assert_eq!(fields, ["full_name", "language", "phone"]);
    }

    async fn an_inactive_program_cannot_be_applied_to(app: TestApp) {
        use sea_orm::{ActiveModelTrait, Set};
        let program = crm_server::db::entities::program::Entity::find_by_id("DS-MSC")
            .one(app.db())
            .await
            .expect("query")
            .expect("seeded program");
        let mut active: crm_server::db::entities::program::ActiveModel = program.into();
        active.active = Set(false);
        active.update(app.db()).await.expect("deactivate");
        app.state.applications.catalog().reload().await.expect("reload");

        let mut request = valid_request();
        request.program_code = Some("DS-MSC".into());
        assert_eq!(violations(&app, request).await, ["program_code"]);
    }

    // Quotas off: a load test of submits, not of quotas.
    async fn two_hundred_concurrent_submits_from_two_services_store_exactly_two_hundred_rows(app: TestApp) with { "RATE_LIMIT_ENABLED": "false" } {
        let channel = app.channel().await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let channel = channel.clone();
            let token = if i % 2 == 0 { app.bot1_token.clone() } else { BOT2_ENV_TOKEN.to_owned() };
            tasks.push(tokio::spawn(async move {
                let mut client = proto::application_service_client::ApplicationServiceClient::new(channel);
                let mut request = valid_request();
                request.phone = format!("+99890{i:07}");
                client
                    .submit_application(with_token(request, &token))
                    .await
                    .map(|r| r.into_inner())
            }));
        }
        let mut ids = std::collections::HashSet::new();
        for task in tasks {
            let created = task.await.expect("task").expect("every submit succeeds");
            assert!(ids.insert(created.id));
        }
        assert_eq!(ids.len(), 200);
        for service in ["bot1", "bot2"] {
            let count = application::Entity::find()
                .filter(application::Column::Source.eq(service))
                .count(app.db())
                .await
                .expect("count");
            assert_eq!(count, 100, "{service}");
        }
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 200);
        let audit = app.audit_rows(SUBMIT, 200).await;
        assert_eq!(audit.len(), 200);
    }

    async fn a_service_reads_its_own_applications_and_not_another_services(app: TestApp) {
        let mut client = app.applications().await;
        let created = client
            .submit_application(with_token(valid_request(), &app.bot1_token))
            .await
            .expect("submitted")
            .into_inner();

        let got = client
            .get_application(with_token(
                proto::GetApplicationRequest { id: created.id.clone() },
                &app.bot1_token,
            ))
            .await
            .expect("own application")
            .into_inner();
        assert_eq!(got, created);

        for (id, token) in [
            (created.id.clone(), BOT2_ENV_TOKEN),
            (uuid::Uuid::new_v4().to_string(), app.bot1_token.as_str()),
            ("not-a-uuid".to_owned(), app.bot1_token.as_str()),
        ] {
            let status = client
                .get_application(with_token(proto::GetApplicationRequest { id }, token))
                .await
                .expect_err("hidden");
            assert_eq!(status.code(), Code::NotFound);
            assert_eq!(reason(&status), "NOT_FOUND");
        }
    }

    // A fresh key is claimed in the statement that stores the application and its answer,
    // so a concurrent retry waits for that statement and replays it: never IN_PROGRESS.
    // Quotas off: a load test of idempotency, not of quotas.
    async fn fifty_concurrent_submits_with_one_key_make_one_application_and_forty_nine_replays(app: TestApp) with { "RATE_LIMIT_ENABLED": "false" } {
        let channel = app.channel().await;
        let calls = (0..50).map(|_| {
            let mut client = proto::application_service_client::ApplicationServiceClient::new(channel.clone());
            let request = keyed(valid_request(), &app.bot1_token, "one-key-for-fifty-submits");
            tokio::spawn(async move { client.submit_application(request).await })
        });
        let (mut ids, mut replays) = (std::collections::HashSet::new(), 0);
        for call in futures::future::join_all(calls).await {
            let response = call.expect("task").expect("every call answered with the application");
            replays += usize::from(response.metadata().get("x-idempotency-replay").is_some());
            ids.insert(response.into_inner().id);
        }
        assert_eq!((ids.len(), replays), (1, 49));
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 1);
        assert_eq!(app.audit_rows(SUBMIT, 1).await.len(), 1, "replays write no audit row");
    }

    async fn a_key_reused_for_another_application_is_refused_and_stores_nothing(app: TestApp) {
        let mut client = app.applications().await;
        let key = "bot1-submit-key-000002";
        let first = client.submit_application(keyed(valid_request(), &app.bot1_token, key)).await.expect("first").into_inner();
        let mut other = valid_request();
        other.phone = "+998909998877".into();
        let status = client.submit_application(keyed(other, &app.bot1_token, key)).await.expect_err("another request");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED"));
        // The key is bot1's own: bot2 may use the same string for its own application.
        let bot2s = client.submit_application(keyed(valid_request(), BOT2_ENV_TOKEN, key)).await.expect("bot2");
        assert!(bot2s.metadata().get("x-idempotency-replay").is_none());
        assert_ne!(bot2s.into_inner().id, first.id);
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 2);
    }

    async fn a_refused_submit_is_replayed_as_refused_under_its_key(app: TestApp) {
        let mut client = app.applications().await;
        let mut bad = valid_request();
        bad.phone = "12345".into();
        for replay in [false, true] {
            let status = client.submit_application(keyed(bad.clone(), &app.bot1_token, "bot1-refused-key-0003")).await.expect_err("refused");
            assert_eq!((status.code(), reason(&status).as_str()), (Code::InvalidArgument, "VALIDATION_FAILED"));
            assert_eq!(status.metadata().get("x-idempotency-replay").is_some(), replay);
        }
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 0);
    }

    // A claim left unanswered (a replica that died between claim and answer on the
    // claim-first path) blocks its key for a minute, then is taken over.
    async fn an_unanswered_submit_key_blocks_for_a_minute_then_is_taken_over(app: TestApp) {
        let request = valid_request();
        let stale = crm_server::db::now() - chrono::Duration::seconds(61);
        for (key, locked_at) in [("bot1-abandoned-key-01", stale), ("bot1-running-key-0001", crm_server::db::now())] {
            app.unanswered_claim(("service:bot1", SUBMIT, key), &request, locked_at).await;
        }
        let mut client = app.applications().await;
        let status = client.submit_application(keyed(request.clone(), &app.bot1_token, "bot1-running-key-0001")).await.expect_err("still running");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::Aborted, "IDEMPOTENCY_KEY_IN_PROGRESS"));
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 0);
        let taken = client.submit_application(keyed(request.clone(), &app.bot1_token, "bot1-abandoned-key-01")).await.expect("taken over");
        assert!(taken.metadata().get("x-idempotency-replay").is_none());
        let replay = client.submit_application(keyed(request, &app.bot1_token, "bot1-abandoned-key-01")).await.expect("replayed");
        assert!(replay.metadata().get("x-idempotency-replay").is_some());
        assert_eq!(replay.into_inner().id, taken.into_inner().id);
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 1);
    }
}

/// The answer stored for an idempotency key is written in the same transaction as the
/// application it answers (PostgreSQL's `xmin` names the transaction that wrote a row), so no
/// crash can leave an application whose retry would not be recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_and_its_idempotent_answer_commit_in_one_transaction() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let Some(app) = crate::helpers::spawn_app_with(crate::helpers::Backend::Postgres, &[]).await
    else {
        eprintln!("TEST_DATABASE_URL is not set: transaction test skipped");
        return;
    };
    let key = "submit-in-one-transaction-0001";
    let mut request = with_token(valid_request(), &app.bot1_token);
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().expect("ascii key"));
    let created = app
        .applications()
        .await
        .submit_application(request)
        .await
        .expect("submitted")
        .into_inner();
    let writer = |sql: String| async {
        app.db()
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .expect("query")
            .expect("row")
            .try_get::<String>("", "tx")
            .expect("xmin")
    };
    let application_tx = writer(format!(
        "SELECT xmin::text AS tx FROM applications WHERE id = '{}'",
        created.id
    ))
    .await;
    let answer_tx = writer(format!(
        "SELECT xmin::text AS tx FROM idempotency_keys WHERE key = '{key}' AND response IS NOT NULL"
    ))
    .await;
    assert_eq!(application_tx, answer_tx);
    app.stop().await;
}
