//! gRPC services: convert proto <-> domain, call the domain, nothing else.

pub mod application;
pub mod auth;
pub mod guard;
pub mod payment;

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::{
    audit::Actor,
    auth::{Principal, UserPrincipal},
    error::AppError,
    transport::context::RequestContext,
};

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The principal the auth layer attached, and the request context.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<(Principal, RequestContext), AppError> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(no_principal)?;
    let ctx = req
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .ok_or_else(|| AppError::Internal(anyhow::anyhow!("no request context")))?;
    Ok((principal, ctx))
}

/// That the auth layer attached a principal, for a method that needs nothing else of it.
pub fn authenticated<T>(req: &tonic::Request<T>) -> Result<(), AppError> {
    match req.extensions().get::<Principal>() {
        Some(_) => Ok(()),
        None => Err(no_principal()),
    }
}

/// The policy table guarantees a principal on non-public methods; reaching here means a method
/// was wired without its entry.
fn no_principal() -> AppError {
    AppError::Internal(anyhow::anyhow!("no principal on an authenticated method"))
}

/// The signed-in user of a user-only method, and the audit actor.
pub fn user<T>(req: &tonic::Request<T>) -> Result<(UserPrincipal, Actor), AppError> {
    let (principal, ctx) = caller(req)?;
    let actor = Actor::from_request(Some(&principal), &ctx);
    match principal {
        Principal::User(user) => Ok((user, actor)),
        Principal::Service(_) => Err(AppError::Internal(anyhow::anyhow!(
            "a service reached a user method"
        ))),
    }
}

/// An optional string field with blanks meaning "not given".
pub fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}
