//! One typed `Settings`, loaded once from the environment (and `.env`), validated at start.
//!
//! Variable names follow api.md and the existing deployment's `.env` files. Loading is a pure
//! function of a variable map, so tests build settings without touching the process environment.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};

use crate::auth::ServiceName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Test,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitBackend {
    Memory,
    Redis,
}

/// Origins allowed to call us from a browser (gRPC-web).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No cross-origin browser calls (same-origin only).
    None,
    /// `*`: development only.
    Any,
    List(Vec<String>),
}

/// A service token configured by its hash, `SERVICE_TOKEN_<NAME>_HASH`.
#[derive(Clone)]
pub struct EnvServiceToken {
    pub service: ServiceName,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for EnvServiceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvServiceToken")
            .field("service", &self.service)
            .field("sha256", &"[redacted]")
            .finish()
    }
}

/// Payme Merchant API. Off while `merchant_id` or `secret_key` is unset.
#[derive(Debug, Clone)]
pub struct PaymeSettings {
    pub merchant_id: Option<String>,
    pub secret_key: Option<SecretString>,
    pub login: String,
    pub account_field: String,
    pub checkout_url: String,
    pub allowed_ips: Vec<IpNet>,
    pub allow_refund: bool,
    /// The `Authorization` value Payme must send (`Basic base64(login:key)`), made once here
    /// rather than on every call; `None` while the provider is off.
    pub expected_authorization: Option<SecretString>,
}

/// Click SHOP API. Off while `service_id`, `merchant_id` or `secret_key` is unset.
#[derive(Debug, Clone)]
pub struct ClickSettings {
    pub service_id: Option<String>,
    pub merchant_id: Option<String>,
    pub secret_key: Option<SecretString>,
    pub merchant_user_id: Option<String>,
    pub checkout_url: String,
}

/// Uzum Bank Merchant API. Off while `service_id`, `login` or `password` is unset.
#[derive(Debug, Clone)]
pub struct UzumSettings {
    pub service_id: Option<String>,
    pub login: Option<String>,
    pub password: Option<SecretString>,
    pub secret_key: Option<SecretString>,
    pub allow_refund: bool,
    pub checkout_url: String,
    /// The `Authorization` value Uzum must send (`Basic base64(login:password)`), made once
    /// here; `None` while the provider is off.
    pub expected_authorization: Option<SecretString>,
}

/// `Basic base64(user:password)`, the value an HTTP Basic caller sends.
fn basic_authorization(user: &str, password: &SecretString) -> SecretString {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let credentials = format!("{user}:{}", password.expose_secret());
    SecretString::from(format!("Basic {}", STANDARD.encode(credentials)))
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub environment: Environment,
    pub listen_addr: SocketAddr,
    /// May carry a password: never logged as is (see `database_url_redacted`).
    pub database_url: SecretString,
    pub database_pool_size: u32,
    /// Folder for the development SQLite file and the generated development secret.
    pub data_dir: PathBuf,
    pub secret_key: SecretString,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub env_service_tokens: Vec<EnvServiceToken>,
    pub rate_limit_enabled: bool,
    pub rate_limit_per_minute: u32,
    pub rate_limit_backend: RateLimitBackend,
    pub redis_url: Option<SecretString>,
    pub trusted_proxies: Vec<IpNet>,
    pub cors_allowed_origins: CorsOrigins,
    pub grpc_reflection: bool,
    pub grpc_max_message_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub payme: PaymeSettings,
    pub click: ClickSettings,
    pub uzum: UzumSettings,
}

/// A configuration problem, reported as one line before the process exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn bad(var: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid {var}: {why}"))
}

