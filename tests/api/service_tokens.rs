//! Service-token authentication, per security.md.

use chrono::{Duration, Utc};
use crm_server::{audit::Actor, auth::ServiceName, db::entities::service_token, proto};
use sea_orm::{ActiveModelTrait, EntityTrait, Set};
use serde_json::Value;
use tonic::Code;

use crate::{
    both_databases,
    helpers::{Backend, TestApp, reason, sha256_hex, spawn_app_with, with_token},
};

const SUBMIT: &str = "/crm.v1.ApplicationService/SubmitApplication";
const LEGACY: &str = "POST /api/v1/{service}/application";

fn request() -> proto::SubmitApplicationRequest {
    proto::SubmitApplicationRequest {
        full_name: "Bobur Aliyev".into(),
        phone: "+998971112233".into(),
        language: "en".into(),
        ..Default::default()
    }
}

async fn submit_status(app: &TestApp, token: Option<&str>) -> tonic::Status {
    let request = match token {
        Some(token) => with_token(request(), token),
        None => tonic::Request::new(request()),
    };
    app.applications()
        .await
        .submit_application(request)
        .await
        .expect_err("refused")
}

async fn legacy(app: &TestApp, service: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = app
        .http
        .post(app.url(&format!("/api/v1/{service}/application")))
        .json(&serde_json::json!({"full_name": "Bobur Aliyev", "phone": "+998971112233", "language": "en"}));
    if let Some(token) = token {
        req = req.header("X-SERVICE-TOKEN", token);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.expect("json body"))
}

/// Inserts a database token for `service` with a known raw value.
async fn insert_token(
    app: &TestApp,
    raw: &str,
    service: &str,
    expires_at: Option<chrono::DateTime<Utc>>,
    revoked: bool,
) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    service_token::ActiveModel {
        id: Set(id.clone()),
        service_name: Set(service.into()),
        description: Set(String::new()),
        token_hash: Set(sha256_hex(raw)),
        created_at: Set(Utc::now()),
        expires_at: Set(expires_at),
        last_used_at: Set(None),
        revoked_at: Set(revoked.then(Utc::now)),
    }
    .insert(app.db())
    .await
    .expect("insert token");
    app.state.tokens.reload().await.expect("reload");
    id
}

