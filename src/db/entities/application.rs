use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "applications")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub full_name: String,
    pub phone: String,
    pub email: Option<String>,
    pub telegram_user_id: Option<i64>,
    pub telegram_username: Option<String>,
    pub program_code: Option<String>,
    pub language: String,
    /// A JSON object of string values.
    pub answers: Json,
    pub source: String,
    pub status: String,
    pub note: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
