//! Queries on the applications table, and the conversion between rows and the domain type.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, QueryTrait, Set, sea_query::InsertStatement};

use crate::{
    applications::model::{Application, ApplicationStatus, Language},
    db::entities::application,
};

/// The `INSERT` of a new application, sent with the submit's other writes (`Uncommitted::writes`).
pub fn insert_statement(app: &Application) -> Result<InsertStatement, DbErr> {
    let row = application::ActiveModel {
        id: Set(app.id.clone()),
        full_name: Set(app.full_name.clone()),
        phone: Set(app.phone.clone()),
        email: Set(app.email.clone()),
        telegram_user_id: Set(app.telegram_user_id),
        telegram_username: Set(app.telegram_username.clone()),
        program_code: Set(app.program_code.clone()),
        language: Set(app.language.as_str().to_owned()),
        answers: Set(serde_json::to_value(&app.answers)
            .map_err(|e| DbErr::Custom(format!("answers: {e}")))?),
        source: Set(app.source.clone()),
        status: Set(app.status.as_str().to_owned()),
        note: Set(app.note.clone()),
        created_at: Set(app.created_at),
        updated_at: Set(app.updated_at),
    };
    Ok(application::Entity::insert(row).into_query())
}

pub async fn find<C: ConnectionTrait>(conn: &C, id: &str) -> Result<Option<Application>, DbErr> {
    application::Entity::find_by_id(id)
        .one(conn)
        .await?
        .map(Application::try_from)
        .transpose()
}

impl TryFrom<application::Model> for Application {
    type Error = DbErr;

    fn try_from(m: application::Model) -> Result<Self, DbErr> {
        let corrupt = |what: &str| DbErr::Custom(format!("application {}: bad {what}", m.id));
        let answers: BTreeMap<String, String> =
            serde_json::from_value(m.answers.clone()).map_err(|_| corrupt("answers"))?;
        Ok(Self {
            language: Language::parse(&m.language).ok_or_else(|| corrupt("language"))?,
            status: ApplicationStatus::parse(&m.status).ok_or_else(|| corrupt("status"))?,
            answers,
            id: m.id,
            full_name: m.full_name,
            phone: m.phone,
            email: m.email,
            telegram_user_id: m.telegram_user_id,
            telegram_username: m.telegram_username,
            program_code: m.program_code,
            source: m.source,
            note: m.note,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

/// Filters of `ListApplications`; `None` matches anything.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub status: Option<ApplicationStatus>,
    pub source: Option<String>,
    pub program_code: Option<String>,
    /// Case-insensitive substring of the full name, or substring of the phone.
    pub query: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// One page, newest first, and the cursor of the last row when more may follow.
/// The applications matching `filter`, unordered; `paging::newest_first` pages them.
pub fn filtered(filter: &ListFilter) -> sea_orm::Select<application::Entity> {
    use application::Column as C;
    use sea_orm::{
        ColumnTrait, Condition, QueryFilter,
        sea_query::{Expr, ExprTrait, Func, LikeExpr},
    };

    let mut select = application::Entity::find();
    if let Some(status) = filter.status {
        select = select.filter(C::Status.eq(status.as_str()));
    }
    if let Some(source) = &filter.source {
        select = select.filter(C::Source.eq(source.as_str()));
    }
    if let Some(code) = &filter.program_code {
        select = select.filter(C::ProgramCode.eq(code.as_str()));
    }
    if let Some(query) = &filter.query {
        let pattern = format!("%{}%", escape_like(&query.to_lowercase()));
        select = select.filter(
            Condition::any()
                .add(
                    Expr::expr(Func::lower(Expr::col(C::FullName)))
                        .like(LikeExpr::new(pattern.clone()).escape('\\')),
                )
                .add(Expr::col(C::Phone).like(LikeExpr::new(pattern).escape('\\'))),
        );
    }
    if let Some(after) = filter.created_after {
        select = select.filter(C::CreatedAt.gte(after));
    }
    if let Some(before) = filter.created_before {
        select = select.filter(C::CreatedAt.lt(before));
    }
    select
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Moves an application from `from` to `to` only if it is still in `from`; returns whether
/// this caller made the change.
pub async fn update_status<C: ConnectionTrait>(
    conn: &C,
    id: &str,
    from: ApplicationStatus,
    to: ApplicationStatus,
    note: &str,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    use sea_orm::{ColumnTrait, QueryFilter};
    let result = application::Entity::update_many()
        .col_expr(application::Column::Status, to.as_str().into())
        .col_expr(application::Column::Note, note.into())
        .col_expr(application::Column::UpdatedAt, now.into())
        .filter(application::Column::Id.eq(id))
        .filter(application::Column::Status.eq(from.as_str()))
        .exec(conn)
        .await?;
    Ok(result.rows_affected == 1)
}
