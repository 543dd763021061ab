//! One port: gRPC-web with CORS, health, reflection, limits and headers.

use std::time::Duration;

use crm_server::proto;
use prost::Message;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    both_databases,
    helpers::{ALLOWED_ORIGIN, Backend, TestApp, spawn_app_with, with_token},
};

/// One gRPC(-web) data frame: flag 0, big-endian length, message.
fn frame(message: &impl Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

/// Splits a gRPC-web response body into its data frames and its trailer block.
fn unframe(body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut data, mut trailers, mut rest) = (Vec::new(), String::new(), body);
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest[5..5 + len].to_vec();
        if rest[0] & 0x80 != 0 {
            trailers = String::from_utf8(payload).expect("trailers are text");
        } else {
            data.push(payload);
        }
        rest = &rest[5 + len..];
    }
    (data, trailers)
}

pub(crate) async fn health_status(app: &TestApp) -> ServingStatus {
    let mut client = HealthClient::new(app.channel().await);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers");
    response.into_inner().status()
}

pub(crate) async fn wait_for_health(app: &TestApp, wanted: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while health_status(app).await != wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

both_databases! {
    async fn a_grpc_web_unary_call_works_after_a_preflight_from_an_allowed_origin(app: TestApp) {
        let path = "/crm.v1.ApplicationService/ListPrograms";
        let preflight = app
            .http
            .request(reqwest::Method::OPTIONS, app.url(path))
            .header("origin", ALLOWED_ORIGIN)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type,x-grpc-web,x-user-agent,idempotency-key,traceparent")
            .send()
            .await
            .expect("preflight");
        assert!(preflight.status().is_success());
        let h = preflight.headers();
        assert_eq!(h["access-control-allow-origin"], ALLOWED_ORIGIN);
        let allowed = h["access-control-allow-headers"].to_str().expect("ascii").to_ascii_lowercase();
        for name in ["authorization", "content-type", "x-grpc-web", "idempotency-key", "traceparent"] {
            assert!(allowed.contains(name), "{name} not allowed: {allowed}");
        }

        let res = app
            .http
            .post(app.url(path))
            .header("origin", ALLOWED_ORIGIN)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("x-service-token", &app.bot1_token)
            .body(frame(&proto::ListProgramsRequest { include_inactive: false }))
            .send()
            .await
            .expect("grpc-web call");
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["access-control-allow-origin"], ALLOWED_ORIGIN);
        let exposed = res.headers()["access-control-expose-headers"].to_str().expect("ascii").to_ascii_lowercase();
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id", "retry-after", "x-ratelimit-remaining"] {
            assert!(exposed.contains(name), "{name} not exposed: {exposed}");
        }
        let body = res.bytes().await.expect("body");
        let (data, trailers) = unframe(&body);
        assert!(trailers.contains("grpc-status:0"), "{trailers}");
        let programs = proto::ListProgramsResponse::decode(data[0].as_slice()).expect("decode");
        assert_eq!(programs.programs.len(), 4);

        // An error travels as grpc-status with its details, readable by the page.
        let res = app
            .http
            .post(app.url(path))
            .header("origin", ALLOWED_ORIGIN)
            .header("content-type", "application/grpc-web+proto")
            .body(frame(&proto::ListProgramsRequest::default()))
            .send()
            .await
            .expect("grpc-web call");
        assert_eq!(res.headers()["grpc-status"], "16");
        assert!(res.headers().contains_key("grpc-status-details-bin"));
    }

    async fn a_preflight_from_another_origin_is_not_allowed(app: TestApp) {
        let res = app
            .http
            .request(reqwest::Method::OPTIONS, app.url("/crm.v1.ApplicationService/ListPrograms"))
            .header("origin", "https://evil.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web")
            .send()
            .await
            .expect("preflight");
        assert!(!res.headers().contains_key("access-control-allow-origin"));
    }

    async fn health_turns_not_serving_when_the_database_is_gone(app: TestApp) {
        wait_for_health(&app, ServingStatus::Serving).await;
        assert_eq!(app.http.get(app.url("/readyz")).send().await.expect("readyz").status(), 200);

        match app.backend {
            Backend::Sqlite => {
                // The pool is the database as far as the server can tell.
                app.db().clone().close().await.expect("close pool");
            }
            Backend::Postgres => {
                let pg = app.pg().expect("pg");
                let admin = sea_orm::Database::connect(pg.admin_url()).await.expect("admin");
                use sea_orm::ConnectionTrait;
                admin.execute_unprepared(&format!("ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS false", pg.name())).await.expect("alter");
                admin.execute_unprepared(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'", pg.name())).await.expect("terminate");
                let _ = admin.close().await;
            }
        }
        wait_for_health(&app, ServingStatus::NotServing).await;
        let res = app.http.get(app.url("/readyz")).send().await.expect("readyz");
        assert_eq!(res.status(), 503);
        let body: serde_json::Value = res.json().await.expect("json");
        assert_eq!(body["error"]["code"], "UNAVAILABLE");
        assert_eq!(app.http.get(app.url("/healthz")).send().await.expect("healthz").status(), 200);

        if app.backend == Backend::Postgres {
            // The pool recovers by itself once the database is back.
            let pg = app.pg().expect("pg");
            let admin = sea_orm::Database::connect(pg.admin_url()).await.expect("admin");
            use sea_orm::ConnectionTrait;
            admin.execute_unprepared(&format!("ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS true", pg.name())).await.expect("alter");
            let _ = admin.close().await;
            wait_for_health(&app, ServingStatus::Serving).await;
            let res = app.http.get(app.url("/readyz")).send().await.expect("readyz");
            assert_eq!(res.status(), 200);
        }
    }

    async fn responses_carry_the_security_headers_and_the_request_id(app: TestApp) {
        let res = app
            .http
            .get(app.url("/healthz"))
            .header("x-request-id", "bot-trace-42")
            .send()
            .await
            .expect("healthz");
        let h = res.headers();
        assert_eq!(h["x-request-id"], "bot-trace-42");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["x-xss-protection"], "0");
        assert_eq!(h["content-security-policy"], "default-src 'none'");
        assert!(h.contains_key("permissions-policy"));
        assert!(!h.contains_key("strict-transport-security"), "HSTS only in production");

        let generated = app.http.get(app.url("/healthz")).send().await.expect("healthz");
        uuid::Uuid::parse_str(generated.headers()["x-request-id"].to_str().expect("ascii")).expect("a fresh uuid");

        let mut client = app.applications().await;
        let mut request = with_token(proto::ListProgramsRequest::default(), &app.bot1_token);
        request.metadata_mut().insert("x-request-id", "grpc-trace-7".parse().expect("value"));
        let response = client.list_programs(request).await.expect("listed");
        assert_eq!(response.metadata().get("x-request-id").map(|v| v.to_str().expect("ascii")), Some("grpc-trace-7"));
    }

    async fn unknown_routes_and_script_queries_are_refused_cleanly(app: TestApp) {
        let res = app.http.get(app.url("/nope")).send().await.expect("request");
        assert_eq!(res.status(), 404);
        let body: serde_json::Value = res.json().await.expect("json");
        assert_eq!(body["error"]["code"], "NOT_FOUND");

        for query in ["?q=%3Cscript%3Ealert(1)%3C/script%3E", "?next=JavaScript:alert(1)", "?a=%253Cscript"] {
            let res = app.http.get(app.url(&format!("/healthz{query}"))).send().await.expect("request");
            assert_eq!(res.status(), 400, "{query}");
        }
        let res = app
            .http
            .post(app.url("/api/v1/bot1/application?x=%3Cscript"))
            .header("X-SERVICE-TOKEN", &app.bot1_token)
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 400);
    }

    async fn an_oversized_legacy_body_is_refused_and_the_server_keeps_serving(app: TestApp) {
        let huge = format!(r#"{{"full_name": "{}"}}"#, "x".repeat(1024 * 1024 + 10));
        let res = app
            .http
            .post(app.url("/api/v1/bot1/application"))
            .header("X-SERVICE-TOKEN", &app.bot1_token)
            .body(huge)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 413);
        assert_eq!(app.http.get(app.url("/healthz")).send().await.expect("healthz").status(), 200);
    }

    async fn reflection_lists_our_services(app: TestApp) {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(app.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::once(request))
            .await
            .expect("reflection")
            .into_inner();
        let response = stream.message().await.expect("message").expect("a response");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for service in [
            "crm.v1.ApplicationService",
            "crm.v1.AuthService",
            "crm.v1.PaymentService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.contains(&service.to_owned()), "{service} missing from {names:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_over_the_decode_limit_is_refused_before_the_handler() {
    let app = spawn_app_with(Backend::Sqlite, &[("GRPC_MAX_MESSAGE_BYTES", "2048")])
        .await
        .expect("app");
    let mut client = app.applications().await;
    let request = proto::SubmitApplicationRequest {
        full_name: "x".repeat(4096),
        ..Default::default()
    };
    let status = client
        .submit_application(with_token(request, &app.bot1_token))
        .await
        .expect_err("too large");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    // The connection and the server are still fine.
    let ok = client
        .list_programs(with_token(
            proto::ListProgramsRequest::default(),
            &app.bot1_token,
        ))
        .await;
    assert!(ok.is_ok());
    app.stop().await;
}