both_databases! {
    async fn a_missing_token_is_service_token_required_on_grpc_and_403_on_rest(app: TestApp) {
        let status = submit_status(&app, None).await;
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "SERVICE_TOKEN_REQUIRED");

        let (code, body) = legacy(&app, "bot1", None).await;
        assert_eq!(code, 403);
        assert_eq!(body["error"]["code"], "SERVICE_TOKEN_REQUIRED");
        assert!(body["error"]["detail"].is_string());

        let grpc_audit = app.audit_rows(SUBMIT, 1).await;
        assert_eq!(grpc_audit[0].outcome, "SERVICE_TOKEN_REQUIRED");
        assert_eq!(grpc_audit[0].actor_kind, "anonymous");
        assert_eq!(grpc_audit[0].actor_id, "127.0.0.1");
        assert_eq!(app.audit_rows(LEGACY, 1).await[0].outcome, "SERVICE_TOKEN_REQUIRED");
    }

    async fn a_wrong_token_is_service_token_invalid_and_audited_without_the_token(app: TestApp) {
        let wrong = "f".repeat(64);
        let status = submit_status(&app, Some(&wrong)).await;
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "SERVICE_TOKEN_INVALID");
        assert!(!status.message().contains(&wrong));

        let (code, body) = legacy(&app, "bot1", Some(&wrong)).await;
        assert_eq!(code, 403);
        assert_eq!(body["error"]["code"], "SERVICE_TOKEN_INVALID");

        let rows = app.audit_rows(SUBMIT, 1).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].outcome, "SERVICE_TOKEN_INVALID");
        let dump = format!("{rows:?}{:?}", app.audit_rows(LEGACY, 1).await);
        assert!(!dump.contains(&wrong), "audit rows must not hold the token");
        assert!(!dump.contains(&sha256_hex(&wrong)), "nor its hash");
    }

    async fn a_token_of_another_service_is_refused_on_the_legacy_route(app: TestApp) {
        let (code, body) = legacy(&app, "bot2", Some(&app.bot1_token)).await;
        assert_eq!(code, 403);
        assert_eq!(body["error"]["code"], "SERVICE_TOKEN_INVALID");
        let (code, _) = legacy(&app, "bot1", Some(&app.bot1_token)).await;
        assert_eq!(code, 201);
    }

    async fn a_revoked_token_stops_working_at_once_on_this_process(app: TestApp) {
        let raw = "revoke-me-".repeat(5);
        let id = insert_token(&app, &raw, "bot3", None, false).await;
        let (code, body) = legacy(&app, "bot3", Some(&raw)).await;
        assert_eq!(code, 201, "{body}");

        app.state.tokens.revoke(&id, &Actor::operator()).await.expect("revoked");
        let status = submit_status(&app, Some(&raw)).await;
        assert_eq!(reason(&status), "SERVICE_TOKEN_INVALID");

        let audit = app.audit_rows("service_token.revoke", 1).await;
        assert_eq!(audit[0].target_id.as_deref(), Some(id.as_str()));
    }

    async fn a_revocation_made_by_another_process_applies_within_five_seconds(app: TestApp) {
        let raw = "other-replica-".repeat(4);
        let id = insert_token(&app, &raw, "bot3", None, false).await;
        assert_eq!(legacy(&app, "bot3", Some(&raw)).await.0, 201);
        // As another replica or the CLI would: straight in the database.
        let row = service_token::Entity::find_by_id(id.as_str()).one(app.db()).await.expect("q").expect("row");
        let mut active: service_token::ActiveModel = row.into();
        active.revoked_at = Set(Some(Utc::now()));
        active.update(app.db()).await.expect("revoke");

        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (code, _) = legacy(&app, "bot3", Some(&raw)).await;
            if code == 403 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "still accepted after 5 s");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    async fn an_expired_token_is_refused(app: TestApp) {
        let raw = "expired-token-".repeat(4);
        insert_token(&app, &raw, "bot3", Some(Utc::now() - Duration::seconds(1)), false).await;
        assert_eq!(reason(&submit_status(&app, Some(&raw)).await), "SERVICE_TOKEN_INVALID");
        let raw_future = "future-token-".repeat(4);
        insert_token(&app, &raw_future, "bot3", Some(Utc::now() + Duration::days(1)), false).await;
        assert_eq!(legacy(&app, "bot3", Some(&raw_future)).await.0, 201);
    }

    async fn last_used_at_is_written_in_the_background_not_on_the_request(app: TestApp) {
        let rows = service_token::Entity::find().all(app.db()).await.expect("rows");
        let bot1 = rows.iter().find(|t| t.service_name == "bot1").expect("bot1 token");
        assert_eq!(bot1.last_used_at, None);
        assert_eq!(legacy(&app, "bot1", Some(&app.bot1_token)).await.0, 201);
        let after_request = service_token::Entity::find_by_id(bot1.id.as_str()).one(app.db()).await.expect("q").expect("row");
        assert_eq!(after_request.last_used_at, None, "nothing written on the request path");

        app.state.tokens.flush_usage().await.expect("flush");
        let flushed = service_token::Entity::find_by_id(bot1.id.as_str()).one(app.db()).await.expect("q").expect("row");
        let used = flushed.last_used_at.expect("last_used_at written");
        assert!((Utc::now() - used).num_seconds() < 10);
    }

    async fn service_tokens_created_by_the_store_are_listed_as_metadata_only(app: TestApp) {
        let name = ServiceName::parse("bot9").expect("name");
        let (raw, row) = app
            .state
            .tokens
            .create(&name, "ninth bot", Some(Utc::now() + Duration::days(30)), &Actor::operator())
            .await
            .expect("created");
        assert_eq!(row.token_hash, sha256_hex(raw.expose()));
        let listed = app.state.tokens.list().await.expect("list");
        assert!(listed.iter().any(|t| t.id == row.id && t.description == "ninth bot"));
        assert!(!format!("{listed:?}").contains(raw.expose()));
        assert_eq!(legacy(&app, "bot9", Some(raw.expose())).await.0, 201);
    }
}

/// A database token that is revoked or expired is refused even when an environment hash
/// matches the same raw token: the database answer is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_database_tokens_are_not_retried_against_the_environment() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let revoked = "shared-revoked-token-".repeat(3);
        let expired = "shared-expired-token-".repeat(3);
        let env = [
            ("SERVICE_TOKEN_BOT4_HASH", sha256_hex(&revoked)),
            ("SERVICE_TOKEN_BOT5_HASH", sha256_hex(&expired)),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let Some(app) = spawn_app_with(backend, &env).await else {
            eprintln!("TEST_DATABASE_URL is not set: PostgreSQL run skipped");
            continue;
        };
        // Before the database knows them, the environment hashes let them in.
        assert_eq!(legacy(&app, "bot4", Some(&revoked)).await.0, 201);
        assert_eq!(legacy(&app, "bot5", Some(&expired)).await.0, 201);

        insert_token(&app, &revoked, "bot4", None, true).await;
        insert_token(
            &app,
            &expired,
            "bot5",
            Some(Utc::now() - Duration::minutes(1)),
            false,
        )
        .await;
        for (service, raw) in [("bot4", &revoked), ("bot5", &expired)] {
            let (code, body) = legacy(&app, service, Some(raw)).await;
            assert_eq!(
                (code, body["error"]["code"].as_str()),
                (403, Some("SERVICE_TOKEN_INVALID")),
                "{backend:?} {service}"
            );
            assert_eq!(
                reason(&submit_status(&app, Some(raw)).await),
                "SERVICE_TOKEN_INVALID"
            );
        }
        app.stop().await;
    }
}
