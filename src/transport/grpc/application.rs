//! `crm.v1.ApplicationService`.

use std::pin::Pin;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tonic::{Request, Response, Status};

use crate::{
    applications::service::SUBMIT_ACTION,
    applications::{
        Application, ApplicationEvent, ApplicationStatus, Applications, EventKind, ListFilter,
        Program, SubmitInput,
    },
    audit::Actor,
    auth::Principal,
    error::AppError,
    idempotency::{Idempotency, IdempotencyKey},
    proto::{self, application_service_server::ApplicationService},
    transport::grpc::{authenticated, caller, non_empty, timestamp},
};

pub struct ApplicationApi {
    applications: Applications,
    idempotency: std::sync::Arc<Idempotency>,
    /// Fires at shutdown, so open watch streams end instead of holding the process.
    shutdown: watch::Receiver<bool>,
}

impl ApplicationApi {
    pub fn new(
        applications: Applications,
        idempotency: std::sync::Arc<Idempotency>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            applications,
            idempotency,
            shutdown,
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::ApplicationEvent, Status>> + Send>>;

fn status_filter(value: i32, field: &str) -> Result<Option<ApplicationStatus>, AppError> {
    match proto::ApplicationStatus::try_from(value) {
        Ok(proto::ApplicationStatus::Unspecified) => Ok(None),
        Ok(s) => Ok(Some(s.into())),
        Err(_) => Err(AppError::invalid_field(field, "unknown status")),
    }
}

fn time(t: Option<prost_types::Timestamp>, field: &str) -> Result<Option<DateTime<Utc>>, AppError> {
    t.map(|t| {
        DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
            .ok_or_else(|| AppError::invalid_field(field, "out of range"))
    })
    .transpose()
}

#[tonic::async_trait]
impl ApplicationService for ApplicationApi {
    async fn submit_application(
        &self,
        request: Request<proto::SubmitApplicationRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        // A bot retrying after a network error must not create a second application.
        let key = IdempotencyKey::from_metadata(request.metadata(), false)?;
        let (principal, ctx) = caller(&request)?;
        let Principal::Service(service) = &principal else {
            return Err(AppError::Internal(anyhow::anyhow!("a user reached a bot method")).into());
        };
        let actor = Actor::from_request(Some(&principal), &ctx);
        let r = request.into_inner();
        let scope = format!("service:{service}");
        // Validating and preparing the writes reads nothing from the database, so a fresh
        // key, the application and the answer go in one statement.
        let change = self
            .applications
            .submit_uncommitted(service, &actor, r.clone().into())
            .map(|submitted| submitted.map(proto::Application::from));
        self.idempotency
            .run_unsent(&scope, SUBMIT_ACTION, key, &r, change)
            .await
    }

    async fn get_application(
        &self,
        request: Request<proto::GetApplicationRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        let (principal, _) = caller(&request)?;
        let app = self
            .applications
            .get(&request.get_ref().id, &principal)
            .await?;
        Ok(Response::new(app.into()))
    }

    async fn list_applications(
        &self,
        request: Request<proto::ListApplicationsRequest>,
    ) -> Result<Response<proto::ListApplicationsResponse>, Status> {
        caller(&request)?;
        let r = request.into_inner();
        let filter = ListFilter {
            status: status_filter(r.status, "status")?,
            source: non_empty(r.source),
            program_code: non_empty(r.program_code),
            query: non_empty(r.query),
            created_after: time(r.created_after, "created_after")?,
            created_before: time(r.created_before, "created_before")?,
        };
        let (apps, next_page_token) = self
            .applications
            .list(&filter, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(proto::ListApplicationsResponse {
            applications: apps.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_application_status(
        &self,
        request: Request<proto::UpdateApplicationStatusRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        let (principal, ctx) = caller(&request)?;
        let actor = Actor::from_request(Some(&principal), &ctx);
        let r = request.into_inner();
        let to = status_filter(r.status, "status")?
            .ok_or_else(|| AppError::invalid_field("status", "is required"))?;
        let app = self
            .applications
            .update_status(&r.id, to, &r.note, &actor)
            .await?;
        Ok(Response::new(app.into()))
    }

    type WatchApplicationsStream = EventStream;

    async fn watch_applications(
        &self,
        request: Request<proto::WatchApplicationsRequest>,
    ) -> Result<Response<Self::WatchApplicationsStream>, Status> {
        caller(&request)?;
        let r = request.into_inner();
        let status = status_filter(r.status, "status")?;
        let source = non_empty(r.source);
        let events = BroadcastStream::new(self.applications.events().subscribe());
        let mut shutdown = self.shutdown.clone();
        let stream = events
            .take_until(async move {
                let _ = shutdown.wait_for(|stopping| *stopping).await;
            })
            .filter_map(move |item| {
                let item = match item {
                    Ok(event) => {
                        let app = &event.application;
                        let wanted = status.is_none_or(|s| s == app.status)
                            && source.as_deref().is_none_or(|s| s == app.source);
                        wanted.then(|| Ok(event.into()))
                    }
                    // A watcher this far behind has missed events: say so and let it re-list.
                    Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(
                        AppError::Unavailable(format!("watcher fell {missed} events behind"))
                            .into(),
                    )),
                };
                futures::future::ready(item)
            })
            .scan(false, |failed, item| {
                // End the stream after reporting an error.
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = item.is_err();
                futures::future::ready(Some(item))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_programs(
        &self,
        request: Request<proto::ListProgramsRequest>,
    ) -> Result<Response<proto::ListProgramsResponse>, Status> {
        authenticated(&request)?;
        let catalog = self.applications.catalog().current();
        let (programs, etag) = catalog.list(request.get_ref().include_inactive);
        Ok(Response::new(proto::ListProgramsResponse {
            programs: programs.iter().map(proto::Program::from).collect(),
            etag: etag.to_owned(),
        }))
    }

    async fn upsert_program(
        &self,
        request: Request<proto::UpsertProgramRequest>,
    ) -> Result<Response<proto::Program>, Status> {
        let (principal, ctx) = caller(&request)?;
        let actor = Actor::from_request(Some(&principal), &ctx);
        let program = request
            .into_inner()
            .program
            .ok_or_else(|| AppError::invalid_field("program", "is required"))?;
        let stored = self
            .applications
            .catalog()
            .upsert(program.into(), &actor)
            .await?;
        Ok(Response::new((&stored).into()))
    }
}

impl From<proto::Program> for Program {
    fn from(p: proto::Program) -> Self {
        Self {
            code: p.code.trim().to_owned(),
            title_uz: p.title_uz,
            title_ru: p.title_ru,
            title_en: p.title_en,
            degree: non_empty(p.degree),
            duration_years: p.duration_years,
            tuition_fee_tiyin: p.tuition_fee_tiyin,
            application_fee_tiyin: p.application_fee_tiyin,
            active: p.active,
            sort_order: p.sort_order,
        }
    }
}

impl From<proto::ApplicationStatus> for ApplicationStatus {
    fn from(s: proto::ApplicationStatus) -> Self {
        match s {
            proto::ApplicationStatus::InReview => Self::InReview,
            proto::ApplicationStatus::Accepted => Self::Accepted,
            proto::ApplicationStatus::Rejected => Self::Rejected,
            proto::ApplicationStatus::Withdrawn => Self::Withdrawn,
            // UNSPECIFIED is handled by the caller; NEW is the only other value.
            proto::ApplicationStatus::New | proto::ApplicationStatus::Unspecified => Self::New,
        }
    }
}

impl From<ApplicationEvent> for proto::ApplicationEvent {
    fn from(e: ApplicationEvent) -> Self {
        let kind = match e.kind {
            EventKind::Created => proto::ApplicationEventKind::Created,
            EventKind::Updated => proto::ApplicationEventKind::Updated,
        };
        Self {
            kind: kind.into(),
            application: Some(e.application.into()),
        }
    }
}

impl From<proto::SubmitApplicationRequest> for SubmitInput {
    fn from(r: proto::SubmitApplicationRequest) -> Self {
        Self {
            full_name: r.full_name,
            phone: r.phone,
            email: r.email,
            telegram_user_id: r.telegram_user_id,
            telegram_username: r.telegram_username,
            program_code: r.program_code,
            language: r.language,
            answers: r.answers.into_iter().collect(),
        }
    }
}

impl From<ApplicationStatus> for proto::ApplicationStatus {
    fn from(s: ApplicationStatus) -> Self {
        match s {
            ApplicationStatus::New => Self::New,
            ApplicationStatus::InReview => Self::InReview,
            ApplicationStatus::Accepted => Self::Accepted,
            ApplicationStatus::Rejected => Self::Rejected,
            ApplicationStatus::Withdrawn => Self::Withdrawn,
        }
    }
}

impl From<Application> for proto::Application {
    fn from(a: Application) -> Self {
        Self {
            id: a.id,
            full_name: a.full_name,
            phone: a.phone,
            email: a.email,
            telegram_user_id: a.telegram_user_id,
            telegram_username: a.telegram_username,
            program_code: a.program_code,
            language: a.language.as_str().to_owned(),
            answers: a.answers.into_iter().collect(),
            source: a.source,
            status: proto::ApplicationStatus::from(a.status).into(),
            note: a.note,
            created_at: Some(timestamp(a.created_at)),
            updated_at: Some(timestamp(a.updated_at)),
        }
    }
}

impl From<&Program> for proto::Program {
    fn from(p: &Program) -> Self {
        Self {
            code: p.code.clone(),
            title_uz: p.title_uz.clone(),
            title_ru: p.title_ru.clone(),
            title_en: p.title_en.clone(),
            degree: p.degree.clone(),
            duration_years: p.duration_years,
            tuition_fee_tiyin: p.tuition_fee_tiyin,
            application_fee_tiyin: p.application_fee_tiyin,
            active: p.active,
            sort_order: p.sort_order,
        }
    }
}
