//! The program catalog, held in memory so that `ListPrograms` and the submit check cost no
//! database round trip. Reloaded every `RELOAD_EVERY` (changes made by another replica show up
//! within that) and at once after a change made here. The etag is a hash of the content, so it
//! changes exactly when the catalog does, on every replica alike.

use std::{sync::Arc, time::Duration};

use sea_orm::{DatabaseConnection, DbErr, EntityTrait, QueryOrder};
use sha2::{Digest, Sha256};

use crate::{
    audit::{self, Actor, AuditEvent},
    db::entities::program,
    error::AppError,
    reloaded::Reloaded,
    validate::Violations,
};

pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Program {
    pub code: String,
    pub title_uz: String,
    pub title_ru: String,
    pub title_en: String,
    pub degree: Option<String>,
    pub duration_years: i32,
    pub tuition_fee_tiyin: i64,
    pub application_fee_tiyin: i64,
    pub active: bool,
    pub sort_order: i32,
}

impl Program {
    /// The rules of `UpsertProgram`, every failed field reported.
    pub fn validate(&self) -> Result<(), AppError> {
        let mut v = Violations::default();
        let code_ok = (2..=32).contains(&self.code.len())
            && self
                .code
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
        v.check(
            "program.code",
            code_ok
                .then_some(())
                .ok_or_else(|| "must match [A-Z0-9-]{2,32}".to_owned()),
        );
        for (field, title) in [
            ("program.title_uz", &self.title_uz),
            ("program.title_ru", &self.title_ru),
            ("program.title_en", &self.title_en),
        ] {
            let chars = title.trim().chars().count();
            v.check(
                field,
                (1..=300)
                    .contains(&chars)
                    .then_some(())
                    .ok_or_else(|| "must be 1 to 300 characters".to_owned()),
            );
        }
        if let Some(degree) = &self.degree {
            v.check(
                "program.degree",
                ["bachelor", "master", "phd"]
                    .contains(&degree.as_str())
                    .then_some(())
                    .ok_or_else(|| "must be bachelor, master or phd".to_owned()),
            );
        }
        v.check(
            "program.duration_years",
            (1..=10)
                .contains(&self.duration_years)
                .then_some(())
                .ok_or_else(|| "must be 1 to 10".to_owned()),
        );
        for (field, fee) in [
            ("program.tuition_fee_tiyin", self.tuition_fee_tiyin),
            ("program.application_fee_tiyin", self.application_fee_tiyin),
        ] {
            v.check(
                field,
                (fee >= 0)
                    .then_some(())
                    .ok_or_else(|| "must not be negative".to_owned()),
            );
        }
        v.into_result()
    }
}

impl From<program::Model> for Program {
    fn from(m: program::Model) -> Self {
        Self {
            code: m.code,
            title_uz: m.title_uz,
            title_ru: m.title_ru,
            title_en: m.title_en,
            degree: m.degree,
            duration_years: m.duration_years,
            tuition_fee_tiyin: m.tuition_fee_tiyin,
            application_fee_tiyin: m.application_fee_tiyin,
            active: m.active,
            sort_order: m.sort_order,
        }
    }
}

/// One consistent view of the catalog.
#[derive(Debug, Default)]
pub struct CatalogSnapshot {
    all: Arc<[Program]>,
    active: Arc<[Program]>,
    etag_all: String,
    etag_active: String,
}

impl CatalogSnapshot {
    /// Builds a snapshot from programs in display order (sort_order, then code).
    pub fn new(all: Vec<Program>) -> Self {
        let active: Vec<Program> = all.iter().filter(|p| p.active).cloned().collect();
        Self {
            etag_all: etag(&all),
            etag_active: etag(&active),
            all: all.into(),
            active: active.into(),
        }
    }

    pub fn is_active(&self, code: &str) -> bool {
        self.active.iter().any(|p| p.code == code)
    }

    /// The programs a caller sees, and the etag of exactly that list.
    pub fn list(&self, include_inactive: bool) -> (Arc<[Program]>, &str) {
        if include_inactive {
            (self.all.clone(), &self.etag_all)
        } else {
            (self.active.clone(), &self.etag_active)
        }
    }
}