/// Every variable `Settings` reads (api.md's configuration table), so deployment files can be
/// checked against it. Reading a name missing here fails the configuration tests.
pub const VARIABLES: &[&str] = &[
    "ENVIRONMENT",
    "LISTEN_ADDR",
    "CRM_DATA_DIR",
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "SECRET_KEY",
    "ACCESS_TOKEN_EXPIRE_MINUTES",
    "REFRESH_TOKEN_EXPIRE_DAYS",
    "RATE_LIMIT_ENABLED",
    "RATE_LIMIT_PER_MINUTE",
    "RATE_LIMIT_BACKEND",
    "REDIS_URL",
    "TRUSTED_PROXIES",
    "CORS_ALLOWED_ORIGINS",
    "GRPC_REFLECTION",
    "GRPC_MAX_MESSAGE_BYTES",
    "REQUEST_TIMEOUT_SECONDS",
    "SHUTDOWN_GRACE_SECONDS",
    "LOG_FORMAT",
    "PAYME_MERCHANT_ID",
    "PAYME_LOGIN",
    "PAYME_SECRET_KEY",
    "PAYME_ACCOUNT_FIELD",
    "PAYME_CHECKOUT_URL",
    "PAYME_ALLOWED_IPS",
    "PAYME_ALLOW_REFUND",
    "CLICK_SERVICE_ID",
    "CLICK_MERCHANT_ID",
    "CLICK_MERCHANT_USER_ID",
    "CLICK_SECRET_KEY",
    "CLICK_CHECKOUT_URL",
    "UZUM_SERVICE_ID",
    "UZUM_LOGIN",
    "UZUM_PASSWORD",
    "UZUM_SECRET_KEY",
    "UZUM_CHECKOUT_URL",
    "UZUM_ALLOW_REFUND",
];

/// Whether the server (or a library it runs: tokio, tracing, OpenTelemetry) reads `name`.
pub fn is_known_variable(name: &str) -> bool {
    VARIABLES.contains(&name)
        || matches!(name, "RUST_LOG" | "TOKIO_WORKER_THREADS")
        || name.starts_with("OTEL_")
        || name
            .strip_prefix("SERVICE_TOKEN_")
            .and_then(|rest| rest.strip_suffix("_HASH"))
            .is_some_and(|service| !service.is_empty())
}

/// Reads variables from a snapshot map, treating empty values as unset (as `.env` files do).
struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        debug_assert!(
            VARIABLES.contains(&name),
            "{name} is missing from VARIABLES"
        );
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn parse<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|e| bad(name, e)),
        }
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(other) => Err(bad(name, format!("expected true or false, got {other:?}"))),
        }
    }
}

impl Settings {
    /// Loads `.env` (if present in the working directory) under the real environment, which wins.
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_vars(&vars)
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let v = Vars(vars);
        let environment = match v.get("ENVIRONMENT").map(str::to_ascii_lowercase).as_deref() {
            None | Some("development" | "dev" | "local") => Environment::Development,
            Some("test" | "testing") => Environment::Test,
            Some("production" | "prod") => Environment::Production,
            Some(other) => {
                return Err(bad(
                    "ENVIRONMENT",
                    format!("expected development, test or production, got {other:?}"),
                ));
            }
        };
        let production = environment == Environment::Production;
        let data_dir = PathBuf::from(v.get("CRM_DATA_DIR").unwrap_or("data"));

        let database_url = match (v.get("DATABASE_URL"), v.get("POSTGRES_HOST")) {
            (Some(url), _) => url.to_owned(),
            (None, Some(host)) => postgres_url_from_parts(&v, host),
            (None, None) => format!("sqlite://{}/crm.db?mode=rwc", data_dir.display()),
        };
        if !(database_url.starts_with("sqlite:") || database_url.starts_with("postgres")) {
            return Err(bad(
                "DATABASE_URL",
                "expected a sqlite:// or postgres:// URL",
            ));
        }

        let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        let database_pool_size = v.parse("DATABASE_POOL_SIZE", 2 * cores)?;
        if database_pool_size == 0 {
            return Err(bad("DATABASE_POOL_SIZE", "must be at least 1"));
        }

        let secret_key = match v.get("SECRET_KEY") {
            Some(key) if production && key.len() < 32 => {
                return Err(bad("SECRET_KEY", "must be at least 32 bytes in production"));
            }
            Some(key) => SecretString::from(key.to_owned()),
            None if production => {
                return Err(ConfigError(
                    "SECRET_KEY is required in production (at least 32 bytes)".into(),
                ));
            }
            // Generated and kept in the data folder (see `startup::development_secret`).
            None => SecretString::from(String::new()),
        };

