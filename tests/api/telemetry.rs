//! What operators see: Prometheus counters that move with the traffic, and a caller's trace
//! continuing into our server span, exported over OTLP to a receiver run by the test.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use crm_server::proto::{self, payment_service_client::PaymentServiceClient};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as OtelValue,
    trace::v1::{Span, span::SpanKind},
};
use serde_json::json;

use crate::helpers::{Backend, TestApp, sha256_hex, spawn_app_with, with_bearer, with_token};

/// The sum of a metric's samples whose labels include `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let found: HashMap<&str, &str> = rest
                .trim_end_matches('}')
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|(k, v)| found.get(k) == Some(v))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

async fn scrape(app: &TestApp) -> String {
    let res = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    res.text().await.expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_calls_succeed_fail_and_are_throttled() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.expect("app");
    // Counters are process-wide (other tests run beside this one), so compare growth.
    let before = scrape(&app).await;
    let list = "/crm.v1.ApplicationService/ListPrograms";
    let mut client = app.applications().await;
    for _ in 0..3 {
        client
            .list_programs(with_token(
                proto::ListProgramsRequest::default(),
                &app.bot1_token,
            ))
            .await
            .expect("listed");
    }
    for _ in 0..2 {
        client
            .list_programs(with_token(
                proto::ListProgramsRequest::default(),
                "wrong-token",
            ))
            .await
            .expect_err("bad token");
    }
    let (invoice, payer) = app.unpaid_invoice("+998935550030", 100_000).await;
    let mut request = with_bearer(
        proto::CreatePaymentRequest {
            invoice_id: invoice,
            provider: proto::Provider::Click.into(),
            return_url: None,
        },
        &payer,
    );
    request.metadata_mut().insert(
        "idempotency-key",
        "metrics-test-key-0001".parse().expect("ascii"),
    );
    PaymentServiceClient::new(app.channel().await)
        .create_payment(request)
        .await
        .expect("payment");

    // Two sign-ins were spent above: three more fail on the password, then the quota.
    let mut auth = app.auth().await;
    for _ in 0..6 {
        let _ = auth
            .login(proto::LoginRequest {
                login: "+998900000000".into(),
                password: "wrong-password".into(),
            })
            .await;
    }
    let wrong = format!("Basic {}", STANDARD.encode("Paycom:wrong"));
    app.http
        .post(app.url("/webhooks/payme"))
        .header("authorization", wrong)
        .json(&json!({"method": "CheckTransaction", "id": 1, "params": {"id": "x"}}))
        .send()
        .await
        .expect("payme");
    let after = scrape(&app).await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let requests = "crm_requests_total";
    assert!(grew(requests, &[("method", list), ("outcome", "OK")]) >= 3.0);
    assert!(
        grew(
            requests,
            &[("method", list), ("outcome", "SERVICE_TOKEN_INVALID")]
        ) >= 2.0
    );
    let login = "/crm.v1.AuthService/Login";
    assert!(
        grew(
            requests,
            &[("method", login), ("outcome", "INVALID_CREDENTIALS")]
        ) >= 3.0
    );
    assert!(grew(requests, &[("method", login), ("outcome", "RATE_LIMITED")]) >= 1.0);
    assert!(grew("crm_rate_limited_total", &[("scope", "login")]) >= 1.0);
    assert!(
        grew(
            "crm_webhook_calls_total",
            &[("provider", "payme"), ("result", "-32504")]
        ) >= 1.0
    );
    assert!(
        grew(
            "crm_payments_total",
            &[("provider", "CLICK"), ("status", "PENDING")]
        ) >= 1.0
    );
    assert!(grew("crm_request_duration_seconds_count", &[("method", list)]) >= 5.0);
    assert!(
        sample(
            &after,
            "crm_request_duration_seconds_bucket",
            &[("method", list), ("le", "+Inf")]
        ) >= 5.0
    );
    assert_eq!(
        sample(
            &after,
            "crm_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(
        after.contains("crm_db_pool_connections{state=\"idle\"}"),
        "{after}"
    );
    // Unknown paths do not make new series.
    app.http
        .get(app.url("/no/such/path/12345"))
        .send()
        .await
        .expect("404");
    assert!(!scrape(&app).await.contains("12345"));
    app.stop().await;
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn collect(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }

    /// Serves OTLP on `listener` in `protocol` (`grpc` or `http/protobuf`), as a collector does.
    fn serve(&self, listener: tokio::net::TcpListener, protocol: &str) {
        if protocol == "grpc" {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(self.clone()))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            return;
        }
        let receiver = self.clone();
        let export = move |body: axum::body::Bytes| async move {
            use prost::Message;
            receiver.collect(ExportTraceServiceRequest::decode(body).expect("OTLP protobuf"));
            (
                [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        };
        let app = axum::Router::new().route("/v1/traces", axum::routing::post(export));
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.collect(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            OtelValue::StringValue(s) => Some(s.clone()),
            OtelValue::IntValue(i) => Some(i.to_string()),
            OtelValue::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_continues_into_our_server_span_over_otlp_grpc() {
    trace_continues_over("grpc", None).await;
}

/// The SDK exports from a thread outside the runtime; over HTTP every export used to fail
/// there ("no reactor running"), so nothing ever arrived. Logs are quiet here (`warn`), which
/// must not turn traces off either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_continues_into_our_server_span_over_otlp_http() {
    trace_continues_over("http/protobuf", Some("warn,crm_server::startup=info")).await;
}

/// The server binary exporting to an OTLP receiver run by the test.
struct Exporting {
    receiver: Receiver,
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    channel: tonic::transport::Channel,
    _dir: tempfile::TempDir,
}

/// A test that fails midway must not leave its server running.
impl Drop for Exporting {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

const TRACE_TEST_TOKEN: &str = "otel-test-raw-token-for-bot1-00000000000000000000";

impl Exporting {
    async fn start(protocol: &str, env: &[(&str, &str)]) -> Self {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let otlp_port = listener.local_addr().expect("addr").port();
        receiver.serve(listener, protocol);

        let dir = tempfile::tempdir().expect("dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_crm-server"))
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/crm.db?mode=rwc", dir.path().display()),
            )
            .env("CRM_DATA_DIR", dir.path())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("SERVICE_TOKEN_BOT1_HASH", sha256_hex(TRACE_TEST_TOKEN))
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{otlp_port}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env("OTEL_SERVICE_NAME", "crm-server-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let (log, reader) = crate::binary::capture_stderr(&mut child);
        let port = crate::binary::wait_for_port(&log);
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        Self {
            receiver,
            child,
            log,
            reader: Some(reader),
            channel,
            _dir: dir,
        }
    }

    /// SIGTERM: the server flushes its queued spans, exits 0; returns its log.
    fn stop(mut self) -> String {
        assert!(
            Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()
                .expect("kill")
                .success()
        );
        let status = self.child.wait().expect("exit");
        assert_eq!(status.code(), Some(0));
        if let Some(reader) = self.reader.take() {
            reader.join().expect("log reader");
        }
        let log = self.log.lock().expect("log").clone();
        assert!(!log.contains(TRACE_TEST_TOKEN), "a token reached the log");
        log
    }

    /// A ListPrograms call, with `traceparent` when given.
    async fn list_programs(&self, traceparent: Option<&str>) {
        let mut request = with_token(proto::ListProgramsRequest::default(), TRACE_TEST_TOKEN);
        if let Some(traceparent) = traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().expect("ascii"));
        }
        proto::application_service_client::ApplicationServiceClient::new(self.channel.clone())
            .list_programs(request)
            .await
            .expect("listed");
    }

    /// A SubmitApplication call (logged at `info`), with `traceparent`.
    async fn submit(&self, traceparent: &str) {
        let mut request = with_token(
            proto::SubmitApplicationRequest {
                full_name: "Sampled Out".into(),
                phone: "+998901112244".into(),
                language: "en".into(),
                ..Default::default()
            },
            TRACE_TEST_TOKEN,
        );
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().expect("ascii"));
        proto::application_service_client::ApplicationServiceClient::new(self.channel.clone())
            .submit_application(request)
            .await
            .expect("submitted");
    }
}

/// Runs the server binary exporting to an OTLP receiver; with the default `RUST_LOG` (`None`)
/// also checks that the request's log lines carry its ids.
async fn trace_continues_over(protocol: &str, rust_log: Option<&str>) {
    let server = Exporting::start(protocol, &[("RUST_LOG", rust_log.unwrap_or(""))]).await;
    let (receiver, token) = (&server.receiver, TRACE_TEST_TOKEN);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = with_token(
        proto::SubmitApplicationRequest {
            full_name: "Trace Tester".into(),
            phone: "+998901112233".into(),
            language: "en".into(),
            ..Default::default()
        },
        token,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01")
            .parse()
            .expect("ascii"),
    );
    request.metadata_mut().insert(
        "x-request-id",
        "trace-test-request-1".parse().expect("ascii"),
    );
    let response =
        proto::application_service_client::ApplicationServiceClient::new(server.channel.clone())
            .submit_application(request)
            .await
            .expect("submitted");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-test-request-1")
    );

    // Our span arrives within the batch delay; SIGTERM would flush it too.
    let deadline = Instant::now() + Duration::from_secs(15);
    let span = loop {
        let found = receiver
            .spans
            .lock()
            .expect("spans")
            .iter()
            .find(|s| hex::encode(&s.trace_id) == trace_id)
            .cloned();
        if let Some(span) = found {
            break span;
        }
        assert!(
            Instant::now() < deadline,
            "no span of our trace was exported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        hex::encode(&span.parent_span_id),
        parent_id,
        "continues the caller's span"
    );
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.name, "/crm.v1.ApplicationService/SubmitApplication");
    assert_eq!(
        attribute(&span, "principal.kind").as_deref(),
        Some("service")
    );
    assert_eq!(attribute(&span, "principal.name").as_deref(), Some("bot1"));
    assert_eq!(attribute(&span, "outcome").as_deref(), Some("OK"));
    assert_eq!(
        attribute(&span, "request_id").as_deref(),
        Some("trace-test-request-1")
    );
    for span in receiver.spans.lock().expect("spans").iter() {
        for a in &span.attributes {
            assert!(
                !format!("{:?}", a.value).contains(token),
                "a token reached a span"
            );
        }
    }

    // The request's JSON log lines carry its request and trace ids.
    let log = server.stop();
    if rust_log.is_some() {
        return;
    }
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "application submitted")
        .expect("the submit was logged");
    assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
    assert_eq!(line["span"]["request_id"], "trace-test-request-1", "{line}");
}

