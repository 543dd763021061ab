//! Rate limiting: the quota table of security.md, GCRA semantics, one replica or many.
//!
//! A check names a [`Scope`] (which quota) and a subject (whose bucket: a user id, a service
//! name, a client address or a login identifier) and answers a [`Verdict`] that both allows or
//! refuses and carries the `x-ratelimit-*` values. Buckets live in memory (`governor`) or, with
//! `RATE_LIMIT_BACKEND=redis`, in Redis (one atomic script per check) so replicas share them.
//! When Redis stops answering, checks fall back to the local buckets until it answers again.

mod local;
mod redis;

use std::{
    fmt,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret;

use crate::{
    auth::{Principal, ServiceName},
    config::{RateLimitBackend, Settings},
    error::{AppError, Reason},
};

pub use self::local::LocalLimiter;

pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// How often idle local buckets are dropped, and how often a lost Redis is tried again.
pub const CLEANUP_EVERY: Duration = Duration::from_secs(60);
pub const REDIS_RETRY_EVERY: Duration = Duration::from_secs(5);

/// Which quota a request counts against. A method's own quota replaces the general one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `AuthService/Login`, per client address.
    Login,
    /// `AuthService/Login`, per login identifier (phone or email).
    LoginIdentifier,
    /// `AuthService/Register`, per client address.
    Register,
    /// All `PaymentService` methods, one bucket per principal.
    Payment,
    /// Payment-provider webhook calls that failed authentication, per address.
    UnauthenticatedWebhook,
    /// Everything else, per principal.
    General,
}

impl Scope {
    /// In declaration order: `Scope::ALL[s as usize] == s`.
    pub const ALL: [Scope; 6] = [
        Scope::Login,
        Scope::LoginIdentifier,
        Scope::Register,
        Scope::Payment,
        Scope::UnauthenticatedWebhook,
        Scope::General,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Login => "login",
            Scope::LoginIdentifier => "login_identifier",
            Scope::Register => "register",
            Scope::Payment => "payment",
            Scope::UnauthenticatedWebhook => "webhook",
            Scope::General => "general",
        }
    }

    /// The scope of a gRPC method path; `None` for the exempt ones (health).
    pub fn for_grpc_path(path: &str) -> Option<Scope> {
        match path {
            "/crm.v1.AuthService/Login" => Some(Scope::Login),
            "/crm.v1.AuthService/Register" => Some(Scope::Register),
            p if p.starts_with("/grpc.health.v1.Health/") => None,
            p if p.starts_with("/crm.v1.PaymentService/") => Some(Scope::Payment),
            _ => Some(Scope::General),
        }
    }

    /// Requests per minute in this scope.
    fn per_minute(self, general: NonZeroU32) -> NonZeroU32 {
        let fixed = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        match self {
            Scope::Login | Scope::LoginIdentifier => fixed(5),
            Scope::Register => fixed(3),
            Scope::Payment => fixed(10),
            Scope::UnauthenticatedWebhook | Scope::General => general,
        }
    }
}

/// Whose bucket: a principal, a client address, or a login identifier. The local buckets are
/// keyed by it as it is (a service's is an `Arc` clone, an address is copied: no allocation on
/// a bot's call); Redis keys use its text (`service:bot1`, `user:<id>`, `ip:<address>`,
/// `login:<identifier>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Service(ServiceName),
    User(String),
    Ip(IpAddr),
    /// A login identifier (phone or email), lowercased: `Scope::LoginIdentifier`.
    Login(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Service(name) => write!(f, "service:{name}"),
            Subject::User(id) => write!(f, "user:{id}"),
            Subject::Ip(ip) => write!(f, "ip:{ip}"),
            Subject::Login(identifier) => write!(f, "login:{identifier}"),
        }
    }
}

