//! Building and running the server: database, state, background tasks, and one listener that
//! serves native gRPC, gRPC-web and REST. `Application::build` binds first, so tests can ask
//! for port 0 and read the real port back.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method};
use secrecy::{ExposeSecret, SecretString};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower::Layer;
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::{
    applications::{Applications, Catalog},
    audit::AuditSink,
    auth::{
        ServiceTokenStore, accounts::Accounts, jwt::JwtKeys, layer::Authenticator,
        password::Passwords, sessions::RevokedSessions,
    },
    config::{CorsOrigins, Settings},
    db,
    error::{AppError, Reason},
    idempotency::Idempotency,
    payments::Payments,
    proto::{
        application_service_server::ApplicationServiceServer,
        auth_service_server::AuthServiceServer, payment_service_server::PaymentServiceServer,
    },
    ratelimit::RateLimiter,
    state::AppState,
    transport::{
        context::{ContextLayer, ContextService},
        dispatch::Dispatch,
        grpc::{
            application::ApplicationApi,
            auth::AuthApi,
            guard::{Guard, GuardLayer},
            payment::PaymentApi,
        },
        limits, rest,
    },
};

/// gRPC services whose health follows the database ("" is the server as a whole); also the
/// services reflection advertises.
const HEALTH_SERVICES: &[&str] = &[
    "",
    "crm.v1.ApplicationService",
    "crm.v1.AuthService",
    "crm.v1.PaymentService",
];
/// Concurrent calls on one connection (security.md: at least 256).
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
const HEALTH_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Request headers a browser may send to the gRPC-web routes (security.md).
const CORS_ALLOW_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "idempotency-key",
    "x-request-id",
    "traceparent",
];
/// Response headers a browser must be able to read; without the grpc-* ones, browsers
/// report "missing trailer" on every error.
const CORS_EXPOSE_HEADERS: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "x-idempotency-replay",
    "x-request-id",
];

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    service: AppService,
    health: HealthReporter,
    audit_writer: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    stop_background: watch::Sender<bool>,
}

