//! Use-cases of people signing in: register, log in, refresh, log out, change password, and
//! their sessions. Every authentication event is audited.

use std::{sync::Arc, time::Duration};

use sea_orm::{ActiveModelTrait, DatabaseConnection, Set, TransactionTrait};
use secrecy::SecretString;

use crate::{
    audit::{self, Actor, AuditEvent, AuditSink},
    auth::{
        Role, User, UserPrincipal,
        jwt::JwtKeys,
        password::Passwords,
        sessions::{self, EndReason, Origin, RevokedSessions, Rotation},
        user,
    },
    db::{
        self,
        entities::{session, user as user_entity},
    },
    error::{AppError, Reason},
    validate::{
        Violations, collapse_spaces, normalize_phone, validate_email, validate_full_name,
        validate_password, validate_phone,
    },
};

/// What a successful sign-in returns.
#[derive(Debug)]
pub struct SignedIn {
    pub access_token: String,
    pub refresh_token: crate::auth::service_token::RawToken,
    pub expires_in: Duration,
    pub refresh_expires_in: Duration,
    pub user: User,
}

pub struct NewUser {
    pub phone: Option<String>,
    pub email: Option<String>,
    pub password: SecretString,
    pub full_name: String,
    pub role: Role,
}

#[derive(Clone)]
pub struct Accounts {
    db: DatabaseConnection,
    passwords: Arc<Passwords>,
    jwt: Arc<JwtKeys>,
    revoked: Arc<RevokedSessions>,
    audit: AuditSink,
    refresh_ttl: Duration,
}

fn invalid_credentials() -> AppError {
    AppError::refused(Reason::InvalidCredentials, "wrong login or password")
}

fn refresh_invalid() -> AppError {
    AppError::refused(Reason::RefreshTokenInvalid, "invalid refresh token")
}

impl Accounts {
    pub fn new(
        db: DatabaseConnection,
        passwords: Arc<Passwords>,
        jwt: Arc<JwtKeys>,
        revoked: Arc<RevokedSessions>,
        audit: AuditSink,
        refresh_ttl: Duration,
    ) -> Self {
        Self {
            db,
            passwords,
            jwt,
            revoked,
            audit,
            refresh_ttl,
        }
    }

    /// Verifies an access token and that its session is still live. No I/O.
    pub fn authenticate(&self, access_token: &str) -> Result<UserPrincipal, AppError> {
        let principal = self.jwt.verify(access_token)?;
        if self.revoked.contains(&principal.session_id) {
            return Err(AppError::refused(
                Reason::TokenInvalid,
                "the session has ended",
            ));
        }
        Ok(principal)
    }

    /// Creates a user of any role (an operator's or an admin's act), audited.
    pub async fn create_user(&self, new: NewUser, actor: &Actor) -> Result<User, AppError> {
        create_user(&self.db, &self.passwords, new, actor).await
    }

    pub async fn register(
        &self,
        new: NewUser,
        origin: &Origin,
        actor: &Actor,
    ) -> Result<SignedIn, AppError> {
        if new.phone.as_deref().is_none_or(str::is_empty) {
            return Err(AppError::invalid_field("phone", "is required"));
        }
        let row = prepare_user(new, &self.passwords).await?;
        let txn = self.db.begin().await?;
        let user = insert_user(&txn, &self.db, row).await?;
        self.open_session(txn, user, origin, actor, "auth.register")
            .await
    }

    pub async fn login(
        &self,
        login: &str,
        password: SecretString,
        origin: &Origin,
        actor: &Actor,
    ) -> Result<SignedIn, AppError> {
        let login = login.trim();
        let found = if login.is_empty() {
            None
        } else {
            user::find_by_login(&self.db, login).await?
        };
        // Always one Argon2 verification, so an unknown login costs what a wrong password does.
        let ok = self
            .passwords
            .verify(&password, found.as_ref().map(|u| u.password_hash.clone()))
            .await?;
        let Some(row) = found.filter(|_| ok) else {
            self.audit.record(AuditEvent::new(
                actor,
                "auth.login",
                Reason::InvalidCredentials.as_str(),
            ));
            return Err(invalid_credentials());
        };
        let txn = self.db.begin().await?;
        self.open_session(txn, User::try_from(row)?, origin, actor, "auth.login")
            .await
    }

    /// Starts a session for `user` in `txn`, audits `action` as the user, and commits.
    async fn open_session(
        &self,
        txn: sea_orm::DatabaseTransaction,
        user: User,
        origin: &Origin,
        actor: &Actor,
        action: &str,
    ) -> Result<SignedIn, AppError> {
        let (session, raw) = sessions::start(&txn, &user.id, origin, self.refresh_ttl).await?;
        AuditEvent::new(&as_user(actor, &user.id), action, audit::OK)
            .target(&session.id)
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.signed_in(user, &session, raw)
    }

