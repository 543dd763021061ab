//! A starter catalog, so that a fresh server answers `ListPrograms` with something real.
//! Operators edit it with `UpsertProgram`; this migration only runs once.

use sea_orm_migration::prelude::*;

use crate::m20261121_000001_core_tables::Programs;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (code, uz, ru, en, degree, years, tuition, application fee, sort order); fees in tiyin.
type SeedProgram = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    i32,
    i64,
    i64,
    i32,
);

const SEED: &[SeedProgram] = &[
    (
        "CS-BSC",
        "Kompyuter injiniringi",
        "Компьютерная инженерия",
        "Computer Engineering",
        "bachelor",
        4,
        2_200_000_000,
        10_000_000,
        10,
    ),
    (
        "ECON-BSC",
        "Iqtisodiyot",
        "Экономика",
        "Economics",
        "bachelor",
        4,
        1_800_000_000,
        10_000_000,
        20,
    ),
    (
        "MBA",
        "Biznes boshqaruvi magistri",
        "Магистр делового администрирования",
        "Master of Business Administration",
        "master",
        2,
        3_000_000_000,
        15_000_000,
        30,
    ),
    (
        "DS-MSC",
        "Ma'lumotlar fani",
        "Наука о данных",
        "Data Science",
        "master",
        2,
        2_600_000_000,
        15_000_000,
        40,
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let now = Expr::current_timestamp();
        let mut insert = Query::insert();
        insert.into_table(Programs::Table).columns([
            Programs::Code,
            Programs::TitleUz,
            Programs::TitleRu,
            Programs::TitleEn,
            Programs::Degree,
            Programs::DurationYears,
            Programs::TuitionFeeTiyin,
            Programs::ApplicationFeeTiyin,
            Programs::Active,
            Programs::SortOrder,
            Programs::CreatedAt,
            Programs::UpdatedAt,
        ]);
        for &(code, uz, ru, en, degree, years, tuition, fee, sort) in SEED {
            insert.values_panic([
                code.into(),
                uz.into(),
                ru.into(),
                en.into(),
                degree.into(),
                years.into(),
                tuition.into(),
                fee.into(),
                true.into(),
                sort.into(),
                now.clone(),
                now.clone(),
            ]);
        }
        manager.exec_stmt(insert.to_owned()).await
    }
}
