//! Starts the real server on port 0 against a fresh database: a SQLite file in a temporary
//! folder, or a new PostgreSQL database on the server named by `TEST_DATABASE_URL`.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use crm_server::{
    auth::{Role, accounts::NewUser},
    config::Settings,
    db::entities::audit_log,
    proto::{
        self, application_service_client::ApplicationServiceClient,
        auth_service_client::AuthServiceClient,
    },
    startup::Application,
    state::AppState,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder,
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

pub const PAYME_MERCHANT_ID: &str = "587f72c72cac0d162c722ae2";

/// The JWT signing key of test servers, so tests can forge tokens.
pub const TEST_SECRET_KEY: &str = "test-secret-key-that-is-long-enough-0123456789";

/// The raw token of `bot2`, configured only through `SERVICE_TOKEN_BOT2_HASH`.
pub const BOT2_ENV_TOKEN: &str = "bot2-env-token-0123456789abcdef0123456789abcdef";
/// The origin allowed to call us from a browser in tests.
pub const ALLOWED_ORIGIN: &str = "https://crm.example.uz";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn sha256_hex(raw: &str) -> String {
    hex::encode(Sha256::digest(raw.as_bytes()))
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub backend: Backend,
    pub state: AppState,
    /// A database token of `bot1`, created through the same store the CLI uses.
    pub bot1_token: String,
    pub http: reqwest::Client,
    vars: HashMap<String, String>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// `None` in both for a replica: the first app owns the database.
    storage: Storage,
}

/// The database of a stopped `TestApp`: its SQLite folder or its PostgreSQL database, removed
/// when this is dropped.
pub struct Storage {
    _sqlite_dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

/// Starts a server with the standard test configuration.
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, &[]).await
}

/// Starts a server with extra environment variables on top of the standard ones. Returns
/// `None` for PostgreSQL when `TEST_DATABASE_URL` is not set.
pub async fn spawn_app_with(backend: Backend, extra: &[(&str, &str)]) -> Option<TestApp> {
    let mut vars: HashMap<String, String> = [
        ("ENVIRONMENT", "test"),
        ("LISTEN_ADDR", "127.0.0.1:0"),
        (
            "SECRET_KEY",
            "test-secret-key-that-is-long-enough-0123456789",
        ),
        ("CORS_ALLOWED_ORIGINS", ALLOWED_ORIGIN),
        ("DATABASE_POOL_SIZE", "8"),
        ("PAYME_MERCHANT_ID", PAYME_MERCHANT_ID),
        ("PAYME_SECRET_KEY", PAYME_TEST_KEY),
        ("CLICK_SERVICE_ID", "3001"),
        ("CLICK_MERCHANT_ID", "4002"),
        ("CLICK_SECRET_KEY", "click-test-secret"),
        ("UZUM_SERVICE_ID", "5003"),
        ("UZUM_LOGIN", "uzum"),
        ("UZUM_PASSWORD", "uzum-test-password"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    vars.insert("SERVICE_TOKEN_BOT2_HASH".into(), sha256_hex(BOT2_ENV_TOKEN));

    let (sqlite_dir, pg) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            vars.insert(
                "DATABASE_URL".into(),
                format!("sqlite://{}/crm.db?mode=rwc", dir.path().display()),
            );
            vars.insert("CRM_DATA_DIR".into(), dir.path().display().to_string());
            (Some(dir), None)
        }
        Backend::Postgres => {
            let pg = PgDatabase::create().await?;
            vars.insert("DATABASE_URL".into(), pg.url.clone());
            (None, Some(pg))
        }
    };
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }

    let (addr, state, stop, server) = start(&vars).await;
    let bot1_token = create_service_token(&state, "bot1").await;

    Some(TestApp {
        addr,
        backend,
        state,
        bot1_token,
        http: reqwest::Client::new(),
        vars,
        stop: Some(stop),
        server: Some(server),
        storage: Storage {
            _sqlite_dir: sqlite_dir,
            pg,
        },
    })
}

type Started = (
    SocketAddr,
    AppState,
    oneshot::Sender<()>,
    JoinHandle<anyhow::Result<()>>,
);

async fn start(vars: &HashMap<String, String>) -> Started {
    let settings = Settings::from_vars(vars).expect("test settings are valid");
    let app = Application::build(settings).await.expect("server builds");
    let addr = app.local_addr();
    let state = app.state().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (addr, state, stop, server)
}