    pub async fn refresh(
        &self,
        raw: &str,
        received_at: chrono::DateTime<chrono::Utc>,
        actor: &Actor,
    ) -> Result<SignedIn, AppError> {
        if raw.is_empty() || raw.len() > 512 {
            return Err(refresh_invalid());
        }
        match sessions::rotate(&self.db, raw, received_at, self.refresh_ttl).await? {
            Rotation::Rotated(session, raw) => {
                let row = user::find(&self.db, &session.user_id)
                    .await?
                    .ok_or_else(refresh_invalid)?;
                self.audit.record(
                    AuditEvent::new(&as_user(actor, &session.user_id), "auth.refresh", audit::OK)
                        .target(&session.id),
                );
                self.signed_in(User::try_from(row)?, &session, raw)
            }
            Rotation::Reused(session) => {
                self.revoked.insert([session.id.clone()]).await;
                tracing::warn!(session = %session.id, user = %session.user_id, "refresh token reuse: session revoked");
                self.audit.record(
                    AuditEvent::new(
                        actor,
                        "auth.refresh_reuse",
                        Reason::RefreshTokenInvalid.as_str(),
                    )
                    .target(&session.id)
                    .detail(serde_json::json!({"user_id": session.user_id})),
                );
                Err(refresh_invalid())
            }
            Rotation::Invalid | Rotation::LostRace => {
                self.audit.record(AuditEvent::new(
                    actor,
                    "auth.refresh",
                    Reason::RefreshTokenInvalid.as_str(),
                ));
                Err(refresh_invalid())
            }
        }
    }

    pub async fn logout(
        &self,
        raw: &str,
        all_sessions: bool,
        actor: &Actor,
    ) -> Result<(), AppError> {
        let Some(session) = sessions::of_token(&self.db, raw).await? else {
            return Err(refresh_invalid());
        };
        let actor = as_user(actor, &session.user_id);
        let txn = self.db.begin().await?;
        let ended = if all_sessions {
            sessions::end_all(&txn, &session.user_id, EndReason::LogoutAll).await?
        } else {
            sessions::end(&txn, &session.id, EndReason::Logout).await?;
            vec![session.id.clone()]
        };
        let action = if all_sessions {
            "auth.logout_all"
        } else {
            "auth.logout"
        };
        AuditEvent::new(&actor, action, audit::OK)
            .target(&session.id)
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.revoked.insert(ended).await;
        Ok(())
    }

    pub async fn change_password(
        &self,
        principal: &UserPrincipal,
        current: SecretString,
        new: SecretString,
        origin: &Origin,
        actor: &Actor,
    ) -> Result<SignedIn, AppError> {
        use secrecy::ExposeSecret;
        let row = user::find(&self.db, &principal.id)
            .await?
            .ok_or_else(|| AppError::refused(Reason::TokenInvalid, "the user no longer exists"))?;
        if !self
            .passwords
            .verify(&current, Some(row.password_hash.clone()))
            .await?
        {
            self.audit.record(
                AuditEvent::new(
                    actor,
                    "auth.change_password",
                    Reason::InvalidCredentials.as_str(),
                )
                .target(&row.id),
            );
            return Err(invalid_credentials());
        }
        validate_password(new.expose_secret())
            .map_err(|e| AppError::invalid_field("new_password", e))?;
        let hash = self.passwords.hash(&new).await?;

        let txn = self.db.begin().await?;
        let mut active: user_entity::ActiveModel = row.clone().into();
        active.password_hash = Set(hash);
        active.updated_at = Set(db::now());
        active.update(&txn).await?;
        let ended = sessions::end_all(&txn, &row.id, EndReason::PasswordChange).await?;
        let (session, raw) = sessions::start(&txn, &row.id, origin, self.refresh_ttl).await?;
        AuditEvent::new(actor, "auth.change_password", audit::OK)
            .target(&row.id)
            .detail(serde_json::json!({"sessions_ended": ended.len()}))
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.revoked.insert(ended).await;
        self.signed_in(User::try_from(row)?, &session, raw)
    }

    pub async fn me(&self, principal: &UserPrincipal) -> Result<User, AppError> {
        let row = user::find(&self.db, &principal.id)
            .await?
            .ok_or_else(|| AppError::refused(Reason::TokenInvalid, "the user no longer exists"))?;
        Ok(User::try_from(row)?)
    }

