//! `idempotency-key`: a retried call returns the first call's answer instead of acting twice.
//!
//! Keys are scoped to (principal, method, key) and claimed by an insert that a unique key
//! decides, never select-then-insert. The row holds a fingerprint of the request (SHA-256 of
//! its encoded message) and, once the first call finished, its answer: the encoded response
//! message (maps encode in key order, so a replay is byte-identical) or the business error.
//!
//! Two ways to claim:
//! - claim first ([`Idempotency::run`]), for work that reads or locks before it writes
//!   (payments): the key is claimed unanswered, the work runs, and the answer is stored with
//!   the work's change. Transient failures delete the claim so a retry runs again; a claim
//!   older than `LOCK_TIMEOUT` that never finished is taken over.
//! - claim with the change ([`Idempotency::run_unsent`]), for a change built without reading
//!   the database (a submit): the key's row, already holding the answer, goes in the same
//!   statement as the change. There is no unanswered moment: a concurrent retry waits for that
//!   statement and replays its answer. Only a key already taken falls back to the first way.
//!
//! Rows are purged after `RETENTION`.

use std::{future::Future, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use prost::Message;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryTrait,
    Set,
    sea_query::{OnConflict, UpdateStatement},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::{
    db::{self, Claimed, Uncommitted, entities::idempotency_key as row},
    error::{AppError, FieldViolation, Reason},
};

pub const HEADER: &str = "idempotency-key";
pub const REPLAY_HEADER: &str = "x-idempotency-replay";
/// A claim not finished after this long is abandoned and may be taken over.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
const PURGE_EVERY: Duration = Duration::from_secs(15 * 60);
/// How long settling a key (storing its answer or releasing it) is retried, well inside the
/// request deadline.
const SETTLE_RETRY_FOR: Duration = Duration::from_secs(15);

/// 16–255 printable ASCII characters, no spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, AppError> {
        let valid = (16..=255).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(AppError::refused(
                Reason::IdempotencyKeyInvalid,
                "idempotency-key must be 16 to 255 printable ASCII characters without spaces",
            ))
        }
    }

    /// Reads the key from request metadata; checked before any database work.
    pub fn from_metadata(metadata: &MetadataMap, required: bool) -> Result<Option<Self>, AppError> {
        match metadata.get(HEADER) {
            None if required => Err(AppError::refused(
                Reason::IdempotencyKeyRequired,
                "this method requires an idempotency-key",
            )),
            None => Ok(None),
            Some(value) => {
                let text = value.to_str().map_err(|_| {
                    AppError::refused(
                        Reason::IdempotencyKeyInvalid,
                        "idempotency-key must be ASCII",
                    )
                })?;
                Self::parse(text).map(Some)
            }
        }
    }
}

/// A finished call's answer, as stored.
#[derive(Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Stored {
    Ok {
        message: String,
    },
    Refused {
        reason: String,
        detail: String,
        fields: Vec<(String, String)>,
    },
}

impl Stored {
    fn to_json(&self) -> Result<String, AppError> {
        serde_json::to_string(self).map_err(|e| AppError::Internal(e.into()))
    }

    fn of_error(e: &AppError) -> Self {
        let fields = match e {
            AppError::Validation(v) => v
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect(),
            _ => Vec::new(),
        };
        Self::Refused {
            reason: e.reason().as_str().to_owned(),
            detail: e.public_detail(),
            fields,
        }
    }

    fn into_result<T: Message + Default>(self) -> Result<T, AppError> {
        let corrupt = || AppError::Internal(anyhow::anyhow!("stored idempotent answer is corrupt"));
        match self {
            Self::Ok { message } => {
                let bytes = STANDARD.decode(message).map_err(|_| corrupt())?;
                T::decode(bytes.as_slice()).map_err(|_| corrupt())
            }
            Self::Refused {
                reason,
                detail,
                fields,
            } => {
                let reason = Reason::parse(&reason).ok_or_else(corrupt)?;
                Err(
                    if reason == Reason::ValidationFailed && !fields.is_empty() {
                        AppError::Validation(
                            fields
                                .into_iter()
                                .map(|(f, d)| FieldViolation::new(f, d))
                                .collect(),
                        )
                    } else {
                        AppError::refused(reason, detail)
                    },
                )
            }
        }
    }
}

enum Claim {
    Fresh,
    Finished(Stored),
}