/// The principal when the caller proved one, else the client address.
pub fn subject(principal: Option<&Principal>, client_ip: IpAddr) -> Subject {
    match principal {
        Some(Principal::User(user)) => Subject::User(user.id.clone()),
        Some(Principal::Service(name)) => Subject::Service(name.clone()),
        None => Subject::Ip(client_ip),
    }
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// `Some` when refused: the earliest moment a request will be accepted.
    pub retry_after: Option<Duration>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.retry_after.is_none()
    }

    /// The `x-ratelimit-*` headers (and `retry-after` on a refusal), in whole seconds.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(X_RATELIMIT_LIMIT.clone(), count(self.limit.into()));
        headers.insert(
            X_RATELIMIT_REMAINING.clone(),
            crate::transport::context::never_indexed(count(self.remaining.into())),
        );
        headers.insert(X_RATELIMIT_RESET.clone(), count(ceil_secs(self.reset)));
        if let Some(wait) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, count(ceil_secs(wait)));
        }
    }

    /// The `RATE_LIMITED` refusal, when refused.
    pub fn refusal(&self) -> Option<AppError> {
        self.retry_after.map(|retry_after| AppError::RetryLater {
            reason: Reason::RateLimited,
            retry_after,
        })
    }
}

/// A check's answer: decided now, or to be asked of Redis ([`RateLimiter::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// `None` when quotas are off.
    Now(Option<Verdict>),
    AskRedis,
}

/// Counts a refusal in the metrics.
fn counted(scope: Scope, verdict: Verdict) -> Verdict {
    if !verdict.allowed() {
        crate::telemetry::metrics::rate_limited(scope);
    }
    verdict
}

/// "0" to "127", back to back: the small counts as `&'static str` slices.
const SMALL_COUNTS: &str = concat!(
    "01234567891011121314151617181920212223242526272829303132333435363738394041424344",
    "45464748495051525354555657585960616263646566676869707172737475767778798081828384",
    "85868788899091929394959697989910010110210310410510610710810911011111211311411511",
    "6117118119120121122123124125126127",
);

/// A count as a header value. Those up to 127 (every `reset` and `retry-after`, and the
/// counts of the default quotas) are static slices: no allocation, nothing shared to count.
fn count(n: u64) -> HeaderValue {
    let (start, len) = match n {
        0..=9 => (n, 1),
        10..=99 => (10 + 2 * (n - 10), 2),
        100..=127 => (190 + 3 * (n - 100), 3),
        _ => return HeaderValue::from(n),
    };
    let start = start as usize;
    HeaderValue::from_static(&SMALL_COUNTS[start..start + len])
}

/// Whole seconds, rounded up: waiting that long is always enough.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The limiter every transport consults. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    local: LocalLimiter,
    redis: Option<redis::RedisLimiter>,
    /// False while Redis is unreachable and the local buckets stand in.
    redis_up: AtomicBool,
}

