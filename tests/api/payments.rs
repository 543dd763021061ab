//! PaymentService: invoices, ownership, idempotent CreatePayment, checkout links, the
//! provider-event function and WatchPayment.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use crm_server::{
    audit::Actor,
    auth::Role,
    db::{
        Uncommitted,
        entities::{idempotency_key, payment},
    },
    error::{AppError, Reason},
    payments::{Provider, ProviderEvent, ProviderOutcome},
    proto::{self, payment_service_client::PaymentServiceClient},
};
use futures::StreamExt;
use prost::Message;
use sea_orm::{EntityTrait, PaginatorTrait};
use tonic::{Code, transport::Channel};

use crate::{
    both_databases,
    helpers::{PAYME_MERCHANT_ID, TestApp, reason, with_bearer},
};

/// A signed-in applicant: (user id, access token).
async fn applicant(app: &TestApp, phone: &str) -> (String, String) {
    let id = app
        .create_user(Role::Applicant, phone, "applicant-pw-1")
        .await;
    (id, app.login(phone, "applicant-pw-1").await.access_token)
}

async fn client(app: &TestApp) -> PaymentServiceClient<Channel> {
    PaymentServiceClient::new(app.channel().await)
}

async fn invoice(app: &TestApp, staff: &str, payer: &str, amount: i64) -> proto::Invoice {
    client(app)
        .await
        .create_invoice(with_bearer(
            proto::CreateInvoiceRequest {
                payer_user_id: payer.into(),
                application_id: None,
                amount_tiyin: amount,
                description: "Application fee".into(),
            },
            staff,
        ))
        .await
        .expect("invoice")
        .into_inner()
}

fn pay_request(
    invoice_id: &str,
    provider: proto::Provider,
    key: Option<&str>,
    token: &str,
) -> tonic::Request<proto::CreatePaymentRequest> {
    let mut request = with_bearer(
        proto::CreatePaymentRequest {
            invoice_id: invoice_id.into(),
            provider: provider.into(),
            return_url: Some("https://crm.example.uz/paid?x=1".into()),
        },
        token,
    );
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().expect("ascii"));
    }
    request
}

async fn payments_count(app: &TestApp) -> u64 {
    payment::Entity::find()
        .count(app.db())
        .await
        .expect("count")
}

/// The next item of a payment stream, within 5 s (`None` when it ended).
async fn next(
    s: &mut tonic::Streaming<proto::Payment>,
) -> Option<Result<proto::Payment, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("in time")
}

fn event(invoice_id: &str, provider: Provider, outcome: ProviderOutcome) -> ProviderEvent {
    ProviderEvent {
        provider,
        invoice_id: invoice_id.into(),
        outcome,
    }
}

