//! sea-orm entities, one per table. Domain modules convert them to their own types.

pub mod application;
pub mod audit_log;
pub mod idempotency_key;
pub mod invoice;
pub mod payment;
pub mod program;
pub mod provider_transaction;
pub mod refresh_token;
pub mod service_token;
pub mod session;
pub mod user;