        let access_minutes: u64 = v.parse("ACCESS_TOKEN_EXPIRE_MINUTES", 30)?;
        let refresh_days: u64 = v.parse("REFRESH_TOKEN_EXPIRE_DAYS", 7)?;
        if access_minutes == 0 || refresh_days == 0 {
            return Err(ConfigError("token lifetimes must be positive".into()));
        }

        let rate_limit_backend = match v
            .get("RATE_LIMIT_BACKEND")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("memory") => RateLimitBackend::Memory,
            Some("redis") => RateLimitBackend::Redis,
            Some(other) => {
                return Err(bad(
                    "RATE_LIMIT_BACKEND",
                    format!("expected memory or redis, got {other:?}"),
                ));
            }
        };
        let redis_url = v.get("REDIS_URL").map(|u| SecretString::from(u.to_owned()));
        if rate_limit_backend == RateLimitBackend::Redis && redis_url.is_none() {
            return Err(ConfigError(
                "RATE_LIMIT_BACKEND=redis needs REDIS_URL".into(),
            ));
        }
        let rate_limit_per_minute = v.parse("RATE_LIMIT_PER_MINUTE", 60u32)?;
        if rate_limit_per_minute == 0 {
            return Err(bad("RATE_LIMIT_PER_MINUTE", "must be at least 1"));
        }

        let trusted_proxies = match v.get("TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(parse_cidr)
                .collect::<Result<_, _>>()
                .map_err(|e| bad("TRUSTED_PROXIES", e))?,
        };

        let cors_allowed_origins = match v.get("CORS_ALLOWED_ORIGINS") {
            None => CorsOrigins::None,
            Some("*") if production => {
                return Err(ConfigError(
                    "CORS_ALLOWED_ORIGINS=* is refused in production: list the origins".into(),
                ));
            }
            Some("*") => CorsOrigins::Any,
            Some(list) => CorsOrigins::List(
                list.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .map(|o| validate_origin(&o).map(|()| o))
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad("CORS_ALLOWED_ORIGINS", e))?,
            ),
        };

        let grpc_max_message_bytes = v.parse("GRPC_MAX_MESSAGE_BYTES", 4 * 1024 * 1024usize)?;
        if grpc_max_message_bytes < 1024 {
            return Err(bad("GRPC_MAX_MESSAGE_BYTES", "must be at least 1024"));
        }
        let request_timeout = Duration::from_secs(v.parse("REQUEST_TIMEOUT_SECONDS", 30u64)?);
        let shutdown_grace = Duration::from_secs(v.parse("SHUTDOWN_GRACE_SECONDS", 10u64)?);
        if request_timeout.is_zero() {
            return Err(bad("REQUEST_TIMEOUT_SECONDS", "must be at least 1"));
        }

        let log_format = match v.get("LOG_FORMAT").map(str::to_ascii_lowercase).as_deref() {
            None | Some("pretty" | "text") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(bad(
                    "LOG_FORMAT",
                    format!("expected pretty or json, got {other:?}"),
                ));
            }
        };

        let secret = |name: &str| v.get(name).map(|x| SecretString::from(x.to_owned()));
        let owned = |name: &str| v.get(name).map(str::to_owned);
        let payme_login = v.get("PAYME_LOGIN").unwrap_or("Paycom").to_owned();
        let payme_key = secret("PAYME_SECRET_KEY");
        let payme = PaymeSettings {
            merchant_id: owned("PAYME_MERCHANT_ID"),
            expected_authorization: match (&payme_key, v.get("PAYME_MERCHANT_ID")) {
                (Some(key), Some(_)) => Some(basic_authorization(&payme_login, key)),
                _ => None,
            },
            secret_key: payme_key,
            login: payme_login,
            account_field: v
                .get("PAYME_ACCOUNT_FIELD")
                .unwrap_or("order_id")
                .to_owned(),
            checkout_url: v
                .get("PAYME_CHECKOUT_URL")
                .unwrap_or("https://checkout.paycom.uz")
                .trim_end_matches('/')
                .to_owned(),
            allowed_ips: match v.get("PAYME_ALLOWED_IPS") {
                None => Vec::new(),
                Some(list) => list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(parse_cidr)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad("PAYME_ALLOWED_IPS", e))?,
            },
            allow_refund: v.flag("PAYME_ALLOW_REFUND", true)?,
        };
        if production && payme.checkout_url.contains("test.paycom.uz") {
            return Err(ConfigError(
                "PAYME_CHECKOUT_URL points at the Payme sandbox, refused in production".into(),
            ));
        }
        let click = ClickSettings {
            service_id: owned("CLICK_SERVICE_ID"),
            merchant_id: owned("CLICK_MERCHANT_ID"),
            secret_key: secret("CLICK_SECRET_KEY"),
            merchant_user_id: owned("CLICK_MERCHANT_USER_ID"),
            checkout_url: v
                .get("CLICK_CHECKOUT_URL")
                .unwrap_or("https://my.click.uz/services/pay")
                .to_owned(),
        };
        let (uzum_login, uzum_password) = (owned("UZUM_LOGIN"), secret("UZUM_PASSWORD"));
        let uzum = UzumSettings {
            service_id: owned("UZUM_SERVICE_ID"),
            expected_authorization: match (&uzum_login, &uzum_password, v.get("UZUM_SERVICE_ID")) {
                (Some(login), Some(password), Some(_)) => {
                    Some(basic_authorization(login, password))
                }
                _ => None,
            },
            login: uzum_login,
            password: uzum_password,
            secret_key: secret("UZUM_SECRET_KEY"),
            allow_refund: v.flag("UZUM_ALLOW_REFUND", true)?,
            checkout_url: v
                .get("UZUM_CHECKOUT_URL")
                .unwrap_or("https://www.uzumbank.uz/open-service")
                .to_owned(),
        };
        for (name, url) in [
            ("PAYME_CHECKOUT_URL", &payme.checkout_url),
            ("CLICK_CHECKOUT_URL", &click.checkout_url),
            ("UZUM_CHECKOUT_URL", &uzum.checkout_url),
        ] {
            if !url.starts_with("https://") && !url.starts_with("http://") {
                return Err(bad(name, "expected an http(s) URL"));
            }
        }

        Ok(Self {
            payme,
            click,
            uzum,
            environment,
            listen_addr: v.parse("LISTEN_ADDR", SocketAddr::from(([127, 0, 0, 1], 50051)))?,
            database_url: SecretString::from(database_url),
            database_pool_size,
            data_dir,
            secret_key,
            access_token_ttl: Duration::from_secs(access_minutes * 60),
            refresh_token_ttl: Duration::from_secs(refresh_days * 86_400),
            env_service_tokens: env_service_tokens(vars)?,
            rate_limit_enabled: v.flag("RATE_LIMIT_ENABLED", true)?,
            rate_limit_per_minute,
            rate_limit_backend,
            redis_url,
            trusted_proxies,
            cors_allowed_origins,
            grpc_reflection: v.flag("GRPC_REFLECTION", !production)?,
            grpc_max_message_bytes,
            request_timeout,
            shutdown_grace,
            log_format,
        })
    }

    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }

    /// The database URL with any password replaced, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url_password(self.database_url.expose_secret())
    }
}

