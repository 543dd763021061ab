//! `crm.v1.AuthService`.

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tonic::{Request, Response, Status};

use crate::{
    audit::Actor,
    auth::{
        Principal, Role, ServiceName, ServiceTokenStore, User,
        accounts::{Accounts, NewUser, SignedIn},
        sessions::Origin,
    },
    db::entities::{service_token, session},
    error::AppError,
    proto::{self, auth_service_server::AuthService},
    ratelimit::{RateLimiter, Scope, Subject},
    transport::{
        context::RequestContext,
        grpc::{non_empty, timestamp, user},
    },
};

pub struct AuthApi {
    accounts: Accounts,
    tokens: std::sync::Arc<ServiceTokenStore>,
    limiter: RateLimiter,
}

impl AuthApi {
    pub fn new(
        accounts: Accounts,
        tokens: std::sync::Arc<ServiceTokenStore>,
        limiter: RateLimiter,
    ) -> Self {
        Self {
            accounts,
            tokens,
            limiter,
        }
    }
}

/// The request context, and the signed-in user when the policy table put one there.
fn context<T>(req: &Request<T>) -> (RequestContext, Option<Principal>) {
    (
        req.extensions()
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(RequestContext::unknown),
        req.extensions().get::<Principal>().cloned(),
    )
}

fn origin<T>(req: &Request<T>, ctx: &RequestContext) -> Origin {
    let header = |name: &str| {
        req.metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Origin {
        // Browsers' gRPC-web clients name themselves in x-user-agent.
        user_agent: header("user-agent")
            .or_else(|| header("x-user-agent"))
            .unwrap_or_default(),
        ip: ctx.client_ip.to_string(),
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::AuthResponse>, Status> {
        let (ctx, principal) = context(&request);
        let origin = origin(&request, &ctx);
        let actor = Actor::from_request(principal.as_ref(), &ctx);
        let r = request.into_inner();
        let new = NewUser {
            phone: Some(r.phone),
            email: non_empty(r.email),
            password: SecretString::from(r.password),
            full_name: r.full_name,
            role: Role::Applicant,
        };
        let signed_in = self.accounts.register(new, &origin, &actor).await?;
        Ok(Response::new(signed_in.into()))
    }

    async fn login(
        &self,
        request: Request<proto::LoginRequest>,
    ) -> Result<Response<proto::AuthResponse>, Status> {
        let (ctx, _) = context(&request);
        let origin = origin(&request, &ctx);
        let actor = Actor::from_request(None, &ctx);
        let r = request.into_inner();
        // The guard counted this address; the identifier has its own quota (security.md), so
        // guessing one account's password from many addresses is throttled too.
        let identifier = Subject::Login(r.login.trim().to_lowercase());
        let verdict = self
            .limiter
            .check(Scope::LoginIdentifier, &identifier)
            .await;
        if let Some(rate_limited) = verdict.and_then(|v| v.refusal()) {
            return Err(rate_limited.into());
        }
        let signed_in = self
            .accounts
            .login(&r.login, SecretString::from(r.password), &origin, &actor)
            .await?;
        Ok(Response::new(signed_in.into()))
    }

    async fn refresh(
        &self,
        request: Request<proto::RefreshRequest>,
    ) -> Result<Response<proto::AuthResponse>, Status> {
        let (ctx, _) = context(&request);
        let actor = Actor::from_request(None, &ctx);
        let signed_in = self
            .accounts
            .refresh(&request.get_ref().refresh_token, ctx.received_at, &actor)
            .await?;
        Ok(Response::new(signed_in.into()))
    }

    async fn logout(&self, request: Request<proto::LogoutRequest>) -> Result<Response<()>, Status> {
        let (ctx, _) = context(&request);
        let actor = Actor::from_request(None, &ctx);
        let r = request.get_ref();
        self.accounts
            .logout(&r.refresh_token, r.all_sessions, &actor)
            .await?;
        Ok(Response::new(()))
    }

    async fn change_password(
        &self,
        request: Request<proto::ChangePasswordRequest>,
    ) -> Result<Response<proto::AuthResponse>, Status> {
        let (user, actor) = user(&request)?;
        let (ctx, _) = context(&request);
        let origin = origin(&request, &ctx);
        let r = request.into_inner();
        let signed_in = self
            .accounts
            .change_password(
                &user,
                SecretString::from(r.current_password),
                SecretString::from(r.new_password),
                &origin,
                &actor,
            )
            .await?;
        Ok(Response::new(signed_in.into()))
    }

    async fn get_me(
        &self,
        request: Request<proto::GetMeRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let (user, _) = user(&request)?;
        Ok(Response::new(self.accounts.me(&user).await?.into()))
    }

    async fn list_sessions(
        &self,
        request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        let (user, _) = user(&request)?;
        let sessions = self.accounts.sessions(&user).await?;
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: sessions
                .into_iter()
                .map(|s| session_proto(s, &user.session_id))
                .collect(),
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<proto::RevokeSessionRequest>,
    ) -> Result<Response<()>, Status> {
        let (user, actor) = user(&request)?;
        self.accounts
            .revoke_session(&user, &request.get_ref().id, &actor)
            .await?;
        Ok(Response::new(()))
    }

    async fn create_service_token(
        &self,
        request: Request<proto::CreateServiceTokenRequest>,
    ) -> Result<Response<proto::CreateServiceTokenResponse>, Status> {
        let (_, actor) = user(&request)?;
        let r = request.into_inner();
        let service = ServiceName::parse(&r.service_name)
            .map_err(|e| AppError::invalid_field("service_name", e))?;
        let expires_at = r
            .expires_at
            .map(|t| {
                DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                    .filter(|at| *at > Utc::now())
                    .ok_or_else(|| AppError::invalid_field("expires_at", "must be in the future"))
            })
            .transpose()?;
        if r.description.chars().count() > 500 {
            return Err(AppError::invalid_field("description", "at most 500 characters").into());
        }
        let (raw, row) = self
            .tokens
            .create(&service, r.description.trim(), expires_at, &actor)
            .await?;
        Ok(Response::new(proto::CreateServiceTokenResponse {
            token: raw.expose().to_owned(),
            service_token: Some(row.into()),
        }))
    }

    async fn list_service_tokens(
        &self,
        request: Request<proto::ListServiceTokensRequest>,
    ) -> Result<Response<proto::ListServiceTokensResponse>, Status> {
        user(&request)?;
        Ok(Response::new(proto::ListServiceTokensResponse {
            service_tokens: self
                .tokens
                .list()
                .await?
                .into_iter()
                .map(Into::into)
                .collect(),
        }))
    }

    async fn revoke_service_token(
        &self,
        request: Request<proto::RevokeServiceTokenRequest>,
    ) -> Result<Response<()>, Status> {
        let (_, actor) = user(&request)?;
        self.tokens.revoke(&request.get_ref().id, &actor).await?;
        Ok(Response::new(()))
    }
}

impl From<Role> for proto::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Applicant => Self::Applicant,
            Role::Staff => Self::Staff,
            Role::Admin => Self::Admin,
        }
    }
}

