//! Sessions: one per sign-in, each a family of rotating refresh tokens (RFC 9700).
//!
//! Refresh tokens are opaque 256-bit values stored as SHA-256. `rotate` consumes the presented
//! token with a conditional update that only one concurrent caller can win. A token that was
//! already rotated *before the request arrived* is reuse: the whole family is revoked. Callers
//! that merely lost a race with the winner get `REFRESH_TOKEN_INVALID` without revoking it,
//! so one live successor remains.
//!
//! Access tokens carry their session id; `RevokedSessions` keeps the ids of recently revoked
//! sessions in memory, reloaded every `RELOAD_EVERY`, so a revocation reaches every replica
//! within seconds (the rule is 60) without a database round trip per request.

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::{
    auth::service_token::{RawToken, sha256},
    db::{
        self,
        entities::{refresh_token, session},
    },
    reloaded::Reloaded,
};

pub const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// How long a rotation waits before its final stamp (see `rotate`): the price of telling a
/// concurrent burst from a replay, paid only by the one caller that wins a rotation.
const RACE_WINDOW: Duration = Duration::from_millis(20);

/// Why a session ended, as stored and audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Logout,
    LogoutAll,
    PasswordChange,
    Revoked,
    RefreshReuse,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::LogoutAll => "logout_all",
            Self::PasswordChange => "password_change",
            Self::Revoked => "revoked",
            Self::RefreshReuse => "refresh_reuse",
        }
    }
}

/// Where a session was started from, for `ListSessions`.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub user_agent: String,
    pub ip: String,
}

/// Starts a session and returns it with its first refresh token.
pub async fn start<C: ConnectionTrait>(
    conn: &C,
    user_id: &str,
    origin: &Origin,
    ttl: Duration,
) -> Result<(session::Model, RawToken), DbErr> {
    let now = db::now();
    let expires_at = now + ttl;
    let session = session::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        user_id: Set(user_id.to_owned()),
        created_at: Set(now),
        last_used_at: Set(now),
        expires_at: Set(expires_at),
        revoked_at: Set(None),
        revoked_reason: Set(None),
        user_agent: Set(origin.user_agent.chars().take(256).collect()),
        ip: Set(origin.ip.chars().take(64).collect()),
    }
    .insert(conn)
    .await?;
    let raw = issue_token(conn, &session.id, now, expires_at).await?;
    Ok((session, raw))
}

async fn issue_token<C: ConnectionTrait>(
    conn: &C,
    session_id: &str,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<RawToken, DbErr> {
    let raw = RawToken::generate();
    refresh_token::Entity::insert(refresh_token::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        session_id: Set(session_id.to_owned()),
        token_hash: Set(raw.sha256_hex()),
        created_at: Set(now),
        expires_at: Set(expires_at),
        used_at: Set(None),
    })
    .exec_without_returning(conn)
    .await?;
    Ok(raw)
}

/// What happened to a presented refresh token.
pub enum Rotation {
    /// This caller won: the session and its new refresh token.
    Rotated(session::Model, RawToken),
    /// Unknown, expired, or its session has ended.
    Invalid,
    /// Consumed by a concurrent caller while this request was in flight.
    LostRace,
    /// Consumed before this request arrived: the family was revoked (its session is returned).
    Reused(session::Model),
}

/// Rotates `raw`, in one transaction on `db`. `received_at` is when the request arrived.
pub async fn rotate(
    db: &DatabaseConnection,
    raw: &str,
    received_at: DateTime<Utc>,
    ttl: Duration,
) -> Result<Rotation, DbErr> {
    use sea_orm::TransactionTrait;
    let hash = hex::encode(sha256(raw));
    let txn = db.begin().await?;
    let now = db::now();
    let claimed = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::UsedAt, now.into())
        .filter(refresh_token::Column::TokenHash.eq(hash.as_str()))
        .filter(refresh_token::Column::UsedAt.is_null())
        .filter(refresh_token::Column::ExpiresAt.gt(now))
        .exec(&txn)
        .await?
        .rows_affected
        == 1;
    if claimed {
        let token = refresh_token::Entity::find()
            .filter(refresh_token::Column::TokenHash.eq(hash.as_str()))
            .one(&txn)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("claimed refresh token".into()))?;
        let Some(session) = session::Entity::find_by_id(token.session_id.as_str())
            .one(&txn)
            .await?
            .filter(|s| s.revoked_at.is_none() && s.expires_at > now)
        else {
            txn.rollback().await?;
            return Ok(Rotation::Invalid);
        };
        let expires_at = now + ttl;
        let raw = issue_token(&txn, &session.id, now, expires_at).await?;
        let mut active: session::ActiveModel = session.into();
        active.last_used_at = Set(now);
        active.expires_at = Set(expires_at);
        let session = active.update(&txn).await?;
        // Stamp the consumption as late as possible, inside the transaction and again just
        // before the answer leaves, after a short pause: requests already sent when we won
        // (a burst from one client can take a moment to be read) raced with us and must not be
        // mistaken for a replay. A replay is sent after our answer, so it arrives later still.
        stamp_used(&txn, &token.id).await?;
        txn.commit().await?;
        tokio::time::sleep(RACE_WINDOW).await;
        if let Err(e) = stamp_used(db, &token.id).await {
            tracing::warn!(error = %e, "refresh token: final use stamp not written");
        }
        return Ok(Rotation::Rotated(session, raw));
    }
    txn.rollback().await?;

    let Some(token) = refresh_token::Entity::find()
        .filter(refresh_token::Column::TokenHash.eq(hash.as_str()))
        .one(db)
        .await?
    else {
        return Ok(Rotation::Invalid);
    };
    let Some(used_at) = token.used_at else {
        return Ok(Rotation::Invalid);
    };
    if received_at <= used_at {
        return Ok(Rotation::LostRace);
    }
    // The winner may have committed but not yet written its final stamp: look once more.
    tokio::time::sleep(RACE_WINDOW * 3).await;
    let used_at = refresh_token::Entity::find_by_id(token.id.as_str())
        .one(db)
        .await?
        .and_then(|t| t.used_at)
        .unwrap_or(used_at);
    match used_at {
        used_at if received_at <= used_at => Ok(Rotation::LostRace),
        _ => {
            end(db, &token.session_id, EndReason::RefreshReuse).await?;
            let session = session::Entity::find_by_id(token.session_id.as_str())
                .one(db)
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("session".into()))?;
            Ok(Rotation::Reused(session))
        }
    }
}

