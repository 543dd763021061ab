//! `crm.v1.PaymentService`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tonic::{Request, Response, Status};

use crate::{
    error::AppError,
    idempotency::{Idempotency, IdempotencyKey},
    payments::{Invoice, InvoiceStatus, Payment, PaymentStatus, Payments, Provider},
    proto::{self, payment_service_server::PaymentService},
    transport::grpc::{non_empty, timestamp, user},
};

pub struct PaymentApi {
    payments: Payments,
    idempotency: std::sync::Arc<Idempotency>,
    shutdown: watch::Receiver<bool>,
}

impl PaymentApi {
    pub fn new(
        payments: Payments,
        idempotency: std::sync::Arc<Idempotency>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            payments,
            idempotency,
            shutdown,
        }
    }
}

fn provider(value: i32) -> Result<Provider, AppError> {
    match proto::Provider::try_from(value) {
        Ok(proto::Provider::Payme) => Ok(Provider::Payme),
        Ok(proto::Provider::Click) => Ok(Provider::Click),
        Ok(proto::Provider::Uzum) => Ok(Provider::Uzum),
        _ => Err(AppError::invalid_field(
            "provider",
            "must be PAYME, CLICK or UZUM",
        )),
    }
}

fn invoice_status(value: i32) -> Result<Option<InvoiceStatus>, AppError> {
    let name = proto::InvoiceStatus::try_from(value)
        .map_err(|_| AppError::invalid_field("status", "unknown status"))?
        .as_str_name();
    Ok(InvoiceStatus::parse(
        name.trim_start_matches("INVOICE_STATUS_"),
    ))
}

fn payment_status(value: i32) -> Result<Option<PaymentStatus>, AppError> {
    let name = proto::PaymentStatus::try_from(value)
        .map_err(|_| AppError::invalid_field("status", "unknown status"))?
        .as_str_name();
    Ok(PaymentStatus::parse(
        name.trim_start_matches("PAYMENT_STATUS_"),
    ))
}

