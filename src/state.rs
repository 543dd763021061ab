//! `AppState`: everything a handler needs, built once at start and passed explicitly.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use sea_orm::DatabaseConnection;

use crate::{
    applications::Applications,
    auth::{ServiceTokenStore, accounts::Accounts, layer::Authenticator},
    config::Settings,
    idempotency::Idempotency,
    payments::Payments,
    ratelimit::RateLimiter,
};

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: DatabaseConnection,
    pub limiter: RateLimiter,
    pub tokens: Arc<ServiceTokenStore>,
    pub auth: Authenticator,
    pub accounts: Accounts,
    pub applications: Applications,
    pub payments: Payments,
    pub idempotency: Arc<Idempotency>,
    shutting_down: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(
        settings: Arc<Settings>,
        db: DatabaseConnection,
        limiter: RateLimiter,
        auth: Authenticator,
        applications: Applications,
        payments: Payments,
        idempotency: Arc<Idempotency>,
    ) -> Self {
        Self {
            settings,
            db,
            limiter,
            tokens: auth.tokens.clone(),
            accounts: auth.accounts.clone(),
            auth,
            applications,
            payments,
            idempotency,
            shutting_down: Arc::default(),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}