/// The sampling decision is taken when a request arrives, before its span exists, with the
/// configured sampler: a caller's sampled flag is followed under `parentbased_*`, a root
/// request is never exported under `parentbased_always_off`, and nothing is exported twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sampled_requests_are_exported_and_their_parent_decides() {
    let server = Exporting::start(
        "grpc",
        &[
            ("RUST_LOG", ""),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
        ],
    )
    .await;
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = "5b8efff798038103d269b633813fc60c";
    server
        .list_programs(Some(&format!("00-{sampled}-b7ad6b7169203331-01")))
        .await;
    server
        .submit(&format!("00-{unsampled}-b7ad6b7169203331-00"))
        .await;
    for _ in 0..20 {
        server.list_programs(None).await;
    }
    let receiver = server.receiver.clone();
    let log = server.stop(); // flushes what is queued
    let spans = receiver.spans.lock().expect("spans").clone();
    let traces: Vec<String> = spans.iter().map(|s| hex::encode(&s.trace_id)).collect();
    assert_eq!(traces, [sampled], "exactly the sampled request's span");
    // An unsampled request still logs with its ids (its span serves the logs).
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "application submitted")
        .expect("the submit was logged");
    assert_eq!(line["span"]["trace_id"], unsampled, "{line}");
}

/// A ratio sampler samples root requests once: half of them at 0.5 (a second decision
/// further down would export a quarter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ratio_sampler_exports_its_share_of_root_requests() {
    let server = Exporting::start(
        "grpc",
        &[
            ("RUST_LOG", "warn,crm_server::startup=info"),
            ("RATE_LIMIT_ENABLED", "false"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "4096"),
        ],
    )
    .await;
    let calls = 400;
    for _ in 0..calls {
        server.list_programs(None).await;
    }
    let receiver = server.receiver.clone();
    server.stop();
    let exported = receiver.spans.lock().expect("spans").len();
    // Binomial(400, 0.5): 200 ± 10; a double decision would give 100 ± 9.
    assert!(
        (150..=250).contains(&exported),
        "{exported} of {calls} root requests exported at ratio 0.5"
    );
}