/// A database token for `service`, made through the same store the CLI uses; the raw token.
async fn create_service_token(state: &AppState, service: &str) -> String {
    let name = crm_server::auth::ServiceName::parse(service).expect("service name");
    let (raw, _) = state
        .tokens
        .create(
            &name,
            "test bot",
            None,
            &crm_server::audit::Actor::operator(),
        )
        .await
        .expect("token created");
    raw.expose().to_owned()
}

/// Payme's Basic credentials as configured for the tests.
pub fn payme_basic() -> String {
    use base64::Engine;
    let credentials = format!("Paycom:{PAYME_TEST_KEY}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

impl TestApp {
    /// A token of a new service `service` (replicas started later see it at once).
    pub async fn service_token(&self, service: &str) -> String {
        create_service_token(&self.state, service).await
    }

    /// One Payme JSON-RPC call; every Payme answer is HTTP 200.
    pub async fn payme(&self, authorization: &str, body: serde_json::Value) -> serde_json::Value {
        let res = self
            .http
            .post(self.url("/webhooks/payme"))
            .header("authorization", authorization)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 200, "Payme reads anything but 200 as -32400");
        res.json().await.expect("json")
    }

    /// A second server process on the same database, as another replica would be.
    pub async fn replica(&self) -> TestApp {
        let (addr, state, stop, server) = start(&self.vars).await;
        TestApp {
            addr,
            backend: self.backend,
            state,
            bot1_token: self.bot1_token.clone(),
            http: reqwest::Client::new(),
            vars: self.vars.clone(),
            stop: Some(stop),
            server: Some(server),
            storage: Storage {
                _sqlite_dir: None,
                pg: None,
            },
        }
    }

    pub async fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel().await)
    }

    /// Creates a user as an operator would (`crm-server user create`).
    pub async fn create_user(&self, role: Role, phone: &str, password: &str) -> String {
        let new = NewUser {
            phone: Some(phone.to_owned()),
            email: None,
            password: SecretString::from(password.to_owned()),
            full_name: format!("{} {phone}", role.as_str()),
            role,
        };
        self.state
            .accounts
            .create_user(new, &crm_server::audit::Actor::operator())
            .await
            .expect("user created")
            .id
    }

    /// Signs in over gRPC.
    pub async fn login(&self, login: &str, password: &str) -> proto::AuthResponse {
        self.auth()
            .await
            .login(proto::LoginRequest {
                login: login.to_owned(),
                password: password.to_owned(),
            })
            .await
            .expect("signed in")
            .into_inner()
    }

    /// A staff member's access token.
    pub async fn staff_token(&self) -> String {
        let phone = format!("+99899{:07}", rand_digits());
        self.create_user(Role::Staff, &phone, STAFF_PASSWORD).await;
        self.login(&phone, STAFF_PASSWORD).await.access_token
    }

    /// An admin's access token.
    pub async fn admin_token(&self) -> String {
        let phone = format!("+99898{:07}", rand_digits());
        self.create_user(Role::Admin, &phone, STAFF_PASSWORD).await;
        self.login(&phone, STAFF_PASSWORD).await.access_token
    }

    /// An unpaid invoice of a fresh applicant: (invoice id, the applicant's access token).
    pub async fn unpaid_invoice(&self, phone: &str, amount_tiyin: i64) -> (String, String) {
        let staff = self.staff_token().await;
        let payer = self
            .create_user(Role::Applicant, phone, "applicant-pw-1")
            .await;
        let token = self.login(phone, "applicant-pw-1").await.access_token;
        let invoice =
            proto::payment_service_client::PaymentServiceClient::new(self.channel().await)
                .create_invoice(with_bearer(
                    proto::CreateInvoiceRequest {
                        payer_user_id: payer,
                        application_id: None,
                        amount_tiyin,
                        description: "fee".into(),
                    },
                    &staff,
                ))
                .await
                .expect("invoice")
                .into_inner();
        (invoice.id, token)
    }

    /// An invoice's status as its payer sees it through the API.
    pub async fn invoice_status(&self, id: &str, token: &str) -> proto::InvoiceStatus {
        proto::payment_service_client::PaymentServiceClient::new(self.channel().await)
            .get_invoice(with_bearer(
                proto::GetInvoiceRequest { id: id.into() },
                token,
            ))
            .await
            .expect("invoice")
            .into_inner()
            .status()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.state.db
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url(""))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn applications(&self) -> ApplicationServiceClient<Channel> {
        ApplicationServiceClient::new(self.channel().await)
    }

    /// Stops the server as SIGTERM would, and waits for it. Its database lives on for as long
    /// as the answer is kept, for a test that reads what the server left.
    pub async fn stop(mut self) -> Storage {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .expect("server stops within the grace period")
                .expect("server task")
                .expect("server exits cleanly");
        }
        self.storage
    }

    /// Audit rows for an action, oldest first, waiting up to 5 s for `min` of them (refusals
    /// are written in the background).
    /// Stores an unanswered idempotency claim of `request`, as a caller that died between
    /// its claim and its answer would leave it.
    pub async fn unanswered_claim(
        &self,
        (principal, method, key): (&str, &str, &str),
        request: &impl prost::Message,
        locked_at: chrono::DateTime<chrono::Utc>,
    ) {
        use sea_orm::{ActiveModelTrait, Set};
        crm_server::db::entities::idempotency_key::ActiveModel {
            principal: Set(principal.into()),
            method: Set(method.into()),
            key: Set(key.into()),
            fingerprint: Set(hex::encode(Sha256::digest(request.encode_to_vec()))),
            response: Set(None),
            locked_at: Set(locked_at),
            created_at: Set(locked_at),
        }
        .insert(self.db())
        .await
        .expect("claim");
    }

    pub async fn audit_rows(&self, action: &str, min: usize) -> Vec<audit_log::Model> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rows = audit_log::Entity::find()
                .filter(audit_log::Column::Action.eq(action))
                .order_by_asc(audit_log::Column::Id)
                .all(self.db())
                .await
                .expect("audit query");
            if rows.len() >= min || tokio::time::Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `PAYME_SECRET_KEY` of the test servers.
