//! The foundation: the program catalog, applications, service tokens and the audit log.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Programs::Table)
                    .col(string_len(Programs::Code, 32).primary_key())
                    .col(string_len(Programs::TitleUz, 300))
                    .col(string_len(Programs::TitleRu, 300))
                    .col(string_len(Programs::TitleEn, 300))
                    .col(string_len_null(Programs::Degree, 16))
                    .col(integer(Programs::DurationYears))
                    .col(big_integer(Programs::TuitionFeeTiyin))
                    .col(big_integer(Programs::ApplicationFeeTiyin))
                    .col(boolean(Programs::Active))
                    .col(integer(Programs::SortOrder))
                    .col(timestamp_with_time_zone(Programs::CreatedAt))
                    .col(timestamp_with_time_zone(Programs::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Applications::Table)
                    .col(string_len(Applications::Id, 36).primary_key())
                    .col(string_len(Applications::FullName, 200))
                    .col(string_len(Applications::Phone, 16))
                    .col(string_len_null(Applications::Email, 254))
                    .col(big_integer_null(Applications::TelegramUserId))
                    .col(string_len_null(Applications::TelegramUsername, 32))
                    .col(string_len_null(Applications::ProgramCode, 32))
                    .col(string_len(Applications::Language, 2))
                    .col(json(Applications::Answers))
                    .col(string_len(Applications::Source, 32))
                    .col(string_len(Applications::Status, 16))
                    .col(text(Applications::Note))
                    .col(timestamp_with_time_zone(Applications::CreatedAt))
                    .col(timestamp_with_time_zone(Applications::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_applications_program")
                            .from(Applications::Table, Applications::ProgramCode)
                            .to(Programs::Table, Programs::Code),
                    )
                    .to_owned(),
            )
            .await?;
        // Staff lists are newest first with keyset paging on (created_at, id).
        for (name, cols) in [
            (
                "ix_applications_created",
                vec![Applications::CreatedAt, Applications::Id],
            ),
            ("ix_applications_status", vec![Applications::Status]),
            ("ix_applications_source", vec![Applications::Source]),
            ("ix_applications_phone", vec![Applications::Phone]),
        ] {
            let mut index = Index::create();
            index.name(name).table(Applications::Table);
            for col in cols {
                index.col(col);
            }
            manager.create_index(index.to_owned()).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(ServiceTokens::Table)
                    .col(string_len(ServiceTokens::Id, 36).primary_key())
                    .col(string_len(ServiceTokens::ServiceName, 32))
                    .col(text(ServiceTokens::Description))
                    // SHA-256 of the raw token, lowercase hex. The raw token is never stored.
                    .col(string_len_uniq(ServiceTokens::TokenHash, 64))
                    .col(timestamp_with_time_zone(ServiceTokens::CreatedAt))
                    .col(timestamp_with_time_zone_null(ServiceTokens::ExpiresAt))
                    .col(timestamp_with_time_zone_null(ServiceTokens::LastUsedAt))
                    .col(timestamp_with_time_zone_null(ServiceTokens::RevokedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_service_tokens_service")
                    .table(ServiceTokens::Table)
                    .col(ServiceTokens::ServiceName)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .col(big_pk_auto(AuditLog::Id))
                    .col(timestamp_with_time_zone(AuditLog::OccurredAt))
                    // user, service, provider or anonymous (then actor_id is the client address)
                    .col(string_len(AuditLog::ActorKind, 16))
                    .col(string_len(AuditLog::ActorId, 64))
                    .col(string_len(AuditLog::Action, 128))
                    .col(string_len_null(AuditLog::TargetId, 64))
                    .col(string_len(AuditLog::Outcome, 48))
                    .col(string_len_null(AuditLog::ClientIp, 64))
                    .col(string_len_null(AuditLog::RequestId, 128))
                    .col(string_len_null(AuditLog::TraceId, 32))
                    .col(json_null(AuditLog::Detail))
                    .to_owned(),
            )
            .await?;
        for (name, col) in [
            ("ix_audit_log_occurred", AuditLog::OccurredAt),
            ("ix_audit_log_target", AuditLog::TargetId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(AuditLog::Table)
                        .col(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
pub(crate) enum Programs {
    Table,
    Code,
    TitleUz,
    TitleRu,
    TitleEn,
    Degree,
    DurationYears,
    TuitionFeeTiyin,
    ApplicationFeeTiyin,
    Active,
    SortOrder,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Applications {
    Table,
    Id,
    FullName,
    Phone,
    Email,
    TelegramUserId,
    TelegramUsername,
    ProgramCode,
    Language,
    Answers,
    Source,
    Status,
    Note,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ServiceTokens {
    Table,
    Id,
    ServiceName,
    Description,
    TokenHash,
    CreatedAt,
    ExpiresAt,
    LastUsedAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    OccurredAt,
    ActorKind,
    ActorId,
    Action,
    TargetId,
    Outcome,
    ClientIp,
    RequestId,
    TraceId,
    Detail,
}