both_databases! {
    async fn staff_create_invoices_and_payers_see_only_their_own(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, alice_token) = applicant(&app, "+998907770001").await;
        let (_, bob_token) = applicant(&app, "+998907770002").await;
        let inv = invoice(&app, &staff, &alice, 10_000_000).await;
        assert_eq!((inv.currency.as_str(), inv.status()), ("UZS", proto::InvoiceStatus::Unpaid));

        let got = client(&app).await.get_invoice(with_bearer(proto::GetInvoiceRequest { id: inv.id.clone() }, &alice_token)).await.expect("own").into_inner();
        assert_eq!(got, inv);
        let status = client(&app).await.get_invoice(with_bearer(proto::GetInvoiceRequest { id: inv.id.clone() }, &bob_token)).await.expect_err("not bob's");
        assert_eq!(status.code(), Code::NotFound);
        let bobs = client(&app).await.list_invoices(with_bearer(proto::ListInvoicesRequest { payer_user_id: Some(alice.clone()), ..Default::default() }, &bob_token)).await.expect("list").into_inner();
        assert!(bobs.invoices.is_empty(), "a payer filter cannot reach another payer");
        let all = client(&app).await.list_invoices(with_bearer(proto::ListInvoicesRequest::default(), &staff)).await.expect("list").into_inner();
        assert_eq!(all.invoices.len(), 1);

        let status = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some("bob-key-0123456789"), &bob_token)).await.expect_err("not bob's invoice");
        assert_eq!(status.code(), Code::NotFound);

        use tonic_types::StatusExt;
        let status = client(&app).await.create_invoice(with_bearer(proto::CreateInvoiceRequest {
            payer_user_id: uuid::Uuid::new_v4().to_string(),
            application_id: Some(uuid::Uuid::new_v4().to_string()),
            amount_tiyin: 0,
            description: String::new(),
        }, &staff)).await.expect_err("invalid");
        let mut fields: Vec<_> = status.get_details_bad_request().expect("violations").field_violations.into_iter().map(|v| v.field).collect();
        fields.sort();
        assert_eq!(fields, ["amount_tiyin", "application_id", "payer_user_id"]);
        let status = client(&app).await.create_invoice(with_bearer(proto::CreateInvoiceRequest { payer_user_id: alice.clone(), amount_tiyin: 1, ..Default::default() }, &alice_token)).await.expect_err("applicants cannot invoice");
        assert_eq!(reason(&status), "FORBIDDEN");
    }

    async fn idempotency_keys_are_checked_before_any_database_work(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770003").await;
        let inv = invoice(&app, &staff, &alice, 5_000_000).await;
        for (key, expected) in [
            (None, "IDEMPOTENCY_KEY_REQUIRED"),
            (Some("k".repeat(15)), "IDEMPOTENCY_KEY_INVALID"),
            (Some("k".repeat(256)), "IDEMPOTENCY_KEY_INVALID"),
            (Some(format!("{} spaced", "k".repeat(16))), "IDEMPOTENCY_KEY_INVALID"),
        ] {
            let status = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, key.as_deref(), &token)).await.expect_err("refused");
            assert_eq!((status.code(), reason(&status).as_str()), (Code::InvalidArgument, expected));
        }
        assert_eq!(payments_count(&app).await, 0);
        assert_eq!(idempotency_key::Entity::find().count(app.db()).await.expect("count"), 0);
    }

    // Quotas off: a load test of idempotency, not of quotas.
    async fn fifty_concurrent_create_payments_with_one_key_make_one_payment(app: TestApp) with { "RATE_LIMIT_ENABLED": "false" } {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770004").await;
        let inv = invoice(&app, &staff, &alice, 7_500_000).await;
        let channel = app.channel().await;
        let calls = (0..50).map(|_| {
            let mut client = PaymentServiceClient::new(channel.clone());
            let request = pay_request(&inv.id, proto::Provider::Click, Some("same-key-for-all-fifty"), &token);
            async move { client.create_payment(request).await }
        });
        let mut ids = std::collections::HashSet::new();
        let (mut originals, mut replays, mut in_progress) = (0, 0, 0);
        for result in futures::future::join_all(calls).await {
            match result {
                Ok(response) => {
                    if response.metadata().get("x-idempotency-replay").is_some() { replays += 1 } else { originals += 1 }
                    ids.insert(response.into_inner().id);
                }
                Err(status) => {
                    assert_eq!((status.code(), reason(&status).as_str()), (Code::Aborted, "IDEMPOTENCY_KEY_IN_PROGRESS"));
                    use tonic_types::StatusExt;
                    assert!(status.get_details_retry_info().is_some());
                    in_progress += 1;
                }
            }
        }
        assert_eq!(originals, 1);
        assert_eq!(originals + replays + in_progress, 50);
        assert_eq!(ids.len(), 1);
        assert_eq!(payments_count(&app).await, 1);
    }

    async fn a_replay_is_byte_identical_and_a_reused_key_is_refused(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770005").await;
        let (bob, bob_token) = applicant(&app, "+998907770006").await;
        let inv = invoice(&app, &staff, &alice, 3_000_000).await;
        let key = "alice-pays-invoice-once";
        let first = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some(key), &token)).await.expect("first");
        assert!(first.metadata().get("x-idempotency-replay").is_none());
        let second = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some(key), &token)).await.expect("replay");
        assert_eq!(second.metadata().get("x-idempotency-replay").map(|v| v.to_str().expect("ascii")), Some("true"));
        assert_eq!(first.get_ref().encode_to_vec(), second.get_ref().encode_to_vec());

        let status = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Uzum, Some(key), &token)).await.expect_err("other body");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED"));

        // Bob's identical key is his own: he gets nothing of Alice's.
        let bob_inv = invoice(&app, &staff, &bob, 3_000_000).await;
        let bobs = client(&app).await.create_payment(pay_request(&bob_inv.id, proto::Provider::Payme, Some(key), &bob_token)).await.expect("bob");
        assert!(bobs.metadata().get("x-idempotency-replay").is_none());
        assert_ne!(bobs.get_ref().id, first.get_ref().id);
        let status = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some("bob-tries-alices-invoice"), &bob_token)).await.expect_err("alice's invoice");
        assert_eq!(status.code(), Code::NotFound);

        // A second click with a fresh key returns the pending payment, not a new one.
        let again = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some("alice-clicks-pay-again"), &token)).await.expect("again");
        assert_eq!(again.get_ref().id, first.get_ref().id);
        assert_eq!(payments_count(&app).await, 2);
    }

    async fn a_transient_failure_releases_the_key_and_retention_purges_it(app: TestApp) {
        let idem = &app.state.idempotency;
        let runs = Arc::new(AtomicUsize::new(0));
        let request = proto::GetInvoiceRequest { id: "x".into() };
        let key = || crm_server::idempotency::IdempotencyKey::parse("transient-retry-key").ok();
        let attempt = |fail: bool| {
            let runs = runs.clone();
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if fail {
                    Err(AppError::Unavailable("database restarting".into()))
                } else {
                    Ok(Uncommitted::settled(proto::GetInvoiceRequest { id: "done".into() }))
                }
            }
        };
        let status = idem.run("user:u", "/test/Method", key(), &request, attempt(true)).await.expect_err("transient");
        assert_eq!(status.code(), Code::Unavailable);
        let ok = idem.run("user:u", "/test/Method", key(), &request, attempt(false)).await.expect("runs again");
        assert_eq!(ok.get_ref().id, "done");
        let replay = idem.run("user:u", "/test/Method", key(), &request, attempt(false)).await.expect("replayed");
        assert!(replay.metadata().get("x-idempotency-replay").is_some());
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the replay did not run the work");

        // A business refusal is final: stored and replayed.
        let refuse = || async { Err::<Uncommitted<proto::GetInvoiceRequest>, _>(AppError::refused(Reason::InvalidState, "no")) };
        let first = idem.run("user:u", "/test/Refuse", key(), &request, refuse).await.expect_err("refused");
        let second = idem.run("user:u", "/test/Refuse", key(), &request, || async { Err::<Uncommitted<proto::GetInvoiceRequest>, _>(AppError::Internal(anyhow::anyhow!("must not run"))) }).await.expect_err("replayed refusal");
        assert_eq!((first.code(), reason(&second).as_str()), (Code::FailedPrecondition, "INVALID_STATE"));

        assert_eq!(idempotency_key::Entity::find().count(app.db()).await.expect("count"), 2);
        assert_eq!(idem.purge(crm_server::db::now() - chrono::Duration::hours(24)).await.expect("purge"), 0, "fresh keys are kept");
        assert_eq!(idem.purge(crm_server::db::now() + chrono::Duration::seconds(1)).await.expect("purge"), 2);
        let fresh = idem.run("user:u", "/test/Method", key(), &request, attempt(false)).await.expect("runs after purge");
        assert!(fresh.metadata().get("x-idempotency-replay").is_none());
    }

    async fn an_abandoned_claim_is_taken_over_after_a_minute(app: TestApp) {
        let request = proto::GetInvoiceRequest { id: "x".into() };
        let stale = crm_server::db::now() - chrono::Duration::seconds(61);
        for (key, locked_at) in [("abandoned-claim-0001", stale), ("running-claim-000001", crm_server::db::now())] {
            app.unanswered_claim(("user:u", "/test/Method", key), &request, locked_at).await;
        }
        let key = |k: &str| crm_server::idempotency::IdempotencyKey::parse(k).ok();
        let work = || async { Ok(Uncommitted::settled(proto::GetInvoiceRequest { id: "ran".into() })) };
        let taken = app.state.idempotency.run("user:u", "/test/Method", key("abandoned-claim-0001"), &request, work).await.expect("taken over");
        assert_eq!(taken.get_ref().id, "ran");
        let status = app.state.idempotency.run("user:u", "/test/Method", key("running-claim-000001"), &request, work).await.expect_err("still running");
        assert_eq!(reason(&status), "IDEMPOTENCY_KEY_IN_PROGRESS");
    }

    async fn the_money_invariants_are_database_constraints(app: TestApp) {
        use crm_server::db::entities::provider_transaction;
        use sea_orm::{ActiveModelTrait, Set};
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770012").await;
        let inv = invoice(&app, &staff, &alice, 1_000_000).await;
        let p = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some("invariants-00000001"), &token)).await.expect("payment").into_inner();
        let tx = |provider: &str, tx_id: &str, active: bool| provider_transaction::ActiveModel {
            id: Set(uuid::Uuid::new_v4().to_string()),
            provider: Set(provider.into()),
            provider_tx_id: Set(tx_id.into()),
            invoice_id: Set(inv.id.clone()),
            payment_id: Set(p.id.clone()),
            amount_tiyin: Set(1_000_000),
            state: Set(if active { "CREATED" } else { "CANCELLED" }.into()),
            active_key: Set(active.then(|| inv.id.clone())),
            provider_time: Set(None),
            reason: Set(None),
            data: Set(None),
            created_at: Set(crm_server::db::now()),
            performed_at: Set(None),
            cancelled_at: Set(None),
            local_ref: Set(None),
        };
        tx("PAYME", "tx-1", true).insert(app.db()).await.expect("first active transaction");
        let err = tx("CLICK", "tx-2", true).insert(app.db()).await.expect_err("a second active transaction");
        assert!(crm_server::db::is_unique_violation(&err), "{err}");
        let err = tx("PAYME", "tx-1", false).insert(app.db()).await.expect_err("the same provider id twice");
        assert!(crm_server::db::is_unique_violation(&err), "{err}");
        tx("CLICK", "tx-3", false).insert(app.db()).await.expect("inactive ones do not count");

        // Two payments of one invoice can never both be paid.
        let mut second: payment::ActiveModel = payment::Entity::find_by_id(p.id.as_str()).one(app.db()).await.expect("q").expect("row").into();
        second.id = Set(uuid::Uuid::new_v4().to_string());
        second.pending_key = Set(None);
        second.paid_key = Set(Some(inv.id.clone()));
        second.clone().insert(app.db()).await.expect("first paid");
        second.id = Set(uuid::Uuid::new_v4().to_string());
        let err = second.insert(app.db()).await.expect_err("paid twice");
        assert!(crm_server::db::is_unique_violation(&err), "{err}");
    }

    async fn checkout_links_decode_to_exactly_the_documented_fields(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770007").await;
        let inv = invoice(&app, &staff, &alice, 150_000).await;
        let link = |provider, key: &'static str| {
            let app = &app;
            let token = token.clone();
            let inv_id = inv.id.clone();
            async move { client(app).await.create_payment(pay_request(&inv_id, provider, Some(key), &token)).await.expect("payment").into_inner().checkout_url }
        };
        let payme = link(proto::Provider::Payme, "checkout-payme-0001").await;
        let encoded = payme.strip_prefix("https://checkout.paycom.uz/").expect("payme host");
        let decoded = String::from_utf8(STANDARD.decode(encoded).expect("base64")).expect("utf8");
        assert_eq!(decoded, format!("m={PAYME_MERCHANT_ID};ac.order_id={};a=150000;c=https://crm.example.uz/paid?x=1", inv.id));

        let click = link(proto::Provider::Click, "checkout-click-0001").await;
        assert_eq!(click, format!("https://my.click.uz/services/pay?service_id=3001&merchant_id=4002&amount=1500.00&transaction_param={}&return_url=https%3A%2F%2Fcrm.example.uz%2Fpaid%3Fx%3D1", inv.id));

        let uzum = link(proto::Provider::Uzum, "checkout-uzum-00001").await;
        assert_eq!(uzum, format!("https://www.uzumbank.uz/open-service?serviceId=5003&order_id={}&amount=150000&redirectUrl=https%3A%2F%2Fcrm.example.uz%2Fpaid%3Fx%3D1", inv.id));
    }

    async fn a_provider_payment_settles_the_invoice_once(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770008").await;
        let inv = invoice(&app, &staff, &alice, 2_000_000).await;
        let payme = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some("settle-payme-00001"), &token)).await.expect("payme").into_inner();
        let click = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Click, Some("settle-click-00001"), &token)).await.expect("click").into_inner();
        let actor = Actor::operator();
        let paid = app.state.payments.apply_provider_event_now(&event(&inv.id, Provider::Payme, ProviderOutcome::Paid), &actor).await.expect("paid");
        assert_eq!(paid.id, payme.id);

        let get = |id: String| {
            let app = &app;
            let token = token.clone();
            async move { client(app).await.get_payment(with_bearer(proto::GetPaymentRequest { id }, &token)).await.expect("get").into_inner() }
        };
        assert_eq!(get(payme.id.clone()).await.status(), proto::PaymentStatus::Paid);
        assert_eq!(get(click.id.clone()).await.status(), proto::PaymentStatus::Cancelled, "the other pending payment is moot");
        let inv_now = client(&app).await.get_invoice(with_bearer(proto::GetInvoiceRequest { id: inv.id.clone() }, &token)).await.expect("invoice").into_inner();
        assert_eq!(inv_now.status(), proto::InvoiceStatus::Paid);
        assert!(inv_now.paid_at.is_some());

        let err = app.state.payments.apply_provider_event_now(&event(&inv.id, Provider::Click, ProviderOutcome::Paid), &actor).await.expect_err("paid once");
        assert_eq!(err.reason(), Reason::InvalidState);
        let status = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Uzum, Some("settle-uzum-000001"), &token)).await.expect_err("invoice paid");
        assert_eq!(reason(&status), "INVALID_STATE");

        app.state.payments.apply_provider_event_now(&event(&inv.id, Provider::Payme, ProviderOutcome::Refunded), &actor).await.expect("refunded");
        assert_eq!(get(payme.id.clone()).await.status(), proto::PaymentStatus::Refunded);
        let inv_now = client(&app).await.get_invoice(with_bearer(proto::GetInvoiceRequest { id: inv.id.clone() }, &staff)).await.expect("invoice").into_inner();
        assert_eq!(inv_now.status(), proto::InvoiceStatus::Refunded);
        assert_eq!(app.audit_rows("payment.provider_event", 2).await.len(), 2);
    }

    async fn a_pending_payment_can_be_cancelled_once(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770009").await;
        let inv = invoice(&app, &staff, &alice, 1_000_000).await;
        let p = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Uzum, Some("cancel-me-000000001"), &token)).await.expect("payment").into_inner();
        let cancelled = client(&app).await.cancel_payment(with_bearer(proto::CancelPaymentRequest { id: p.id.clone() }, &token)).await.expect("cancelled").into_inner();
        assert_eq!(cancelled.status(), proto::PaymentStatus::Cancelled);
        let status = client(&app).await.cancel_payment(with_bearer(proto::CancelPaymentRequest { id: p.id.clone() }, &token)).await.expect_err("again");
        assert_eq!(reason(&status), "INVALID_STATE");
        // A new payment may start after a cancelled one.
        let next = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Uzum, Some("cancel-me-000000002"), &token)).await.expect("new").into_inner();
        assert_ne!(next.id, p.id);
        let listed = client(&app).await.list_payments(with_bearer(proto::ListPaymentsRequest { invoice_id: Some(inv.id.clone()), ..Default::default() }, &token)).await.expect("list").into_inner();
        assert_eq!(listed.payments.len(), 2);
        assert_eq!(listed.payments[0].id, next.id, "newest first");
    }

    async fn a_watcher_sees_pending_then_paid_applied_by_another_process(app: TestApp) {
        let staff = app.staff_token().await;
        let (alice, token) = applicant(&app, "+998907770010").await;
        let inv = invoice(&app, &staff, &alice, 2_500_000).await;
        let p = client(&app).await.create_payment(pay_request(&inv.id, proto::Provider::Payme, Some("watch-me-0000000001"), &token)).await.expect("payment").into_inner();
        let mut stream = client(&app).await.watch_payment(with_bearer(proto::WatchPaymentRequest { id: p.id.clone() }, &token)).await.expect("watch").into_inner();
        assert_eq!(next(&mut stream).await.expect("current").expect("ok").status(), proto::PaymentStatus::Pending);
        // Another process applies the provider's payment (on SQLite: this one).
        let other = if app.backend == crate::helpers::Backend::Postgres { Some(app.replica().await) } else { None };
        let applier = other.as_ref().unwrap_or(&app);
        applier.state.payments.apply_provider_event_now(&event(&inv.id, Provider::Payme, ProviderOutcome::Paid), &Actor::operator()).await.expect("paid");
        assert_eq!(next(&mut stream).await.expect("change").expect("ok").status(), proto::PaymentStatus::Paid);
        assert!(next(&mut stream).await.is_none(), "the stream ends at a final status");
        if let Some(other) = other {
            other.stop().await;
        }
    }

    async fn submit_application_honours_an_idempotency_key(app: TestApp) {
        let mut request = crate::helpers::with_token(
            proto::SubmitApplicationRequest { full_name: "Retry Bot".into(), phone: "+998907770011".into(), language: "ru".into(), ..Default::default() },
            &app.bot1_token,
        );
        request.metadata_mut().insert("idempotency-key", "bot-retry-0000000001".parse().expect("ascii"));
        let again = {
            let mut r = tonic::Request::new(request.get_ref().clone());
            *r.metadata_mut() = request.metadata().clone();
            r
        };
        let first = app.applications().await.submit_application(request).await.expect("first");
        let second = app.applications().await.submit_application(again).await.expect("replay");
        assert_eq!(first.get_ref().id, second.get_ref().id);
        assert!(second.metadata().get("x-idempotency-replay").is_some());
        use crm_server::db::entities::application;
        assert_eq!(application::Entity::find().count(app.db()).await.expect("count"), 1);
    }
}
