//! Live application events for `WatchApplications` (see `crate::notify`).

use futures::FutureExt;
use sea_orm::{DatabaseConnection, DbErr};

use crate::{
    applications::{model::Application, repo},
    notify::{Notice, Notifier},
};

const CHANNEL: &str = "crm_application_events";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Updated,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApplicationEvent {
    pub kind: EventKind,
    pub application: Application,
}

pub type Events = Notifier<ApplicationEvent>;

pub fn notifier(db: &DatabaseConnection) -> Events {
    Notifier::new(db, CHANNEL, |db, notice| load(db, notice).boxed())
}

pub fn notice(kind: EventKind, id: &str) -> Notice {
    Notice {
        kind: kind.as_str().to_owned(),
        id: id.to_owned(),
    }
}

async fn load(db: DatabaseConnection, notice: Notice) -> Result<Option<ApplicationEvent>, DbErr> {
    let kind = match notice.kind.as_str() {
        "created" => EventKind::Created,
        _ => EventKind::Updated,
    };
    Ok(repo::find(&db, &notice.id)
        .await?
        .map(|application| ApplicationEvent { kind, application }))
}