    pub async fn sessions(
        &self,
        principal: &UserPrincipal,
    ) -> Result<Vec<session::Model>, AppError> {
        Ok(sessions::live(&self.db, &principal.id).await?)
    }

    /// Ends one of the caller's own sessions; another user's is `NOT_FOUND`.
    pub async fn revoke_session(
        &self,
        principal: &UserPrincipal,
        id: &str,
        actor: &Actor,
    ) -> Result<(), AppError> {
        use sea_orm::EntityTrait;
        let owned = session::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .filter(|s| s.user_id == principal.id)
            .ok_or_else(|| AppError::not_found("session"))?;
        let txn = self.db.begin().await?;
        sessions::end(&txn, &owned.id, EndReason::Revoked).await?;
        AuditEvent::new(actor, "auth.revoke_session", audit::OK)
            .target(&owned.id)
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.revoked.insert([owned.id]).await;
        Ok(())
    }

    fn signed_in(
        &self,
        user: User,
        session: &session::Model,
        refresh_token: crate::auth::service_token::RawToken,
    ) -> Result<SignedIn, AppError> {
        Ok(SignedIn {
            access_token: self.jwt.issue(&user.id, user.role, &session.id)?,
            refresh_token,
            expires_in: self.jwt.access_ttl,
            refresh_expires_in: self.refresh_ttl,
            user,
        })
    }
}

/// Creates a user without a running server (`crm-server user create`).
pub async fn create_user(
    db: &DatabaseConnection,
    passwords: &Passwords,
    new: NewUser,
    actor: &Actor,
) -> Result<User, AppError> {
    let row = prepare_user(new, passwords).await?;
    let txn = db.begin().await?;
    let user = insert_user(&txn, db, row).await?;
    AuditEvent::new(actor, "auth.user_create", audit::OK)
        .target(&user.id)
        .detail(serde_json::json!({"role": user.role.as_str()}))
        .write(&txn)
        .await?;
    txn.commit().await?;
    Ok(user)
}

/// The actor of a request that has just identified its user (register, login, logout).
fn as_user(actor: &Actor, user_id: &str) -> Actor {
    Actor {
        kind: "user",
        id: user_id.to_owned(),
        ..actor.clone()
    }
}

/// Validates a new user and hashes the password, before any transaction is open (a hash
/// may wait for its turn; no connection should wait with it).
async fn prepare_user(
    new: NewUser,
    passwords: &Passwords,
) -> Result<user_entity::ActiveModel, AppError> {
    use secrecy::ExposeSecret;
    let mut violations = Violations::default();
    let phone = new
        .phone
        .as_deref()
        .map(normalize_phone)
        .filter(|p| !p.is_empty());
    if let Some(phone) = &phone {
        violations.check("phone", validate_phone(phone));
    }
    let email = new
        .email
        .as_deref()
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty());
    if let Some(email) = &email {
        violations.check("email", validate_email(email));
    }
    if phone.is_none() && email.is_none() {
        violations.check("phone", Err("a phone or an email is required".into()));
    }
    let full_name = collapse_spaces(&new.full_name);
    violations.check("full_name", validate_full_name(&full_name));
    violations.check("password", validate_password(new.password.expose_secret()));
    violations.into_result()?;

    let password_hash = passwords.hash(&new.password).await?;
    let now = db::now();
    Ok(user_entity::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        phone: Set(phone),
        email: Set(email),
        full_name: Set(full_name),
        role: Set(new.role.as_str().to_owned()),
        password_hash: Set(password_hash),
        created_at: Set(now),
        updated_at: Set(now),
    })
}

/// Inserts a prepared user; a phone or email already taken is `ALREADY_EXISTS`. `db`
/// answers which one was taken: after a unique violation, PostgreSQL accepts no more
/// statements in `conn`'s transaction.
async fn insert_user<C: sea_orm::ConnectionTrait>(
    conn: &C,
    db: &DatabaseConnection,
    row: user_entity::ActiveModel,
) -> Result<User, AppError> {
    let phone = row.phone.try_as_ref().cloned().flatten();
    match row.insert(conn).await {
        Ok(model) => Ok(User::try_from(model)?),
        Err(e) if db::is_unique_violation(&e) => {
            // Which one was taken decides the message; the constraint settled the race.
            let phone_taken = match &phone {
                Some(p) => user::find_by_login(db, p).await?.is_some(),
                None => false,
            };
            let what = if phone_taken { "phone" } else { "email" };
            Err(AppError::refused(
                Reason::AlreadyExists,
                format!("a user with this {what} already exists"),
            ))
        }
        Err(e) => Err(e.into()),
    }
}
