//! Invoices and payments as the domain sees them. Money is integer tiyin everywhere.

use chrono::{DateTime, Utc};
use sea_orm::DbErr;

use crate::db::entities::{invoice, payment};

macro_rules! string_enum {
    ($name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }

            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }
    };
}

string_enum!(Provider { Payme => "PAYME", Click => "CLICK", Uzum => "UZUM" });
string_enum!(InvoiceStatus {
    Unpaid => "UNPAID",
    Paid => "PAID",
    Cancelled => "CANCELLED",
    Refunded => "REFUNDED",
});
string_enum!(PaymentStatus {
    Pending => "PENDING",
    Paid => "PAID",
    Cancelled => "CANCELLED",
    Failed => "FAILED",
    Refunded => "REFUNDED",
});

impl PaymentStatus {
    /// A watcher's stream ends at these.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub payer_user_id: String,
    pub application_id: Option<String>,
    pub amount_tiyin: i64,
    pub currency: String,
    pub description: String,
    pub status: InvoiceStatus,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: String,
    pub invoice_id: String,
    pub provider: Provider,
    pub amount_tiyin: i64,
    pub status: PaymentStatus,
    pub checkout_url: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn corrupt(what: &str, id: &str) -> DbErr {
    DbErr::Custom(format!("{what} {id}: unknown stored value"))
}

impl TryFrom<invoice::Model> for Invoice {
    type Error = DbErr;
    fn try_from(m: invoice::Model) -> Result<Self, DbErr> {
        Ok(Self {
            status: InvoiceStatus::parse(&m.status).ok_or_else(|| corrupt("invoice", &m.id))?,
            id: m.id,
            payer_user_id: m.payer_user_id,
            application_id: m.application_id,
            amount_tiyin: m.amount_tiyin,
            currency: m.currency,
            description: m.description,
            created_at: m.created_at,
            paid_at: m.paid_at,
        })
    }
}

impl TryFrom<payment::Model> for Payment {
    type Error = DbErr;
    fn try_from(m: payment::Model) -> Result<Self, DbErr> {
        Ok(Self {
            provider: Provider::parse(&m.provider).ok_or_else(|| corrupt("payment", &m.id))?,
            status: PaymentStatus::parse(&m.status).ok_or_else(|| corrupt("payment", &m.id))?,
            id: m.id,
            invoice_id: m.invoice_id,
            amount_tiyin: m.amount_tiyin,
            checkout_url: m.checkout_url,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}