/// A strong etag: the first 128 bits of the SHA-256 of the list's JSON.
fn etag(programs: &[Program]) -> String {
    let json = serde_json::to_vec(programs).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..16])
}

pub struct Catalog {
    db: DatabaseConnection,
    snapshot: Reloaded<CatalogSnapshot>,
}

impl Catalog {
    pub async fn load(db: DatabaseConnection) -> Result<Self, DbErr> {
        let catalog = Self {
            db,
            snapshot: Reloaded::new(CatalogSnapshot::default()),
        };
        catalog.reload().await?;
        Ok(catalog)
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<CatalogSnapshot>> {
        self.snapshot.load()
    }

    pub async fn reload(&self) -> Result<(), DbErr> {
        self.snapshot
            .reload(|_| async {
                let rows = program::Entity::find()
                    .order_by_asc(program::Column::SortOrder)
                    .order_by_asc(program::Column::Code)
                    .all(&self.db)
                    .await?;
                Ok(CatalogSnapshot::new(
                    rows.into_iter().map(Program::from).collect(),
                ))
            })
            .await
    }

    /// Inserts or updates a program by code (one statement, so concurrent upserts of one code
    /// cannot collide), audits it, and reloads the catalog so the etag changes at once.
    pub async fn upsert(&self, p: Program, actor: &Actor) -> Result<Program, AppError> {
        use sea_orm::{Set, TransactionTrait, sea_query::OnConflict};
        p.validate()?;
        let now = crate::db::now();
        let row = program::ActiveModel {
            code: Set(p.code.clone()),
            title_uz: Set(p.title_uz.trim().to_owned()),
            title_ru: Set(p.title_ru.trim().to_owned()),
            title_en: Set(p.title_en.trim().to_owned()),
            degree: Set(p.degree.clone()),
            duration_years: Set(p.duration_years),
            tuition_fee_tiyin: Set(p.tuition_fee_tiyin),
            application_fee_tiyin: Set(p.application_fee_tiyin),
            active: Set(p.active),
            sort_order: Set(p.sort_order),
            created_at: Set(now),
            updated_at: Set(now),
        };
        use program::Column as C;
        let txn = self.db.begin().await?;
        program::Entity::insert(row)
            .on_conflict(
                OnConflict::column(C::Code)
                    .update_columns([
                        C::TitleUz,
                        C::TitleRu,
                        C::TitleEn,
                        C::Degree,
                        C::DurationYears,
                        C::TuitionFeeTiyin,
                        C::ApplicationFeeTiyin,
                        C::Active,
                        C::SortOrder,
                        C::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        let stored = program::Entity::find_by_id(p.code.as_str())
            .one(&txn)
            .await?
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("upserted program vanished")))?;
        AuditEvent::new(actor, "/crm.v1.ApplicationService/UpsertProgram", audit::OK)
            .target(&stored.code)
            .write(&txn)
            .await?;
        txn.commit().await?;
        self.reload().await?;
        Ok(stored.into())
    }
    /// Reloads the catalog every `RELOAD_EVERY` until shutdown.
    pub async fn run_background(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        crate::background::every(RELOAD_EVERY, "catalog reload", shutdown, || self.reload()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(code: &str, active: bool) -> Program {
        Program {
            code: code.into(),
            title_uz: "t".into(),
            title_ru: "t".into(),
            title_en: "t".into(),
            degree: None,
            duration_years: 4,
            tuition_fee_tiyin: 1,
            application_fee_tiyin: 1,
            active,
            sort_order: 0,
        }
    }

    #[test]
    fn the_etag_follows_the_content() {
        let a = CatalogSnapshot::new(vec![program("A1", true), program("B1", false)]);
        let b = CatalogSnapshot::new(vec![program("A1", true), program("B1", true)]);
        assert_eq!(
            a.list(false).1,
            CatalogSnapshot::new(vec![program("A1", true)])
                .list(false)
                .1
        );
        assert_ne!(a.list(true).1, b.list(true).1);
        assert_ne!(a.list(false).1, b.list(false).1);
        assert!(a.is_active("A1") && !a.is_active("B1"));
    }
}
