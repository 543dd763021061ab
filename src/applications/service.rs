//! Use-cases on applications: what the transports call.

use std::sync::Arc;

use sea_orm::{DatabaseConnection, TransactionTrait};

use crate::{
    applications::{
        catalog::Catalog,
        events::{self, ApplicationEvent, EventKind, Events},
        model::{Application, ApplicationStatus, SubmitInput},
        repo::{self, ListFilter},
    },
    audit::{self, Actor, AuditEvent},
    auth::{Principal, ServiceName},
    db::{Uncommitted, Writer},
    error::{AppError, Reason},
    paging,
};

pub const SUBMIT_ACTION: &str = "/crm.v1.ApplicationService/SubmitApplication";
const UPDATE_ACTION: &str = "/crm.v1.ApplicationService/UpdateApplicationStatus";
const MAX_NOTE_CHARS: usize = 2000;

#[derive(Clone)]
pub struct Applications {
    db: DatabaseConnection,
    /// Where submits are sent at commit, batched with the others of the moment.
    writer: Writer,
    catalog: Arc<Catalog>,
    events: Arc<Events>,
}

impl Applications {
    pub fn new(db: DatabaseConnection, catalog: Arc<Catalog>, events: Arc<Events>) -> Self {
        Self {
            writer: Writer::new(db.clone()),
            db,
            catalog,
            events,
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Validates and stores a bot's submit; the application, its audit row and its event
    /// commit together. `source` is always the calling service, never a field of the request.
    pub async fn submit(
        &self,
        source: &ServiceName,
        actor: &Actor,
        input: SubmitInput,
    ) -> Result<Application, AppError> {
        self.submit_uncommitted(source, actor, input)?
            .commit()
            .await
    }

    /// As [`Self::submit`], with the writes not yet sent, for the caller to add to. Nothing
    /// here reads the database (the catalog is cached).
    pub fn submit_uncommitted(
        &self,
        source: &ServiceName,
        actor: &Actor,
        input: SubmitInput,
    ) -> Result<Uncommitted<Application>, AppError> {
        let app = Application::from_submit(
            input,
            source.as_str(),
            &self.catalog.current(),
            crate::db::now(),
        )?;
        let audit = AuditEvent::new(actor, SUBMIT_ACTION, audit::OK).target(&app.id);
        // The application and its audit row (with the key's claim and answer, when
        // idempotent) are sent together at commit: one statement on PostgreSQL. Its change
        // notice follows the commit (`notify` says why).
        let writes = vec![
            repo::insert_statement(&app)?.into(),
            audit.insert_statement().into(),
        ];
        let (events, submitted) = (self.events.clone(), app.clone());
        Ok(Uncommitted::writes(self.writer.clone(), writes, app).on_commit(move || {
            tracing::info!(application = %submitted.id, source = %submitted.source, "application submitted");
            let notice = events::notice(EventKind::Created, &submitted.id);
            events.after_commit(&notice, ApplicationEvent {
                kind: EventKind::Created,
                application: submitted,
            });
        }))
    }

    /// Staff see every application; a service sees only those it submitted. Anything else is
    /// `NOT_FOUND`, so existence is not revealed.
    pub async fn get(&self, id: &str, caller: &Principal) -> Result<Application, AppError> {
        let not_found = || AppError::not_found("application");
        if uuid::Uuid::try_parse(id).is_err() {
            return Err(not_found());
        }
        let app = repo::find(&self.db, id).await?.ok_or_else(not_found)?;
        let visible = match caller {
            Principal::Service(service) => app.source == service.as_str(),
            Principal::User(user) => user.is_staff(),
        };
        if visible { Ok(app) } else { Err(not_found()) }
    }

    /// A page of applications, newest first, and the token of the next page ("" at the end).
    pub async fn list(
        &self,
        filter: &ListFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Application>, String), AppError> {
        use crate::db::entities::application::Column as C;
        paging::newest_first(
            &self.db,
            repo::filtered(filter),
            (C::CreatedAt, C::Id),
            page_size,
            page_token,
            |m| ((m.created_at, m.id.clone()), Application::try_from(m)),
        )
        .await
    }

    /// Staff move an application along the allowed transitions; anything else is
    /// `INVALID_STATE`. The change, its audit row and its event commit together.
    pub async fn update_status(
        &self,
        id: &str,
        to: ApplicationStatus,
        note: &str,
        actor: &Actor,
    ) -> Result<Application, AppError> {
        let note = note.trim();
        if note.chars().count() > MAX_NOTE_CHARS {
            return Err(AppError::invalid_field(
                "note",
                format!("at most {MAX_NOTE_CHARS} characters"),
            ));
        }
        let not_found = || AppError::not_found("application");
        if uuid::Uuid::try_parse(id).is_err() {
            return Err(not_found());
        }
        // Read outside the transaction: the conditional update below settles races, and on
        // SQLite a transaction that starts with a write waits for the lock instead of failing.
        let current = repo::find(&self.db, id).await?.ok_or_else(not_found)?;
        let refuse = |from: ApplicationStatus| {
            AppError::refused(
                Reason::InvalidState,
                format!("cannot move from {} to {}", from.as_str(), to.as_str()),
            )
        };
        if !current.status.can_move_to(to) {
            return Err(refuse(current.status));
        }
        let now = crate::db::now();
        let txn = self.db.begin().await?;
        // Conditional on the status we read: a concurrent change makes this one fail cleanly.
        if !repo::update_status(&txn, id, current.status, to, note, now).await? {
            return Err(AppError::refused(
                Reason::InvalidState,
                "the application changed meanwhile; reload it",
            ));
        }
        AuditEvent::new(actor, UPDATE_ACTION, audit::OK)
            .target(id)
            .detail(serde_json::json!({"from": current.status.as_str(), "to": to.as_str()}))
            .write(&txn)
            .await?;
        txn.commit().await?;
        let updated = Application {
            status: to,
            note: note.to_owned(),
            updated_at: now,
            ..current
        };
        self.events.after_commit(
            &events::notice(EventKind::Updated, id),
            ApplicationEvent {
                kind: EventKind::Updated,
                application: updated.clone(),
            },
        );
        Ok(updated)
    }
}