/// `SERVICE_TOKEN_<NAME>_HASH=<sha256 hex>`; `<NAME>` lower-cased is the service name.
fn env_service_tokens(vars: &HashMap<String, String>) -> Result<Vec<EnvServiceToken>, ConfigError> {
    let mut tokens: Vec<EnvServiceToken> = vars
        .iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix("SERVICE_TOKEN_")?.strip_suffix("_HASH")?;
            Some((key, name, value.trim()))
        })
        .filter(|(_, _, value)| !value.is_empty())
        .map(|(key, name, value)| {
            let service =
                ServiceName::parse(&name.to_ascii_lowercase()).map_err(|e| bad(key, e))?;
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(value, &mut sha256)
                .map_err(|_| bad(key, "expected the 64-character SHA-256 hex of the token"))?;
            Ok(EnvServiceToken { service, sha256 })
        })
        .collect::<Result<_, ConfigError>>()?;
    tokens.sort_by(|a, b| a.service.as_str().cmp(b.service.as_str()));
    Ok(tokens)
}

fn postgres_url_from_parts(v: &Vars<'_>, host: &str) -> String {
    let user = v.get("POSTGRES_USER").unwrap_or("postgres");
    let db = v.get("POSTGRES_DB").unwrap_or(user);
    let port = v.get("POSTGRES_PORT").unwrap_or("5432");
    let auth = match v.get("POSTGRES_PASSWORD") {
        Some(pw) => format!("{}:{}", percent_encode(user), percent_encode(pw)),
        None => percent_encode(user),
    };
    format!("postgres://{auth}@{host}:{port}/{}", percent_encode(db))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((auth, host)) => {
            let user = auth.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// A CIDR, or a bare address meaning a single host.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR or an IP address"))
}

fn validate_origin(origin: &str) -> Result<(), String> {
    let ok = (origin.starts_with("https://") || origin.starts_with("http://"))
        && http::HeaderValue::from_str(origin).is_ok()
        && !origin.contains('*');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{origin:?} is not an origin like https://crm.example.uz"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_serve_locally_on_sqlite() {
        let s = Settings::from_vars(&vars(&[])).expect("defaults are valid");
        assert_eq!(s.listen_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(
            s.database_url.expose_secret(),
            "sqlite://data/crm.db?mode=rwc"
        );
        assert_eq!(s.rate_limit_per_minute, 60);
        assert!(s.grpc_reflection);
        assert_eq!(s.grpc_max_message_bytes, 4_194_304);
    }

    #[test]
    fn postgres_parts_build_the_url_with_escaped_password() {
        let s = Settings::from_vars(&vars(&[
            ("POSTGRES_HOST", "db"),
            ("POSTGRES_USER", "crm"),
            ("POSTGRES_PASSWORD", "p@ss:w/rd"),
            ("POSTGRES_DB", "crm_prod"),
        ]))
        .expect("valid");
        assert_eq!(
            s.database_url.expose_secret(),
            "postgres://crm:p%40ss%3Aw%2Frd@db:5432/crm_prod"
        );
        assert_eq!(
            s.database_url_redacted(),
            "postgres://crm:***@db:5432/crm_prod"
        );
    }

    #[test]
    fn service_token_hashes_are_read_by_name() {
        let hash = "a".repeat(64);
        let s = Settings::from_vars(&vars(&[
            ("SERVICE_TOKEN_BOT1_HASH", &hash),
            ("SERVICE_TOKEN_BOT2_HASH", &hash),
        ]))
        .expect("valid");
        let names: Vec<_> = s
            .env_service_tokens
            .iter()
            .map(|t| t.service.as_str())
            .collect();
        assert_eq!(names, ["bot1", "bot2"]);
        let err = Settings::from_vars(&vars(&[("SERVICE_TOKEN_BOT1_HASH", "nothex")])).unwrap_err();
        assert!(err.to_string().contains("SERVICE_TOKEN_BOT1_HASH"));
    }

    #[test]
    fn production_refuses_unsafe_settings() {
        let strong = "k".repeat(40);
        let cases: &[&[(&str, &str)]] = &[
            &[("ENVIRONMENT", "production")],
            &[("ENVIRONMENT", "production"), ("SECRET_KEY", "short")],
            &[
                ("ENVIRONMENT", "production"),
                ("SECRET_KEY", &strong),
                ("CORS_ALLOWED_ORIGINS", "*"),
            ],
        ];
        for case in cases {
            assert!(
                Settings::from_vars(&vars(case)).is_err(),
                "{case:?} must be refused"
            );
        }
        let ok = Settings::from_vars(&vars(&[
            ("ENVIRONMENT", "production"),
            ("SECRET_KEY", &strong),
        ]))
        .expect("safe production settings");
        assert!(
            !ok.grpc_reflection,
            "reflection is off by default in production"
        );
    }

    #[test]
    fn malformed_values_name_the_variable() {
        for (var, value) in [
            ("LISTEN_ADDR", "nope"),
            ("TRUSTED_PROXIES", "10.0.0.0/99"),
            ("CORS_ALLOWED_ORIGINS", "crm.example.uz"),
            ("RATE_LIMIT_ENABLED", "maybe"),
        ] {
            let err = Settings::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