async fn stamp_used<C: ConnectionTrait>(conn: &C, token_id: &str) -> Result<(), DbErr> {
    refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::UsedAt, db::now().into())
        .filter(refresh_token::Column::Id.eq(token_id))
        .exec(conn)
        .await?;
    Ok(())
}

/// The session a refresh token belongs to, whatever its state.
pub async fn of_token<C: ConnectionTrait>(
    conn: &C,
    raw: &str,
) -> Result<Option<session::Model>, DbErr> {
    let hash = hex::encode(sha256(raw));
    let Some(token) = refresh_token::Entity::find()
        .filter(refresh_token::Column::TokenHash.eq(hash))
        .one(conn)
        .await?
    else {
        return Ok(None);
    };
    session::Entity::find_by_id(token.session_id)
        .one(conn)
        .await
}

/// Ends one session (idempotent: an ended session keeps its first reason).
pub async fn end<C: ConnectionTrait>(conn: &C, id: &str, reason: EndReason) -> Result<(), DbErr> {
    session::Entity::update_many()
        .col_expr(session::Column::RevokedAt, db::now().into())
        .col_expr(session::Column::RevokedReason, reason.as_str().into())
        .filter(session::Column::Id.eq(id))
        .filter(session::Column::RevokedAt.is_null())
        .exec(conn)
        .await?;
    Ok(())
}

/// Ends every live session of a user; returns their ids.
pub async fn end_all<C: ConnectionTrait>(
    conn: &C,
    user_id: &str,
    reason: EndReason,
) -> Result<Vec<String>, DbErr> {
    // Write first (SQLite then takes the write lock at once), then read back what we ended.
    let now = db::now();
    session::Entity::update_many()
        .col_expr(session::Column::RevokedAt, now.into())
        .col_expr(session::Column::RevokedReason, reason.as_str().into())
        .filter(session::Column::UserId.eq(user_id))
        .filter(session::Column::RevokedAt.is_null())
        .exec(conn)
        .await?;
    session::Entity::find()
        .select_only()
        .column(session::Column::Id)
        .filter(session::Column::UserId.eq(user_id))
        .filter(session::Column::RevokedAt.eq(now))
        .into_tuple()
        .all(conn)
        .await
}

/// Live sessions of a user, most recently used first.
pub async fn live<C: ConnectionTrait>(
    conn: &C,
    user_id: &str,
) -> Result<Vec<session::Model>, DbErr> {
    session::Entity::find()
        .filter(session::Column::UserId.eq(user_id))
        .filter(session::Column::RevokedAt.is_null())
        .filter(session::Column::ExpiresAt.gt(db::now()))
        .order_by_desc(session::Column::LastUsedAt)
        .all(conn)
        .await
}

/// Ids of sessions revoked recently enough that their access tokens may still be unexpired.
pub struct RevokedSessions {
    db: DatabaseConnection,
    window: Duration,
    ids: Reloaded<HashSet<String>>,
}

impl RevokedSessions {
    pub async fn load(db: DatabaseConnection, access_ttl: Duration) -> Result<Self, DbErr> {
        let cache = Self {
            db,
            // Access tokens live `access_ttl`; keep a margin for leeway and clock skew.
            window: access_ttl + Duration::from_secs(120),
            ids: Reloaded::new(HashSet::new()),
        };
        cache.reload().await?;
        Ok(cache)
    }

    pub fn contains(&self, session_id: &str) -> bool {
        self.ids.load().contains(session_id)
    }

    /// Applies a revocation made by this process at once.
    pub async fn insert(&self, ids: impl IntoIterator<Item = String>) {
        self.ids
            .update(|current| {
                let mut next = current.clone();
                next.extend(ids);
                next
            })
            .await;
    }

    pub async fn reload(&self) -> Result<(), DbErr> {
        self.ids
            .reload(|_| async {
                let since = db::now() - self.window;
                let ids: Vec<String> = session::Entity::find()
                    .select_only()
                    .column(session::Column::Id)
                    .filter(session::Column::RevokedAt.gt(since))
                    .into_tuple()
                    .all(&self.db)
                    .await?;
                Ok(ids.into_iter().collect())
            })
            .await
    }

    /// Reloads the set every `RELOAD_EVERY` until shutdown.
    pub async fn run_background(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        crate::background::every(RELOAD_EVERY, "revoked-session reload", shutdown, || {
            self.reload()
        })
        .await;
    }
}
