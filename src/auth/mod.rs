//! Who is calling: credentials (bots' service tokens, people's JWT access tokens), the
//! principal they prove, the one table of who may call which method, and the use-cases of
//! signing in (accounts, sessions, passwords).

pub mod accounts;
pub mod jwt;
pub mod layer;
pub mod password;
pub mod policy;
pub mod service_token;
pub mod sessions;
pub mod user;

pub use service_token::{ServiceName, ServiceTokenStore};
pub use user::{Role, User};

/// A signed-in person, as proved by a valid access token of a live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPrincipal {
    pub id: String,
    pub role: Role,
    pub session_id: String,
}

impl UserPrincipal {
    pub fn is_staff(&self) -> bool {
        matches!(self.role, Role::Staff | Role::Admin)
    }
}

/// The authenticated caller of a request, put into the request's extensions by the auth layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A bot, identified by its service token.
    Service(ServiceName),
    /// A person, identified by a JWT access token.
    User(UserPrincipal),
}

impl Principal {
    /// `(actor_kind, actor_id)` for the audit log and rate-limit keys.
    pub fn actor(&self) -> (&'static str, &str) {
        match self {
            Self::Service(name) => ("service", name.as_str()),
            Self::User(user) => ("user", &user.id),
        }
    }
}