type PaymentStream = Pin<Box<dyn Stream<Item = Result<proto::Payment, Status>> + Send>>;

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn create_invoice(
        &self,
        request: Request<proto::CreateInvoiceRequest>,
    ) -> Result<Response<proto::Invoice>, Status> {
        let key = IdempotencyKey::from_metadata(request.metadata(), false)?;
        let (user, actor) = user(&request)?;
        let r = request.into_inner();
        let principal = format!("user:{}", user.id);
        let (payments, input) = (self.payments.clone(), r.clone());
        self.idempotency
            .run(
                &principal,
                "/crm.v1.PaymentService/CreateInvoice",
                key,
                &r,
                || async move {
                    let r = input;
                    let application_id = non_empty(r.application_id.clone());
                    payments
                        .create_invoice(
                            &r.payer_user_id,
                            application_id.as_deref(),
                            r.amount_tiyin,
                            &r.description,
                            &actor,
                        )
                        .await
                        .map(|created| created.map(proto::Invoice::from))
                },
            )
            .await
    }

    async fn get_invoice(
        &self,
        request: Request<proto::GetInvoiceRequest>,
    ) -> Result<Response<proto::Invoice>, Status> {
        let (user, _) = user(&request)?;
        let invoice = self.payments.invoice(&user, &request.get_ref().id).await?;
        Ok(Response::new(invoice.into()))
    }

    async fn list_invoices(
        &self,
        request: Request<proto::ListInvoicesRequest>,
    ) -> Result<Response<proto::ListInvoicesResponse>, Status> {
        let (user, _) = user(&request)?;
        let r = request.into_inner();
        let payer = non_empty(r.payer_user_id);
        let (invoices, next_page_token) = self
            .payments
            .list_invoices(
                &user,
                payer.as_deref(),
                invoice_status(r.status)?,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(proto::ListInvoicesResponse {
            invoices: invoices.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn create_payment(
        &self,
        request: Request<proto::CreatePaymentRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        // The key is checked before anything touches the database.
        let key = IdempotencyKey::from_metadata(request.metadata(), true)?;
        let (user, actor) = user(&request)?;
        let r = request.into_inner();
        let principal = format!("user:{}", user.id);
        let (payments, input) = (self.payments.clone(), r.clone());
        self.idempotency
            .run(
                &principal,
                "/crm.v1.PaymentService/CreatePayment",
                key,
                &r,
                || async move {
                    let r = input;
                    let return_url = non_empty(r.return_url.clone());
                    payments
                        .create_payment(
                            &user,
                            &r.invoice_id,
                            provider(r.provider)?,
                            return_url.as_deref(),
                            &actor,
                        )
                        .await
                        .map(|created| created.map(proto::Payment::from))
                },
            )
            .await
    }

    async fn get_payment(
        &self,
        request: Request<proto::GetPaymentRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let (user, _) = user(&request)?;
        let payment = self.payments.payment(&user, &request.get_ref().id).await?;
        Ok(Response::new(payment.into()))
    }

    async fn list_payments(
        &self,
        request: Request<proto::ListPaymentsRequest>,
    ) -> Result<Response<proto::ListPaymentsResponse>, Status> {
        let (user, _) = user(&request)?;
        let r = request.into_inner();
        let invoice_id = non_empty(r.invoice_id);
        let (payments, next_page_token) = self
            .payments
            .list_payments(
                &user,
                invoice_id.as_deref(),
                payment_status(r.status)?,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(proto::ListPaymentsResponse {
            payments: payments.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn cancel_payment(
        &self,
        request: Request<proto::CancelPaymentRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let (user, actor) = user(&request)?;
        let payment = self
            .payments
            .cancel_payment(&user, &request.get_ref().id, &actor)
            .await?;
        Ok(Response::new(payment.into()))
    }

    type WatchPaymentStream = PaymentStream;

    async fn watch_payment(
        &self,
        request: Request<proto::WatchPaymentRequest>,
    ) -> Result<Response<Self::WatchPaymentStream>, Status> {
        let (user, _) = user(&request)?;
        // Subscribe before reading, so no change between the read and the stream is lost.
        let events = BroadcastStream::new(self.payments.events().subscribe());
        let current = self.payments.payment(&user, &request.get_ref().id).await?;
        let id = current.id.clone();
        let mut shutdown = self.shutdown.clone();
        let changes = events
            .take_until(async move {
                let _ = shutdown.wait_for(|stopping| *stopping).await;
            })
            .filter_map(move |item| {
                futures::future::ready(match item {
                    Ok(p) if p.id == id => Some(Ok(p)),
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(_)) => Some(Err(AppError::Unavailable(
                        "the watcher fell behind; watch again".into(),
                    ))),
                })
            });
        // The current payment, then each change; the stream ends after a final status. A
        // notice can arrive after the read that already saw its change (notices of other
        // replicas are delivered late): what equals the last answer sent is not sent again.
        let mut last = None;
        let all = futures::stream::once(futures::future::ready(Ok::<Payment, AppError>(current)))
            .chain(changes)
            .filter(move |item| {
                let fresh = match item {
                    Ok(p) => {
                        let seen = Some((p.status, p.updated_at));
                        std::mem::replace(&mut last, seen) != seen
                    }
                    Err(_) => true,
                };
                futures::future::ready(fresh)
            })
            .boxed();
        let stream = futures::stream::unfold((all, false), |(mut all, ended)| async move {
            if ended {
                return None;
            }
            let item = all.next().await?;
            let ended = match &item {
                Ok(p) => p.status.is_final(),
                Err(_) => true,
            };
            Some((
                item.map(proto::Payment::from).map_err(Status::from),
                (all, ended),
            ))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl From<Invoice> for proto::Invoice {
    fn from(i: Invoice) -> Self {
        let status = format!("INVOICE_STATUS_{}", i.status.as_str());
        Self {
            id: i.id,
            payer_user_id: i.payer_user_id,
            application_id: i.application_id,
            amount_tiyin: i.amount_tiyin,
            currency: i.currency,
            description: i.description,
            status: proto::InvoiceStatus::from_str_name(&status)
                .unwrap_or_default()
                .into(),
            created_at: Some(timestamp(i.created_at)),
            paid_at: i.paid_at.map(timestamp),
        }
    }
}

impl From<Payment> for proto::Payment {
    fn from(p: Payment) -> Self {
        let provider = format!("PROVIDER_{}", p.provider.as_str());
        let status = format!("PAYMENT_STATUS_{}", p.status.as_str());
        Self {
            id: p.id,
            invoice_id: p.invoice_id,
            provider: proto::Provider::from_str_name(&provider)
                .unwrap_or_default()
                .into(),
            amount_tiyin: p.amount_tiyin,
            status: proto::PaymentStatus::from_str_name(&status)
                .unwrap_or_default()
                .into(),
            checkout_url: p.checkout_url,
            created_at: Some(timestamp(p.created_at)),
            updated_at: Some(timestamp(p.updated_at)),
        }
    }
}
