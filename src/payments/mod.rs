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

/// Whether an unauthenticated webhook caller at this address is over its quota. Authenticated
/// provider calls never ask. A throttled call is answered in the provider's own format and not
/// audited, so a flood of garbage costs no database work.
pub async fn throttled(
    state: &crate::state::AppState,
    ctx: &crate::transport::context::RequestContext,
) -> bool {
    let subject = crate::ratelimit::subject(None, ctx.client_ip);
    state
        .limiter
        .check(crate::ratelimit::Scope::UnauthenticatedWebhook, &subject)
        .await
        .is_some_and(|verdict| !verdict.allowed())
}
