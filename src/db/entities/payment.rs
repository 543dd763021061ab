use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "payments")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub invoice_id: String,
    pub provider: String,
    pub amount_tiyin: i64,
    pub status: String,
    pub checkout_url: String,
    /// `<invoice>:<provider>` while PENDING, else NULL (unique).
    pub pending_key: Option<String>,
    /// The invoice id while PAID or REFUNDED, else NULL (unique).
    pub paid_key: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
