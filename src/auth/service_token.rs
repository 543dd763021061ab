//! Service tokens: the bots' credential.
//!
//! Raw tokens are 256 random bits shown once; only their SHA-256 is stored (in the database or in
//! `SERVICE_TOKEN_<NAME>_HASH`). Verification never touches the database: the whole token table
//! (it is small) is held in memory and reloaded every `RELOAD_EVERY`, which bounds how long a
//! revocation made elsewhere takes to apply. A token found in the table but revoked or expired is
//! refused and never retried against the environment hashes. `last_used_at` is recorded with one
//! atomic store per request and written to the database in the background, once a minute.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    Set, TransactionTrait,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    audit::{Actor, AuditEvent},
    config::EnvServiceToken,
    db::entities::service_token,
    error::{AppError, Reason},
    reloaded::Reloaded,
};

/// How often the in-memory token table is reloaded: the revocation delay across processes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How often `last_used_at` is written: at most once a minute per token.
pub const USAGE_FLUSH_EVERY: Duration = Duration::from_secs(60);
/// Longer header values are refused without hashing.
const MAX_RAW_TOKEN_LEN: usize = 512;

/// A service's name, `[a-z][a-z0-9_]{0,31}`: the caller's identity everywhere.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServiceName(Arc<str>);

impl ServiceName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let valid = s.len() <= 32
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(Self(Arc::from(s)))
        } else {
            Err(format!(
                "{s:?} is not a service name ([a-z][a-z0-9_]{{0,31}})"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A raw token as received or generated. Its `Debug` never shows it.
pub struct RawToken(String);

impl RawToken {
    /// 32 bytes from the OS-seeded CSPRNG, as 64 lowercase hex characters.
    pub fn generate() -> Self {
        Self(hex::encode(rand::random::<[u8; 32]>()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(sha256(&self.0))
    }
}

impl fmt::Debug for RawToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawToken([redacted])")
    }
}

pub fn sha256(raw: &str) -> [u8; 32] {
    Sha256::digest(raw.as_bytes()).into()
}

/// A database token as held in memory.
struct DbToken {
    id: String,
    service: ServiceName,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    /// Unix seconds of the last use seen by this process; shared across reloads.
    used_at: Arc<AtomicI64>,
}

pub struct ServiceTokenStore {
    db: DatabaseConnection,
    env_tokens: Vec<EnvServiceToken>,
    by_hash: Reloaded<HashMap<[u8; 32], DbToken>>,
    /// Unix seconds up to which usage has been written, per token id.
    flushed: std::sync::Mutex<HashMap<String, i64>>,
}

impl ServiceTokenStore {
    /// Loads the token table; the server does not start without it.
    pub async fn load(
        db: DatabaseConnection,
        env_tokens: Vec<EnvServiceToken>,
    ) -> Result<Self, DbErr> {
        let store = Self {
            db,
            env_tokens,
            by_hash: Reloaded::new(HashMap::new()),
            flushed: Default::default(),
        };
        store.reload().await?;
        Ok(store)
    }

    /// Replaces the in-memory table with the database's, keeping usage counters.
    pub async fn reload(&self) -> Result<(), DbErr> {
        self.by_hash
            .reload(|old| async move {
                let rows = service_token::Entity::find().all(&self.db).await?;
                let mut table = HashMap::with_capacity(rows.len());
                for row in rows {
                    let mut hash = [0u8; 32];
                    if hex::decode_to_slice(&row.token_hash, &mut hash).is_err() {
                        tracing::warn!(token_id = %row.id, "service token row with a malformed hash ignored");
                        continue;
                    }
                    let Ok(service) = ServiceName::parse(&row.service_name) else {
                        tracing::warn!(token_id = %row.id, "service token row with a malformed name ignored");
                        continue;
                    };
                    let used_at = old
                        .get(&hash)
                        .map(|t| t.used_at.clone())
                        .unwrap_or_default();
                    table.insert(
                        hash,
                        DbToken {
                            id: row.id,
                            service,
                            expires_at: row.expires_at,
                            revoked_at: row.revoked_at,
                            used_at,
                        },
                    );
                }
                Ok(table)
            })
            .await
    }

    /// Checks a raw token: database tokens first, then environment hashes; the service it
    /// belongs to. No I/O.
    pub fn verify(&self, raw: &str, now: DateTime<Utc>) -> Result<ServiceName, AppError> {
        let invalid = || AppError::refused(Reason::ServiceTokenInvalid, "invalid service token");
        if raw.is_empty() || raw.len() > MAX_RAW_TOKEN_LEN {
            return Err(invalid());
        }
        let hash = sha256(raw);
        if let Some(token) = self.by_hash.load().get(&hash) {
            // Found: its own state decides; never fall back to the environment hashes.
            let expired = token.expires_at.is_some_and(|at| at <= now);
            if token.revoked_at.is_some() || expired {
                return Err(invalid());
            }
            token.used_at.store(now.timestamp(), Ordering::Relaxed);
            return Ok(token.service.clone());
        }
        // Compare against every configured hash without stopping early.
        let mut found = None;
        for env in &self.env_tokens {
            if bool::from(env.sha256.ct_eq(&hash)) {
                found = Some(env.service.clone());
            }
        }
        found.ok_or_else(invalid)
    }

    /// Writes `last_used_at` for tokens used since the last flush.
    pub async fn flush_usage(&self) -> Result<(), DbErr> {
        let pending: Vec<(String, i64)> = {
            let table = self.by_hash.load();
            let flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
            table
                .values()
                .filter_map(|t| {
                    let used = t.used_at.load(Ordering::Relaxed);
                    let done = flushed.get(&t.id).copied().unwrap_or(0);
                    (used > done).then(|| (t.id.clone(), used))
                })
                .collect()
        };
        for (id, used) in pending {
            let Some(at) = DateTime::<Utc>::from_timestamp(used, 0) else {
                continue;
            };
            service_token::Entity::update_many()
                .col_expr(service_token::Column::LastUsedAt, at.into())
                .filter(service_token::Column::Id.eq(id.as_str()))
                .exec(&self.db)
                .await?;
            self.flushed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, used);
        }
        Ok(())
    }

    /// Creates a token; returns the raw value (shown once) and the stored row.
    pub async fn create(
        &self,
        service: &ServiceName,
        description: &str,
        expires_at: Option<DateTime<Utc>>,
        actor: &Actor,
    ) -> Result<(RawToken, service_token::Model), AppError> {
        let raw = RawToken::generate();
        let now = crate::db::now();
        let row = service_token::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            service_name: Set(service.as_str().to_owned()),
            description: Set(description.to_owned()),
            token_hash: Set(raw.sha256_hex()),
            created_at: Set(now),
            expires_at: Set(expires_at),
            last_used_at: Set(None),
            revoked_at: Set(None),
        };
        let txn = self.db.begin().await?;
        let model = row.insert(&txn).await?;
        AuditEvent::new(actor, "service_token.create", crate::audit::OK)
            .target(&model.id)
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.reload().await?;
        Ok((raw, model))
    }

    pub async fn list(&self) -> Result<Vec<service_token::Model>, AppError> {
        Ok(service_token::Entity::find()
            .order_by_asc(service_token::Column::CreatedAt)
            .order_by_asc(service_token::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Revokes a token; revoking twice keeps the first revocation time.
    pub async fn revoke(&self, id: &str, actor: &Actor) -> Result<service_token::Model, AppError> {
        // The conditional update settles concurrent revocations: the first time stays.
        let txn = self.db.begin().await?;
        service_token::Entity::update_many()
            .col_expr(service_token::Column::RevokedAt, crate::db::now().into())
            .filter(service_token::Column::Id.eq(id))
            .filter(service_token::Column::RevokedAt.is_null())
            .exec(&txn)
            .await?;
        let Some(model) = service_token::Entity::find_by_id(id).one(&txn).await? else {
            return Err(AppError::not_found("service token"));
        };
        AuditEvent::new(actor, "service_token.revoke", crate::audit::OK)
            .target(&model.id)
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.reload().await?;
        Ok(model)
    }

    /// Reloads the table and flushes usage until shutdown, then flushes once more.
    pub async fn run_background(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let reload = crate::background::every(
            RELOAD_EVERY,
            "service token reload",
            shutdown.clone(),
            || self.reload(),
        );
        let flush =
            crate::background::every(USAGE_FLUSH_EVERY, "writing last_used_at", shutdown, || {
                self.flush_usage()
            });
        tokio::join!(reload, flush);
        // What was used since the last flush is written before the process goes.
        if let Err(e) = self.flush_usage().await {
            tracing::warn!(error = %e, "writing service token last_used_at at shutdown failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_follow_the_pattern() {
        for ok in ["bot1", "b", "admissions_bot_2", &"a".repeat(32)] {
            assert!(ServiceName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1bot", "Bot1", "bot-1", "bot 1", &"a".repeat(33)] {
            assert!(ServiceName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_tokens_are_64_hex_and_never_debug_printed() {
        let raw = RawToken::generate();
        assert_eq!(raw.expose().len(), 64);
        assert!(raw.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!format!("{raw:?}").contains(raw.expose()));
        assert_ne!(raw.expose(), RawToken::generate().expose());
    }

    #[test]
    fn sha256_hex_matches_a_known_vector() {
        assert_eq!(
            RawToken("abc".into()).sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
