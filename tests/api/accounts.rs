//! AuthService: registration, sign-in, JWT checks, refresh rotation, sessions, service tokens.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use crm_server::{auth::Role, proto};
use hmac::{Hmac, KeyInit, Mac};
use tonic::{Code, Request};

use crate::{
    both_databases,
    helpers::{STAFF_PASSWORD, TEST_SECRET_KEY, TestApp, reason, with_bearer, with_token},
};

const PASSWORD: &str = "applicant-pass-1";

async fn register(app: &TestApp, phone: &str) -> proto::AuthResponse {
    app.auth()
        .await
        .register(proto::RegisterRequest {
            phone: phone.into(),
            email: Some(format!("{}@example.uz", &phone[1..])),
            password: PASSWORD.into(),
            full_name: "Malika Tosheva".into(),
        })
        .await
        .expect("registered")
        .into_inner()
}

async fn me(app: &TestApp, access: &str) -> Result<proto::User, tonic::Status> {
    app.auth()
        .await
        .get_me(with_bearer(proto::GetMeRequest {}, access))
        .await
        .map(|r| r.into_inner())
}

async fn refresh(app: &TestApp, token: &str) -> Result<proto::AuthResponse, tonic::Status> {
    app.auth()
        .await
        .refresh(proto::RefreshRequest {
            refresh_token: token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn forge(header: serde_json::Value, claims: serde_json::Value, key: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
    mac.update(format!("{h}.{c}").as_bytes());
    format!(
        "{h}.{c}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Waits until `check` holds, up to `limit`.
async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

both_databases! {
    async fn an_applicant_registers_and_is_signed_in(app: TestApp) {
        let auth = register(&app, "+998901110001").await;
        assert_eq!(auth.token_type, "Bearer");
        assert_eq!(auth.expires_in, 30 * 60);
        assert_eq!(auth.refresh_expires_in, 7 * 86_400);
        assert_eq!(auth.refresh_token.len(), 64);
        let user = auth.user.expect("user");
        assert_eq!(user.role(), proto::Role::Applicant);
        assert_eq!(user.phone, "+998901110001");
        assert_eq!(me(&app, &auth.access_token).await.expect("me"), user);

        let status = app
            .auth()
            .await
            .register(proto::RegisterRequest {
                phone: "+998 90 111 00 01".into(),
                email: None,
                password: PASSWORD.into(),
                full_name: "Someone Else".into(),
            })
            .await
            .expect_err("phone taken");
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(reason(&status), "ALREADY_EXISTS");

        let status = app
            .auth()
            .await
            .register(proto::RegisterRequest {
                phone: "12".into(),
                email: Some("nope".into()),
                password: "short".into(),
                full_name: "X".into(),
            })
            .await
            .expect_err("invalid");
        use tonic_types::StatusExt;
        let mut fields: Vec<_> = status
            .get_details_bad_request()
            .expect("violations")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        fields.sort();
        assert_eq!(fields, ["email", "full_name", "password", "phone"]);
        let audit = app.audit_rows("auth.register", 1).await;
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].actor_id, user.id);
    }

    async fn unknown_login_and_wrong_password_are_indistinguishable(app: TestApp) {
        register(&app, "+998901110002").await;
        let mut answers = Vec::new();
        for (login, password) in [
            ("+998901110002", "wrong-password"),
            ("+998909999999", PASSWORD),
            ("nobody@example.uz", PASSWORD),
        ] {
            let status = app
                .auth()
                .await
                .login(proto::LoginRequest { login: login.into(), password: password.into() })
                .await
                .expect_err("refused");
            answers.push((status.code(), reason(&status), status.message().to_owned()));
        }
        assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
        assert_eq!(answers[0].1, "INVALID_CREDENTIALS");
        assert_eq!(answers[0].0, Code::Unauthenticated);

        // Email logins are case-insensitive; the right password works.
        let ok = app.login("998901110002@EXAMPLE.uz", PASSWORD).await;
        assert!(!ok.access_token.is_empty());
        let failures = app.audit_rows("auth.login", 4).await;
        assert_eq!(failures.iter().filter(|r| r.outcome == "INVALID_CREDENTIALS").count(), 3);
        assert_eq!(failures.iter().filter(|r| r.outcome == "OK").count(), 1);
    }

    async fn forged_and_unfit_access_tokens_are_refused(app: TestApp) {
        let auth = register(&app, "+998901110003").await;
        let user_id = auth.user.as_ref().expect("user").id.clone();
        let now = chrono::Utc::now().timestamp();
        let claims = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut c = serde_json::json!({
                "sub": user_id, "sid": "s", "role": "ADMIN", "typ": "access",
                "iss": "crm-server", "aud": "crm-api", "iat": now, "nbf": now, "exp": now + 600, "jti": "j"
            });
            edit(&mut c);
            c
        };
        let hs256 = serde_json::json!({"alg": "HS256", "typ": "JWT"});
        let key = TEST_SECRET_KEY.as_bytes();
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims(&|_| {}).to_string())
        );
        let cases = [
            ("alg none", none, "TOKEN_INVALID"),
            ("HS512", forge(serde_json::json!({"alg": "HS512"}), claims(&|_| {}), key), "TOKEN_INVALID"),
            ("wrong key", forge(hs256.clone(), claims(&|_| {}), b"some-other-key-of-adequate-length!"), "TOKEN_INVALID"),
            ("expired", forge(hs256.clone(), claims(&|c| c["exp"] = (now - 120).into()), key), "TOKEN_EXPIRED"),
            ("wrong issuer", forge(hs256.clone(), claims(&|c| c["iss"] = "evil".into()), key), "TOKEN_INVALID"),
            ("wrong audience", forge(hs256.clone(), claims(&|c| c["aud"] = "other".into()), key), "TOKEN_INVALID"),
            ("string exp", forge(hs256.clone(), claims(&|c| c["exp"] = (now + 600).to_string().into()), key), "TOKEN_INVALID"),
            ("refresh typ", forge(hs256.clone(), claims(&|c| c["typ"] = "refresh".into()), key), "TOKEN_INVALID"),
            ("refresh token", auth.refresh_token.clone(), "TOKEN_INVALID"),
            ("garbage", "x.y.z".to_owned(), "TOKEN_INVALID"),
        ];
        for (what, token, expected) in cases {
            let status = me(&app, &token).await.expect_err(what);
            assert_eq!(status.code(), Code::Unauthenticated, "{what}");
            assert_eq!(reason(&status), expected, "{what}");
        }
        let mut basic = Request::new(proto::GetMeRequest {});
        basic.metadata_mut().insert("authorization", "Basic dXNlcjpwdw==".parse().expect("value"));
        assert_eq!(reason(&app.auth().await.get_me(basic).await.expect_err("basic")), "TOKEN_INVALID");
        let status = app.auth().await.get_me(Request::new(proto::GetMeRequest {})).await.expect_err("none");
        assert_eq!(reason(&status), "AUTH_REQUIRED");
    }

    async fn twenty_concurrent_refreshes_leave_exactly_one_live_successor(app: TestApp) {
        let auth = register(&app, "+998901110004").await;
        let channel = app.channel().await;
        // All twenty are sent in one burst, as a client firing them at once would.
        let calls = (0..20).map(|_| {
            let mut client = proto::auth_service_client::AuthServiceClient::new(channel.clone());
            let token = auth.refresh_token.clone();
            async move {
                client
                    .refresh(proto::RefreshRequest { refresh_token: token })
                    .await
                    .map(|r| r.into_inner())
            }
        });
        let mut winners = Vec::new();
        for result in futures::future::join_all(calls).await {
            match result {
                Ok(next) => winners.push(next),
                Err(status) => assert_eq!(reason(&status), "REFRESH_TOKEN_INVALID"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one caller wins the rotation");
        let successor = &winners[0];
        assert!(me(&app, &successor.access_token).await.is_ok());
        // The family is alive: the successor rotates again.
        let next = refresh(&app, &successor.refresh_token).await.expect("successor is live");
        assert!(me(&app, &next.access_token).await.is_ok());
    }

    async fn replaying_a_rotated_refresh_token_kills_the_family(app: TestApp) {
        let first = register(&app, "+998901110005").await;
        let second = refresh(&app, &first.refresh_token).await.expect("rotated");
        let status = refresh(&app, &first.refresh_token).await.expect_err("reuse");
        assert_eq!(reason(&status), "REFRESH_TOKEN_INVALID");
        let status = refresh(&app, &second.refresh_token).await.expect_err("family revoked");
        assert_eq!(reason(&status), "REFRESH_TOKEN_INVALID");
        let status = me(&app, &second.access_token).await.expect_err("session ended");
        assert_eq!(reason(&status), "TOKEN_INVALID");
        let audit = app.audit_rows("auth.refresh_reuse", 1).await;
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].outcome, "REFRESH_TOKEN_INVALID");
        // Written by the background batch writer, detail included.
        assert_eq!(audit[0].detail.as_ref().map(|d| d["user_id"] == first.user.as_ref().expect("user").id), Some(true));
        let refreshes = app.audit_rows("auth.refresh", 2).await;
        let outcomes: Vec<&str> = refreshes.iter().map(|r| r.outcome.as_str()).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == "OK").count(), 1, "{outcomes:?}");
        assert!(outcomes.iter().filter(|o| **o == "REFRESH_TOKEN_INVALID").count() >= 1, "{outcomes:?}");
        // Other sessions of the user are untouched.
        let other = app.login("+998901110005", PASSWORD).await;
        assert!(me(&app, &other.access_token).await.is_ok());
    }

    async fn logout_ends_the_session_and_all_sessions_ends_every_one(app: TestApp) {
        let a = register(&app, "+998901110006").await;
        let b = app.login("+998901110006", PASSWORD).await;
        let c = app.login("+998901110006", PASSWORD).await;
        app.auth().await.logout(proto::LogoutRequest { refresh_token: a.refresh_token.clone(), all_sessions: false }).await.expect("logout");
        assert_eq!(reason(&refresh(&app, &a.refresh_token).await.expect_err("ended")), "REFRESH_TOKEN_INVALID");
        assert_eq!(reason(&me(&app, &a.access_token).await.expect_err("ended")), "TOKEN_INVALID");
        assert!(me(&app, &b.access_token).await.is_ok(), "other sessions live on");

        app.auth().await.logout(proto::LogoutRequest { refresh_token: b.refresh_token.clone(), all_sessions: true }).await.expect("logout all");
        for session in [&b, &c] {
            assert_eq!(reason(&me(&app, &session.access_token).await.expect_err("ended")), "TOKEN_INVALID");
            assert_eq!(reason(&refresh(&app, &session.refresh_token).await.expect_err("ended")), "REFRESH_TOKEN_INVALID");
        }
        let status = app.auth().await.logout(proto::LogoutRequest { refresh_token: "f".repeat(64), all_sessions: false }).await.expect_err("unknown");
        assert_eq!(reason(&status), "REFRESH_TOKEN_INVALID");
        assert_eq!(app.audit_rows("auth.logout", 1).await.len(), 1);
        assert_eq!(app.audit_rows("auth.logout_all", 1).await.len(), 1);
    }

    async fn changing_the_password_ends_every_session_and_starts_a_new_one(app: TestApp) {
        let a = register(&app, "+998901110007").await;
        let b = app.login("+998901110007", PASSWORD).await;
        let status = app
            .auth()
            .await
            .change_password(with_bearer(proto::ChangePasswordRequest { current_password: "wrong-one!".into(), new_password: "new-password-9".into() }, &a.access_token))
            .await
            .expect_err("wrong current password");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        let status = app
            .auth()
            .await
            .change_password(with_bearer(proto::ChangePasswordRequest { current_password: PASSWORD.into(), new_password: "short".into() }, &a.access_token))
            .await
            .expect_err("weak new password");
        assert_eq!(reason(&status), "VALIDATION_FAILED");

        let fresh = app
            .auth()
            .await
            .change_password(with_bearer(proto::ChangePasswordRequest { current_password: PASSWORD.into(), new_password: "new-password-9".into() }, &a.access_token))
            .await
            .expect("changed")
            .into_inner();
        for old in [&a, &b] {
            assert_eq!(reason(&me(&app, &old.access_token).await.expect_err("ended")), "TOKEN_INVALID");
            assert_eq!(reason(&refresh(&app, &old.refresh_token).await.expect_err("ended")), "REFRESH_TOKEN_INVALID");
        }
        assert!(me(&app, &fresh.access_token).await.is_ok());
        assert!(refresh(&app, &fresh.refresh_token).await.is_ok());
        let status = app.auth().await.login(proto::LoginRequest { login: "+998901110007".into(), password: PASSWORD.into() }).await.expect_err("old password");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        app.login("+998901110007", "new-password-9").await;
        assert_eq!(app.audit_rows("auth.change_password", 2).await.len(), 2);
    }

    async fn users_see_and_revoke_only_their_own_sessions(app: TestApp) {
        let mine = register(&app, "+998901110008").await;
        let second = app.login("+998901110008", PASSWORD).await;
        let theirs = register(&app, "+998901110009").await;

        let sessions = app.auth().await.list_sessions(with_bearer(proto::ListSessionsRequest {}, &mine.access_token)).await.expect("list").into_inner().sessions;
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions.iter().filter(|s| s.current).count(), 1);
        assert!(sessions.iter().all(|s| s.ip == "127.0.0.1" && s.expires_at.is_some()));

        let their_sessions = app.auth().await.list_sessions(with_bearer(proto::ListSessionsRequest {}, &theirs.access_token)).await.expect("list").into_inner().sessions;
        let status = app.auth().await.revoke_session(with_bearer(proto::RevokeSessionRequest { id: their_sessions[0].id.clone() }, &mine.access_token)).await.expect_err("not mine");
        assert_eq!(status.code(), Code::NotFound);
        assert!(me(&app, &theirs.access_token).await.is_ok());

        let other = sessions.iter().find(|s| !s.current).expect("the other session");
        app.auth().await.revoke_session(with_bearer(proto::RevokeSessionRequest { id: other.id.clone() }, &mine.access_token)).await.expect("revoked");
        assert_eq!(reason(&me(&app, &second.access_token).await.expect_err("revoked")), "TOKEN_INVALID");
        assert!(me(&app, &mine.access_token).await.is_ok());
    }

    async fn only_admins_manage_service_tokens_and_each_credential_stays_in_its_lane(app: TestApp) {
        let admin = app.admin_token().await;
        let staff = app.staff_token().await;
        let created = app
            .auth()
            .await
            .create_service_token(with_bearer(proto::CreateServiceTokenRequest { service_name: "bot7".into(), description: "seventh".into(), expires_at: None }, &admin))
            .await
            .expect("created")
            .into_inner();
        assert_eq!(created.token.len(), 64);
        let meta = created.service_token.expect("metadata");
        let res = app.http.post(app.url("/api/v1/bot7/application")).header("X-SERVICE-TOKEN", &created.token)
            .json(&serde_json::json!({"full_name": "Olim Qodirov", "phone": "+998930001122", "language": "uz"})).send().await.expect("request");
        assert_eq!(res.status(), 201);

        let listed = app.auth().await.list_service_tokens(with_bearer(proto::ListServiceTokensRequest {}, &admin)).await.expect("list").into_inner();
        assert!(listed.service_tokens.iter().any(|t| t.id == meta.id && t.service_name == "bot7"));
        assert!(!format!("{listed:?}").contains(&created.token));

        let status = app.auth().await.create_service_token(with_bearer(proto::CreateServiceTokenRequest { service_name: "Bad Name".into(), ..Default::default() }, &admin)).await.expect_err("bad name");
        assert_eq!(reason(&status), "VALIDATION_FAILED");
        let status = app.auth().await.list_service_tokens(with_bearer(proto::ListServiceTokensRequest {}, &staff)).await.expect_err("staff");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::PermissionDenied, "FORBIDDEN"));
        let status = app.auth().await.get_me(with_token(proto::GetMeRequest {}, &app.bot1_token)).await.expect_err("bot");
        assert_eq!(reason(&status), "SERVICE_NOT_ALLOWED");
        let status = app.applications().await
            .submit_application(with_bearer(proto::SubmitApplicationRequest::default(), &admin))
            .await
            .expect_err("user on a bot method");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::PermissionDenied, "FORBIDDEN"));

        app.auth().await.revoke_service_token(with_bearer(proto::RevokeServiceTokenRequest { id: meta.id.clone() }, &admin)).await.expect("revoked");
        let res = app.http.post(app.url("/api/v1/bot7/application")).header("X-SERVICE-TOKEN", &created.token).body("{}").send().await.expect("request");
        assert_eq!(res.status(), 403);
        assert_eq!(app.audit_rows("service_token.create", 2).await.len(), 2);
        assert_eq!(app.audit_rows("service_token.revoke", 1).await[0].target_id.as_deref(), Some(meta.id.as_str()));
    }

    async fn a_session_ended_on_one_replica_is_refused_by_another_within_a_minute(app: TestApp) {
        let other = app.replica().await;
        let auth = register(&app, "+998901110010").await;
        assert!(me(&other, &auth.access_token).await.is_ok());
        app.auth().await.logout(proto::LogoutRequest { refresh_token: auth.refresh_token.clone(), all_sessions: false }).await.expect("logout");
        eventually(Duration::from_secs(60), async || me(&other, &auth.access_token).await.is_err()).await;
        other.stop().await;
    }

    async fn a_login_flood_does_not_stall_other_calls(app: TestApp) {
        register(&app, "+998901110011").await;
        let channel = app.channel().await;
        let flood: Vec<_> = (0..40)
            .map(|_| {
                let channel = channel.clone();
                tokio::spawn(async move {
                    let _ = proto::auth_service_client::AuthServiceClient::new(channel)
                        .login(proto::LoginRequest { login: "+998901110011".into(), password: "wrong-password".into() })
                        .await;
                })
            })
            .collect();
        // While the hashes queue, catalog reads keep being answered.
        let mut client = app.applications().await;
        for _ in 0..20 {
            let listed = tokio::time::timeout(
                Duration::from_secs(10),
                client.list_programs(with_token(proto::ListProgramsRequest::default(), &app.bot1_token)),
            )
            .await
            .expect("not stalled behind the logins");
            assert!(listed.is_ok());
        }
        for task in flood {
            task.await.expect("login task");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_passwords_from_the_helper_sign_in() {
    let app = crate::helpers::spawn_app(crate::helpers::Backend::Sqlite)
        .await
        .expect("app");
    app.create_user(Role::Staff, "+998977770000", STAFF_PASSWORD)
        .await;
    let auth = app.login("+998977770000", STAFF_PASSWORD).await;
    assert_eq!(auth.user.expect("user").role(), proto::Role::Staff);
    app.stop().await;
}
