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

/// Cloned for every REST request (axum's `State`): one reference count, not one per part.
#[derive(Clone)]
pub struct AppState(Arc<Parts>);

pub struct Parts {
    pub settings: Arc<Settings>,
    pub db: DatabaseConnection,
    pub limiter: RateLimiter,
    pub tokens: Arc<ServiceTokenStore>,
    pub auth: Authenticator,
    pub accounts: Accounts,
    pub applications: Applications,
    pub payments: Payments,
    pub idempotency: Arc<Idempotency>,
    shutting_down: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
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
        Self(Arc::new(Parts {
            settings,
            db,
            limiter,
            tokens: auth.tokens.clone(),
            accounts: auth.accounts.clone(),
            auth,
            applications,
            payments,
            idempotency,
            shutting_down: AtomicBool::new(false),
        }))
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}