impl RateLimiter {
    /// Quotas off (`RATE_LIMIT_ENABLED=false`): every check allows and no headers are sent.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub async fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        if !settings.rate_limit_enabled {
            return Ok(Self::disabled());
        }
        let general = NonZeroU32::new(settings.rate_limit_per_minute)
            .ok_or_else(|| anyhow::anyhow!("RATE_LIMIT_PER_MINUTE must be at least 1"))?;
        let quotas = |scope: Scope| scope.per_minute(general);
        let redis = match (&settings.rate_limit_backend, &settings.redis_url) {
            (RateLimitBackend::Redis, Some(url)) => {
                Some(redis::RedisLimiter::new(url.expose_secret(), quotas)?)
            }
            _ => None,
        };
        let inner = Inner {
            local: LocalLimiter::new(quotas),
            redis_up: AtomicBool::new(false),
            redis,
        };
        if let Some(redis) = &inner.redis {
            match redis.connect().await {
                Ok(()) => inner.redis_up.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "Redis unreachable at start; rate limiting locally until it answers")
                }
            }
        }
        Ok(Self {
            inner: Some(Arc::new(inner)),
        })
    }

    /// Counts one request against `scope` for `subject`. `None` when quotas are off.
    pub async fn check(&self, scope: Scope, subject: &Subject) -> Option<Verdict> {
        match self.check_now(scope, subject) {
            Checked::Now(verdict) => verdict,
            Checked::AskRedis => self.check_redis(scope, subject).await,
        }
    }

    /// Decides without waiting when it can (memory buckets, or quotas off): the request path
    /// then needs no future of its own for the check.
    pub fn check_now(&self, scope: Scope, subject: &Subject) -> Checked {
        let Some(inner) = self.inner.as_ref() else {
            return Checked::Now(None);
        };
        if inner.redis.is_some() && inner.redis_up.load(Ordering::Relaxed) {
            return Checked::AskRedis;
        }
        Checked::Now(Some(counted(scope, inner.local.check(scope, subject))))
    }

    async fn check_redis(&self, scope: Scope, subject: &Subject) -> Option<Verdict> {
        let inner = self.inner.as_ref()?;
        if let Some(redis) = &inner.redis {
            match redis.check(scope, subject).await {
                Ok(verdict) => return Some(counted(scope, verdict)),
                Err(e) => {
                    if inner.redis_up.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "Redis rate limiting failed; falling back to local buckets");
                    }
                }
            }
        }
        Some(counted(scope, inner.local.check(scope, subject)))
    }

    /// Whether checks currently go to Redis (false with the memory backend).
    pub fn using_redis(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.redis.is_some() && i.redis_up.load(Ordering::Relaxed))
    }

    /// Drops idle local buckets every minute and, while Redis is lost, tries it every 5 s.
    pub async fn run_background(self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(inner) = self.inner else { return };
        let cleanup = crate::background::every(
            CLEANUP_EVERY,
            "rate-limit cleanup",
            shutdown.clone(),
            || async {
                inner.local.cleanup();
                Ok::<_, std::convert::Infallible>(())
            },
        );
        let reconnect = async {
            let Some(redis) = &inner.redis else { return };
            crate::background::every(REDIS_RETRY_EVERY, "Redis reconnect", shutdown, || async {
                if inner.redis_up.load(Ordering::Relaxed) {
                    return Ok(());
                }
                redis.connect().await?;
                inner.redis_up.store(true, Ordering::Relaxed);
                tracing::info!("Redis answers again; rate limiting through Redis");
                Ok::<_, ::redis::RedisError>(())
            })
            .await;
        };
        tokio::join!(cleanup, reconnect);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_written_in_decimal() {
        for n in (0..=300).chain([u64::from(u32::MAX), u64::MAX]) {
            assert_eq!(count(n), n.to_string().as_str(), "{n}");
        }
    }

    #[test]
    fn grpc_paths_map_to_their_scopes() {
        assert_eq!(
            Scope::for_grpc_path("/crm.v1.AuthService/Login"),
            Some(Scope::Login)
        );
        assert_eq!(
            Scope::for_grpc_path("/crm.v1.AuthService/Register"),
            Some(Scope::Register)
        );
        assert_eq!(
            Scope::for_grpc_path("/crm.v1.AuthService/Refresh"),
            Some(Scope::General)
        );
        assert_eq!(
            Scope::for_grpc_path("/crm.v1.PaymentService/CreatePayment"),
            Some(Scope::Payment)
        );
        assert_eq!(Scope::for_grpc_path("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn headers_round_up_to_whole_seconds() {
        let verdict = Verdict {
            limit: 5,
            remaining: 0,
            reset: Duration::from_millis(60_001),
            retry_after: Some(Duration::from_millis(11_999)),
        };
        let mut headers = HeaderMap::new();
        verdict.write_headers(&mut headers);
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        assert_eq!(headers["x-ratelimit-reset"], "61");
        assert_eq!(headers["retry-after"], "12");
        assert_eq!(
            verdict.refusal().map(|e| e.reason()),
            Some(Reason::RateLimited)
        );
    }
}