impl Application {
    /// Connects and migrates the database, loads what is cached, binds the port.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        if settings.secret_key.expose_secret().is_empty() {
            settings.secret_key = development_secret(&settings.data_dir)?;
        }
        let settings = Arc::new(settings);
        crate::telemetry::metrics::install()?;
        tracing::info!(database = %settings.database_url_redacted(), "connecting to the database");
        let db = db::connect(&settings)
            .await
            .context("cannot connect to the database")?;
        db::migrate(&db).await.context("cannot apply migrations")?;

        let (stop_background, stop_rx) = watch::channel(false);
        let (audit, audit_writer) = AuditSink::spawn(db.clone());
        let tokens = Arc::new(
            ServiceTokenStore::load(db.clone(), settings.env_service_tokens.clone()).await?,
        );
        let revoked = Arc::new(RevokedSessions::load(db.clone(), settings.access_token_ttl).await?);
        let accounts = Accounts::new(
            db.clone(),
            Arc::new(Passwords::new().await?),
            Arc::new(JwtKeys::new(
                &settings.secret_key,
                settings.access_token_ttl,
            )),
            revoked.clone(),
            audit.clone(),
            settings.refresh_token_ttl,
        );
        let catalog = Arc::new(Catalog::load(db.clone()).await?);
        let events = Arc::new(crate::applications::events::notifier(&db));
        let payment_events = Arc::new(crate::payments::service::notifier(&db));
        let url = settings.database_url.expose_secret();
        let async_commit = db::connect_async_commit(&settings, &db)
            .await
            .context("cannot open the asynchronous-commit pool")?;
        let mut listeners = Vec::new();
        listeners.extend(
            events
                .start_listener(url, db.clone(), async_commit.clone(), stop_rx.clone())
                .await
                .context("cannot listen for application events")?,
        );
        listeners.extend(
            payment_events
                .start_listener(url, db.clone(), async_commit.clone(), stop_rx.clone())
                .await
                .context("cannot listen for payment events")?,
        );
        let idempotency = Arc::new(Idempotency::new(db.clone(), async_commit));
        let payments = Payments::new(db.clone(), settings.clone(), payment_events);
        let auth = Authenticator {
            tokens: tokens.clone(),
            accounts: accounts.clone(),
            audit,
        };
        let applications = Applications::new(db.clone(), catalog.clone(), events);
        let limiter = RateLimiter::from_settings(&settings).await?;
        let state = AppState::new(
            settings.clone(),
            db.clone(),
            limiter.clone(),
            auth,
            applications.clone(),
            payments.clone(),
            idempotency.clone(),
        );

        let (health, health_service) = tonic_health::server::health_reporter();
        let service = build_service(
            &state,
            health_service,
            ApplicationApi::new(applications, idempotency.clone(), stop_rx.clone()),
            AuthApi::new(accounts, tokens.clone(), state.limiter.clone()),
            PaymentApi::new(payments, idempotency.clone(), stop_rx.clone()),
        )?;

        let mut background = vec![
            tokio::spawn(tokens.run_background(stop_rx.clone())),
            tokio::spawn(limiter.run_background(stop_rx.clone())),
            tokio::spawn(catalog.run_background(stop_rx.clone())),
            tokio::spawn(revoked.run_background(stop_rx.clone())),
            tokio::spawn(idempotency.run_purge(stop_rx.clone())),
            tokio::spawn(crate::payments::payme::run_sweep(
                state.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(crate::telemetry::metrics::run_upkeep(stop_rx.clone())),
            tokio::spawn(probe_database(state.clone(), health.clone(), stop_rx)),
        ];
        background.extend(listeners);

        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen_addr))?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            state,
            service,
            health,
            audit_writer,
            background,
            stop_background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `stop` completes, then shuts down gracefully: health turns NOT_SERVING,
    /// the listener closes, in-flight calls get `SHUTDOWN_GRACE_SECONDS` to finish, and
    /// background work (usage writes, queued audit rows) is flushed.
    pub async fn run_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let health = self.health;
        let settings = state.settings.clone();
        tracing::info!(local_addr = %self.local_addr, "serving gRPC, gRPC-web and REST");

        let incoming = crate::transport::socket::incoming(self.listener);
        let (stopping_tx, mut stopping_rx) = watch::channel(false);
        let shutdown_signal = {
            let state = state.clone();
            async move {
                stop.await;
                tracing::info!(
                    "shutting down: refusing new connections, finishing in-flight calls"
                );
                state.begin_shutdown();
                set_health(&health, ServingStatus::NotServing).await;
                let _ = stopping_tx.send(true);
            }
        };
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            // A bot or a load test multiplexing many calls on one connection is queued, not refused.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // Never reached by HTTP/2 clients (the stream limit queues them first); sheds
            // rather than queues anything beyond it.
            .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
            .load_shed(true)
            .http2_max_header_list_size(Some(limits::MAX_HEADER_BYTES as u32))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .serve_with_incoming_shutdown(self.service, incoming, shutdown_signal);
        tokio::pin!(server);

        let result = tokio::select! {
            result = &mut server => result.map_err(anyhow::Error::from),
            () = async {
                let _ = stopping_rx.wait_for(|stopping| *stopping).await;
                tokio::time::sleep(settings.shutdown_grace).await;
            } => {
                tracing::warn!(grace = ?settings.shutdown_grace, "grace period over; dropping the remaining connections");
                Ok(())
            }
        };

        let _ = self.stop_background.send(true);
        for task in self.background {
            let _ = task.await;
        }
        // The audit queue closes when its last sender goes; wait for it to drain, briefly.
        drop(state);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.audit_writer).await;
        tracing::info!("stopped");
        result
    }
}

/// The server's runtime: multi-threaded (TOKIO_WORKER_THREADS, read by tokio itself, sizes
/// it), without the LIFO slot. With the slot, a task that wakes another runs it next: each
/// handler that finishes wakes its connection's task, which then writes that one answer before
/// the next handler runs. Without it, the connection's task runs after the handlers that were
/// ready and writes their answers together (with `transport::socket`, in one write).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.enable_all().build()
}