#[derive(Clone)]
pub struct Idempotency {
    db: DatabaseConnection,
    /// Where keys are claimed first: on PostgreSQL, a pool committing without waiting for the
    /// disk (`db::connect_async_commit` says why that is safe).
    claims: DatabaseConnection,
}

impl Idempotency {
    pub fn new(db: DatabaseConnection, claims: DatabaseConnection) -> Self {
        Self { db, claims }
    }

    /// Runs `work` once per (principal, method, key); without a key, simply runs it and
    /// commits its change.
    ///
    /// With a key, the claim, the work and the stored answer run in a task of their own, so a
    /// caller that goes away mid-call cannot leave the key locked (its retry would wait for the
    /// lock to go stale) or the work half-answered. A successful answer is stored with the
    /// work's change (in its transaction, or in its one statement): the two are committed
    /// together, so no crash can leave a change without the answer that stops its retry from
    /// running again.
    pub async fn run<Req, Resp, Fut>(
        &self,
        principal: &str,
        method: &str,
        key: Option<IdempotencyKey>,
        request: &Req,
        work: impl FnOnce() -> Fut + Send + 'static,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Req: Message,
        Resp: Message + Default + Send + 'static,
        Fut: Future<Output = Result<Uncommitted<Resp>, AppError>> + Send + 'static,
    {
        let Some(key) = key else {
            let answer = async { work().await?.commit().await }.await;
            return answer.map(tonic::Response::new).map_err(Into::into);
        };
        let fingerprint = fingerprint(request);
        let this = self.clone();
        let (principal, method) = (principal.to_owned(), method.to_owned());
        detached(async move {
            let scope = (principal.as_str(), method.as_str(), key.0.as_str());
            this.claim_and_run(scope, &fingerprint, work).await
        })
        .await
    }

    /// As [`Self::run`], for a change built without touching the database: `change` is its
    /// outcome, writes not yet sent or a refusal. A fresh key is claimed, the writes made and
    /// the answer stored in one statement ([`Uncommitted::commit_claiming`]): one round trip
    /// to PostgreSQL, one transaction on SQLite. Only a key already taken goes the way of
    /// [`Self::run`], which replays the stored answer, refuses a different request, or waits
    /// out (or takes over) a claim still unanswered.
    pub async fn run_unsent<Req, Resp>(
        &self,
        principal: &str,
        method: &str,
        key: Option<IdempotencyKey>,
        request: &Req,
        change: Result<Uncommitted<Resp>, AppError>,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Req: Message,
        Resp: Message + Default + Send + 'static,
    {
        match (key, change) {
            (Some(key), Ok(change)) if change.is_unsent() => {
                let fingerprint = fingerprint(request);
                let this = self.clone();
                let (principal, method) = (principal.to_owned(), method.to_owned());
                detached(async move {
                    let scope = (principal.as_str(), method.as_str(), key.0.as_str());
                    this.claim_with(scope, &fingerprint, change).await
                })
                .await
            }
            (key, change) => {
                let work = move || std::future::ready(change);
                self.run(principal, method, key, request, work).await
            }
        }
    }

    /// Claims the key with its answer and the change that answer reports, all or nothing.
    async fn claim_with<Resp>(
        &self,
        scope: (&str, &str, &str),
        fingerprint: &str,
        change: Uncommitted<Resp>,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Resp: Message + Default,
    {
        let stored = Stored::Ok {
            message: STANDARD.encode(change.value().encode_to_vec()),
        };
        let answered = new_row(scope, fingerprint, Some(stored.to_json()?), db::now());
        let claim = row::Entity::insert(answered).into_query();
        match change.commit_claiming(claim).await? {
            Claimed::Committed(value) => Ok(tonic::Response::new(value)),
            // Nothing was written. The key is taken, as a rule: by this key's first call
            // (finished, or still running on the claim-first path) or by a different request.
            // If another unique key refused the writes instead, the key is free, and the
            // claim-first path meets that refusal again and reports it.
            Claimed::Taken(change) => {
                let work = || std::future::ready(Ok(change));
                self.claim_and_run(scope, fingerprint, work).await
            }
        }
    }

    async fn claim_and_run<Resp, Fut>(
        &self,
        scope: (&str, &str, &str),
        fingerprint: &str,
        work: impl FnOnce() -> Fut,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Resp: Message + Default,
        Fut: Future<Output = Result<Uncommitted<Resp>, AppError>>,
    {
        let method = scope.1;
        match self.claim(scope, fingerprint).await? {
            Claim::Finished(stored) => {
                crate::telemetry::metrics::idempotency_replay(method);
                let mut metadata = MetadataMap::new();
                metadata.insert(REPLAY_HEADER, MetadataValue::from_static("true"));
                match stored.into_result::<Resp>() {
                    Ok(message) => {
                        let mut response = tonic::Response::new(message);
                        *response.metadata_mut() = metadata;
                        Ok(response)
                    }
                    Err(e) => {
                        let mut status = e.into_status();
                        status
                            .metadata_mut()
                            .insert(REPLAY_HEADER, MetadataValue::from_static("true"));
                        Err(status)
                    }
                }
            }
            Claim::Fresh => match work().await {
                Ok(mut change) => {
                    let stored = Stored::Ok {
                        message: STANDARD.encode(change.value().encode_to_vec()),
                    };
                    if change.is_settled() {
                        // Nothing to commit (an existing result): store the answer alone.
                        self.settle(scope, Some(&stored)).await;
                        return change
                            .commit()
                            .await
                            .map(tonic::Response::new)
                            .map_err(Into::into);
                    };
                    let answer = answer_statement(scope, &stored)?;
                    let committed = match change.add(answer).await {
                        Ok(()) => change.commit().await,
                        Err(e) => {
                            drop(change); // rolled back, before the release below
                            Err(e)
                        }
                    };
                    if committed.is_err() {
                        // The change and its answer committed together or not at all. The
                        // release removes only an unanswered key, so if a failed-looking
                        // commit did land, a retry replays its answer.
                        self.settle(scope, None).await;
                    }
                    committed.map(tonic::Response::new).map_err(Into::into)
                }
                Err(e) if e.is_final() => {
                    self.settle(scope, Some(&Stored::of_error(&e))).await;
                    Err(e.into())
                }
                Err(e) => {
                    // Transient: release the key so that a retry runs again.
                    self.settle(scope, None).await;
                    Err(e.into())
                }
            },
        }
    }

    /// Settles a claimed key: stores the final answer (`Some`) or releases the key after a
    /// transient failure (`None`). The work is over, so a short database outage is waited out
    /// rather than leaving the key locked: a stored answer must not be lost (the caller would
    /// retry and, once the lock is stale, run the work twice), and a release must not make the
    /// caller's retry wait for the lock to go stale. Past `SETTLE_RETRY_FOR` it is logged and
    /// the lock is taken over after `LOCK_TIMEOUT`.
    async fn settle(&self, scope: (&str, &str, &str), answer: Option<&Stored>) {
        let deadline = tokio::time::Instant::now() + SETTLE_RETRY_FOR;
        let mut delay = Duration::from_millis(100);
        loop {
            let result = match answer {
                Some(stored) => self.finish(scope, stored).await,
                None => self.release(scope).await.map_err(AppError::from),
            };
            match result {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(error = %e, "settling an idempotency key failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(error = %e, method = scope.1, "settling an idempotency key failed; it stays locked until taken over");
                    return;
                }
            }
        }
    }

    async fn claim(
        &self,
        (principal, method, key): (&str, &str, &str),
        fingerprint: &str,
    ) -> Result<Claim, AppError> {
        let now = db::now();
        let inserted =
            row::Entity::insert(new_row((principal, method, key), fingerprint, None, now))
                .on_conflict(
                    OnConflict::columns([
                        row::Column::Principal,
                        row::Column::Method,
                        row::Column::Key,
                    ])
                    .do_nothing()
                    .to_owned(),
                )
                .exec_without_returning(&self.claims)
                .await?;
        if inserted == 1 {
            return Ok(Claim::Fresh);
        }
        let existing =
            row::Entity::find_by_id((principal.to_owned(), method.to_owned(), key.to_owned()))
                .one(&self.db)
                .await?
                // Released between our insert and this read: the caller may simply retry.
                .ok_or_else(in_progress)?;
        if existing.fingerprint != fingerprint {
            return Err(AppError::refused(
                Reason::IdempotencyKeyReused,
                "this idempotency-key was used with a different request",
            ));
        }
        if let Some(response) = existing.response {
            let stored = serde_json::from_str(&response)
                .map_err(|e| AppError::Internal(anyhow::anyhow!("stored answer: {e}")))?;
            return Ok(Claim::Finished(stored));
        }
        if existing.locked_at + LOCK_TIMEOUT > now {
            return Err(in_progress());
        }
        // Abandoned: whoever moves the lock first takes it over.
        let taken = row::Entity::update_many()
            .col_expr(row::Column::LockedAt, now.into())
            .filter(row::Column::Principal.eq(principal))
            .filter(row::Column::Method.eq(method))
            .filter(row::Column::Key.eq(key))
            .filter(row::Column::Response.is_null())
            .filter(row::Column::LockedAt.eq(existing.locked_at))
            .exec(&self.db)
            .await?;
        if taken.rows_affected == 1 {
            Ok(Claim::Fresh)
        } else {
            Err(in_progress())
        }
    }

    /// Stores the answer of a claimed key, alone.
    async fn finish(&self, scope: (&str, &str, &str), stored: &Stored) -> Result<(), AppError> {
        self.db.execute(&answer_statement(scope, stored)?).await?;
        Ok(())
    }

    async fn release(&self, (principal, method, key): (&str, &str, &str)) -> Result<(), DbErr> {
        row::Entity::delete_many()
            .filter(row::Column::Principal.eq(principal))
            .filter(row::Column::Method.eq(method))
            .filter(row::Column::Key.eq(key))
            .filter(row::Column::Response.is_null())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Deletes keys created before `cutoff`; returns how many.
    pub async fn purge(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, DbErr> {
        Ok(row::Entity::delete_many()
            .filter(row::Column::CreatedAt.lt(cutoff))
            .exec(&self.db)
            .await?
            .rows_affected)
    }

    /// Purges keys older than `RETENTION`, every `PURGE_EVERY`, until shutdown.
    pub async fn run_purge(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        crate::background::every(PURGE_EVERY, "idempotency key purge", shutdown, || async {
            self.purge(db::now() - RETENTION).await.map(|_| ())
        })
        .await;
    }
}

/// The row of a key claimed now: unanswered (`None`) while its work runs, or already holding
/// the answer committed with it.
fn new_row(
    (principal, method, key): (&str, &str, &str),
    fingerprint: &str,
    response: Option<String>,
    now: chrono::DateTime<chrono::Utc>,
) -> row::ActiveModel {
    row::ActiveModel {
        principal: Set(principal.to_owned()),
        method: Set(method.to_owned()),
        key: Set(key.to_owned()),
        fingerprint: Set(fingerprint.to_owned()),
        response: Set(response),
        locked_at: Set(now),
        created_at: Set(now),
    }
}

/// Runs an idempotent call in a task of its own, so that a caller going away cannot cut it
/// short between its claim and its answer.
async fn detached<T: Send + 'static>(
    task: impl Future<Output = Result<T, tonic::Status>> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::spawn(tracing::Instrument::in_current_span(task))
        .await
        .unwrap_or_else(|e| {
            let cause = anyhow::anyhow!("idempotent call task failed: {e}");
            Err(AppError::Internal(cause).into())
        })
}

/// What tells a retry from a different request under the same key: the SHA-256 of the
/// encoded request.
fn fingerprint(request: &impl Message) -> String {
    hex::encode(Sha256::digest(request.encode_to_vec()))
}

fn in_progress() -> AppError {
    AppError::RetryLater {
        reason: Reason::IdempotencyKeyInProgress,
        retry_after: Duration::from_secs(1),
    }
}

/// The `UPDATE` that stores the answer of a claimed key: with the change it answers, or alone.
fn answer_statement(
    (principal, method, key): (&str, &str, &str),
    stored: &Stored,
) -> Result<UpdateStatement, AppError> {
    Ok(row::Entity::update_many()
        .col_expr(row::Column::Response, stored.to_json()?.into())
        .filter(row::Column::Principal.eq(principal))
        .filter(row::Column::Method.eq(method))
        .filter(row::Column::Key.eq(key))
        .into_query())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_16_to_255_printable_ascii_without_spaces() {
        assert!(IdempotencyKey::parse(&"k".repeat(16)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in [
            "k".repeat(15),
            "k".repeat(256),
            format!("{} x", "k".repeat(16)),
            "ключ".repeat(5),
        ] {
            assert_eq!(
                IdempotencyKey::parse(&bad).expect_err("refused").reason(),
                Reason::IdempotencyKeyInvalid
            );
        }
        let empty = MetadataMap::new();
        assert_eq!(
            IdempotencyKey::from_metadata(&empty, true)
                .expect_err("required")
                .reason(),
            Reason::IdempotencyKeyRequired
        );
        assert_eq!(
            IdempotencyKey::from_metadata(&empty, false).expect("optional"),
            None
        );
    }
}
