//! Authentication of a call from its headers: service tokens, bearer JWTs and the policy table.
//! The gRPC guard layer (`transport::grpc::guard`) and the REST legacy route use it; neither
//! touches the database to decide.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::Request;

use crate::{
    audit::{Actor, AuditEvent, AuditSink},
    auth::{
        Principal, ServiceName, ServiceTokenStore,
        accounts::Accounts,
        policy::{self, Credential},
    },
    error::{AppError, Reason},
    transport::context::RequestContext,
};

pub const SERVICE_TOKEN_HEADER: &str = "x-service-token";

/// Everything the layer needs, shared by the REST legacy route too.
#[derive(Clone)]
pub struct Authenticator {
    pub tokens: Arc<ServiceTokenStore>,
    pub accounts: Accounts,
    pub audit: AuditSink,
}

impl Authenticator {
    /// Verifies an `x-service-token` value. A refusal is not audited here: the caller audits
    /// it ([`Self::audit_token_refusal`]) once it knows the request is within its quota, so a
    /// flood over quota costs no database work. `now` decides expiry: when the request came.
    pub fn verify_service(
        &self,
        raw: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<ServiceName, AppError> {
        match raw {
            None => Err(AppError::refused(
                Reason::ServiceTokenRequired,
                "x-service-token is required",
            )),
            Some(raw) => self.tokens.verify(raw, now),
        }
    }

    /// Audits a refused service-token attempt (security.md: authentication events), a bot
    /// method called with no token at all included; other refusals are not audited.
    pub fn audit_token_refusal(&self, action: &str, refused: &AppError, ctx: &RequestContext) {
        if matches!(
            refused.reason(),
            Reason::ServiceTokenRequired | Reason::ServiceTokenInvalid
        ) {
            self.audit_refusal(action, refused.reason(), ctx);
        }
    }

    pub fn audit_refusal(&self, action: &str, reason: Reason, ctx: &RequestContext) {
        let actor = Actor::from_request(None, ctx);
        self.audit
            .record(AuditEvent::new(&actor, action, reason.as_str()));
    }

    /// Verifies `authorization: Bearer <JWT>`. No I/O.
    fn bearer(&self, value: &str) -> Result<Principal, AppError> {
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                AppError::refused(Reason::TokenInvalid, "authorization must be Bearer <token>")
            })?;
        self.accounts.authenticate(token).map(Principal::User)
    }

    /// Decides a gRPC call from its path and headers. Refusals are audited by the caller
    /// ([`Self::audit_token_refusal`]) once the call is known to be within its quota.
    pub fn decide<B>(&self, req: &Request<B>) -> Result<Option<Principal>, AppError> {
        let path = req.uri().path();
        let access = policy::access_for(path);
        let headers = req.headers();
        let credential = if let Some(value) = headers.get(SERVICE_TOKEN_HEADER) {
            let raw = value.to_str().unwrap_or_default();
            if access == policy::Access::Public {
                Credential::None
            } else {
                let now = req
                    .extensions()
                    .get::<RequestContext>()
                    .map_or_else(Utc::now, |ctx| ctx.received_at);
                Credential::Service(self.verify_service(Some(raw), now).map(Principal::Service))
            }
        } else if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            Credential::Bearer(self.bearer(value.to_str().unwrap_or_default()))
        } else {
            Credential::None
        };
        policy::authorize(access, credential)
    }
}
