//! People who sign in, and the queries on the users table.

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter};

use crate::db::entities::user;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Applicant,
    Staff,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applicant => "APPLICANT",
            Self::Staff => "STAFF",
            Self::Admin => "ADMIN",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Applicant, Self::Staff, Self::Admin]
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub full_name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<user::Model> for User {
    type Error = DbErr;
    fn try_from(m: user::Model) -> Result<Self, DbErr> {
        Ok(Self {
            role: Role::parse(&m.role)
                .ok_or_else(|| DbErr::Custom(format!("user {}: bad role", m.id)))?,
            id: m.id,
            phone: m.phone,
            email: m.email,
            full_name: m.full_name,
            created_at: m.created_at,
        })
    }
}

/// A login is an email when it has an `@`, else a phone.
pub async fn find_by_login<C: ConnectionTrait>(
    conn: &C,
    login: &str,
) -> Result<Option<user::Model>, DbErr> {
    let query = if login.contains('@') {
        user::Entity::find().filter(user::Column::Email.eq(login.to_lowercase()))
    } else {
        user::Entity::find().filter(user::Column::Phone.eq(crate::validate::normalize_phone(login)))
    };
    query.one(conn).await
}

pub async fn find<C: ConnectionTrait>(conn: &C, id: &str) -> Result<Option<user::Model>, DbErr> {
    user::Entity::find_by_id(id).one(conn).await
}
