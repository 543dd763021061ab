//! Money: invoices, the payments that settle them through Payme, Click or Uzum Bank, checkout
//! links, and the one function provider webhooks call to apply what a provider reports.

pub mod checkout;
pub mod click;
pub mod model;
pub mod payme;
pub mod service;
pub mod transactions;
pub mod uzum;

pub use model::{Invoice, InvoiceStatus, Payment, PaymentStatus, Provider};
pub use service::{Payments, ProviderEvent, ProviderOutcome};
