use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "provider_transactions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub provider: String,
    pub provider_tx_id: String,
    pub invoice_id: String,
    pub payment_id: String,
    pub amount_tiyin: i64,
    pub state: String,
    /// The invoice id while the transaction is active, else NULL (unique).
    pub active_key: Option<String>,
    pub provider_time: Option<i64>,
    pub reason: Option<i32>,
    pub data: Option<Json>,
    pub created_at: DateTimeUtc,
    pub performed_at: Option<DateTimeUtc>,
    pub cancelled_at: Option<DateTimeUtc>,
    /// Our integer reference (Click's merchant_prepare_id), unique per provider.
    pub local_ref: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