impl From<User> for proto::User {
    fn from(u: User) -> Self {
        Self {
            id: u.id,
            phone: u.phone.unwrap_or_default(),
            email: u.email,
            full_name: u.full_name,
            role: proto::Role::from(u.role).into(),
            created_at: Some(timestamp(u.created_at)),
        }
    }
}

impl From<SignedIn> for proto::AuthResponse {
    fn from(s: SignedIn) -> Self {
        Self {
            access_token: s.access_token,
            refresh_token: s.refresh_token.expose().to_owned(),
            token_type: "Bearer".to_owned(),
            expires_in: s.expires_in.as_secs() as i64,
            refresh_expires_in: s.refresh_expires_in.as_secs() as i64,
            user: Some(s.user.into()),
        }
    }
}

fn session_proto(s: session::Model, current: &str) -> proto::Session {
    proto::Session {
        current: s.id == current,
        id: s.id,
        created_at: Some(timestamp(s.created_at)),
        last_used_at: Some(timestamp(s.last_used_at)),
        expires_at: Some(timestamp(s.expires_at)),
        user_agent: s.user_agent,
        ip: s.ip,
    }
}

impl From<service_token::Model> for proto::ServiceToken {
    fn from(t: service_token::Model) -> Self {
        Self {
            id: t.id,
            service_name: t.service_name,
            description: t.description,
            created_at: Some(timestamp(t.created_at)),
            expires_at: t.expires_at.map(timestamp),
            last_used_at: t.last_used_at.map(timestamp),
            revoked_at: t.revoked_at.map(timestamp),
        }
    }
}