pub const PAYME_TEST_KEY: &str = "payme-test-key";

pub const STAFF_PASSWORD: &str = "staff-password-123";

fn rand_digits() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32 % 10_000_000
}

/// Wraps a message with a bearer access token.
pub fn with_bearer<T>(message: T, access_token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {access_token}")).expect("ascii token"),
    );
    request
}

/// Wraps a message with a service token.
pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "x-service-token",
        MetadataValue::try_from(token).expect("ascii token"),
    );
    request
}

/// The `ErrorInfo.reason` of a gRPC error.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "crm.v1");
    info.reason
}

/// A throw-away PostgreSQL database, dropped (with its connections) when the test ends.
pub struct PgDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> Option<Self> {
        let admin_url = std::env::var("TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())?;
        let name = format!("crm_test_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&admin_url)
            .await
            .expect("TEST_DATABASE_URL is reachable");
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let url = crm_server::db::with_database_name(&admin_url, &name);
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(admin) = Database::connect(&admin_url).await {
                    let _ = admin.execute_unprepared(&sql).await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

impl TestApp {
    pub fn pg(&self) -> Option<&PgDatabase> {
        self.storage.pg.as_ref()
    }
}

/// Runs each test body once on SQLite and once on PostgreSQL (when `TEST_DATABASE_URL` is set;
/// otherwise the PostgreSQL variant says so and passes).
#[macro_export]
macro_rules! both_databases {
    ($(
        async fn $name:ident($app:ident: TestApp)
        $(with { $($key:literal: $value:literal),* $(,)? })?
        $body:block
    )*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn case($app: $crate::helpers::TestApp) $body

                /// Settings on top of the standard test ones.
                const EXTRA: &[(&str, &str)] = &[$($(($key, $value)),*)?];

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let app = $crate::helpers::spawn_app_with($crate::helpers::Backend::Sqlite, EXTRA)
                        .await
                        .expect("sqlite app");
                    case(app).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    match $crate::helpers::spawn_app_with($crate::helpers::Backend::Postgres, EXTRA).await {
                        Some(app) => case(app).await,
                        None => eprintln!("TEST_DATABASE_URL is not set: PostgreSQL run skipped"),
                    }
                }
            }
        )*
    };
}

/// A `redis-server` of a test's own, on a free port, that the test may stop and restart.
pub struct RedisServer {
    port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = Self { port, child: None };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