/// The gRPC stack: CORS when configured, gRPC-web translation, the guard, tonic's routes.
type GrpcService = GrpcWebService<Guard<tonic::service::Routes>>;

/// Everything the listener serves, under the one context layer (`transport::context`).
pub type AppService = ContextService<Dispatch<tower::util::Either<Cors<GrpcService>, GrpcService>>>;

fn build_service(
    state: &AppState,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    applications: ApplicationApi,
    auth: AuthApi,
    payments: PaymentApi,
) -> anyhow::Result<AppService> {
    let settings = &state.settings;
    let max_message = settings.grpc_max_message_bytes;
    let mut routes = tonic::service::Routes::new(
        ApplicationServiceServer::new(applications)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    )
    .add_service(
        AuthServiceServer::new(auth)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    )
    .add_service(
        PaymentServiceServer::new(payments)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    )
    .add_service(health_service);
    if settings.grpc_reflection {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Advertise what is served (HEALTH_SERVICES names them), not every proto service.
            .with_service_name(HEALTH_SERVICES[1])
            .with_service_name(HEALTH_SERVICES[2])
            .with_service_name(HEALTH_SERVICES[3])
            .with_service_name("grpc.health.v1.Health")
            .build_v1()
            .context("cannot build gRPC reflection")?;
        routes = routes.add_service(reflection);
    }

    // Innermost first: the guard (auth, then quotas) sees native gRPC (gRPC-web is already
    // translated), and CORS answers preflights before anything else. Only gRPC paths get
    // these layers: tonic-web would answer plain HTTP/1.1 REST calls with 400.
    let grpc = GrpcWebLayer::new()
        .layer(GuardLayer::new(state.auth.clone(), state.limiter.clone()).layer(routes.prepare()));
    let grpc = match cors_layer(&settings.cors_allowed_origins) {
        Some(cors) => tower::util::Either::Left(cors.layer(grpc)),
        None => tower::util::Either::Right(grpc),
    };
    let rest = rest::router(state.clone()).fallback(not_found);
    Ok(ContextLayer::new(
        settings.trusted_proxies.clone(),
        settings.is_production(),
        settings.request_timeout,
    )
    .layer(Dispatch::new(grpc, rest)))
}

/// Unknown paths: a gRPC caller gets UNIMPLEMENTED, anyone else a JSON 404.
async fn not_found(req: axum::extract::Request) -> Response {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        tonic::Status::unimplemented(format!("unknown method {}", req.uri().path()))
            .into_http::<axum::body::Body>()
            .into_response()
    } else {
        AppError::refused(Reason::NotFound, "no such route").into_response()
    }
}

fn cors_layer(origins: &CorsOrigins) -> Option<CorsLayer> {
    let allow_origin = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    let names = |list: &[&'static str]| {
        list.iter()
            .map(|h| HeaderName::from_static(h))
            .collect::<Vec<_>>()
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::POST, Method::OPTIONS])
            .allow_headers(names(CORS_ALLOW_HEADERS))
            .expose_headers(names(CORS_EXPOSE_HEADERS))
            .max_age(Duration::from_secs(86_400)),
    )
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(*service, status).await;
    }
}

/// gRPC health is SERVING only while the database answers (and we are not shutting down).
async fn probe_database(state: AppState, health: HealthReporter, mut stop: watch::Receiver<bool>) {
    let mut last = None;
    let mut tick = tokio::time::interval(HEALTH_PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if state.is_shutting_down() {
            return;
        }
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await,
            Ok(Ok(()))
        );
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(up) {
            if up {
                tracing::info!("database answers; serving");
            } else {
                tracing::warn!("database does not answer; health is NOT_SERVING");
            }
            set_health(&health, status).await;
            last = Some(up);
        }
    }
}

/// In development, `SECRET_KEY` may be unset: a random one is generated once and kept in the
/// data folder (mode 0600), so tokens survive restarts.
fn development_secret(data_dir: &Path) -> anyhow::Result<SecretString> {
    let path = data_dir.join("secret_key");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if existing.len() >= 32 {
            return Ok(SecretString::from(existing.to_owned()));
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a development SECRET_KEY");
    Ok(SecretString::from(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}
