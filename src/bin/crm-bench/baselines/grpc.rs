//! The bare tonic baselines: no layers at all (no auth, quotas, metrics, request context,
//! timeouts, gRPC-web, CORS), one tokio worker like the server under test.
//!
//! - `crm-bench baseline <file>`: ListPrograms answers the bytes in `<file>` (the real
//!   server's catalog answer), the "bare echo".
//! - `crm-bench baseline-insert <database-url> <pool-size>`: SubmitApplication is one raw sqlx
//!   `INSERT … RETURNING` into the server's `applications` table, filling the same columns the
//!   server fills, and answers the same `Application` message. No validation, transaction,
//!   audit row, change notice or idempotency record: those are what the server adds.

use anyhow::Context;
use chrono::{DateTime, Utc};
use crm_server::proto::{self, application_service_server::ApplicationService};
use prost::Message;
use sea_orm::sqlx;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

use super::{announce, pool::Pool};
use crate::process::SERVICE;

pub fn echo(response_file: &str) -> anyhow::Result<()> {
    let response = proto::ListProgramsResponse::decode(std::fs::read(response_file)?.as_slice())?;
    serve(Baseline {
        catalog: Some(response),
        pool: None,
    })
}

pub fn insert(database_url: &str, pool_size: &str) -> anyhow::Result<()> {
    let size: u32 = pool_size.parse().context("pool size")?;
    let runtime = runtime()?;
    let pool = runtime.block_on(Pool::open(database_url, size))?;
    let baseline = Baseline {
        catalog: None,
        pool: Some(pool),
    };
    runtime.block_on(run(baseline))
}

/// `--baselines-like-server` (process.rs) was given.
fn like_server() -> bool {
    std::env::var_os(crate::process::BASELINES_LIKE_SERVER).is_some()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    if like_server() {
        return Ok(crm_server::startup::runtime()?);
    }
    // Multi-threaded like the server; TOKIO_WORKER_THREADS (1) sizes it the same way.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(baseline: Baseline) -> anyhow::Result<()> {
    runtime()?.block_on(run(baseline))
}

async fn run(baseline: Baseline) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    announce(listener.local_addr()?);
    let server = tonic::transport::Server::builder()
        .add_service(proto::application_service_server::ApplicationServiceServer::new(baseline));
    if like_server() {
        server
            .serve_with_incoming(crm_server::transport::socket::incoming(listener))
            .await?;
    } else {
        // TCP_NODELAY on every connection, as the server sets it.
        server
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await?;
    }
    Ok(())
}

struct Baseline {
    catalog: Option<proto::ListProgramsResponse>,
    pool: Option<Pool>,
}

const INSERT_PG: &str = "INSERT INTO applications (id, full_name, phone, email, \
    telegram_user_id, telegram_username, program_code, language, answers, source, status, \
    note, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
    $13, $14) RETURNING id, created_at, updated_at";
const INSERT_SQLITE: &str = "INSERT INTO applications (id, full_name, phone, email, \
    telegram_user_id, telegram_username, program_code, language, answers, source, status, \
    note, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
    ?13, ?14) RETURNING id, created_at, updated_at";

/// The same values in the same order for either database.
macro_rules! bind_application {
    ($query:expr, $r:expr, $id:expr, $answers:expr, $now:expr) => {
        $query
            .bind($id)
            .bind(&$r.full_name)
            .bind(&$r.phone)
            .bind(&$r.email)
            .bind($r.telegram_user_id)
            .bind(&$r.telegram_username)
            .bind(&$r.program_code)
            .bind(&$r.language)
            .bind($answers)
            .bind(SERVICE)
            .bind("NEW")
            .bind("")
            .bind($now)
            .bind($now)
    };
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl ApplicationService for Baseline {
    type WatchApplicationsStream = futures::stream::Empty<Result<proto::ApplicationEvent, Status>>;

    async fn list_programs(
        &self,
        _: Request<proto::ListProgramsRequest>,
    ) -> Result<Response<proto::ListProgramsResponse>, Status> {
        match &self.catalog {
            Some(catalog) => Ok(Response::new(catalog.clone())),
            None => Err(Status::unimplemented("baseline")),
        }
    }

    async fn submit_application(
        &self,
        request: Request<proto::SubmitApplicationRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        let Some(pool) = &self.pool else {
            return Err(Status::unimplemented("baseline"));
        };
        let r = request.into_inner();
        let id = uuid::Uuid::now_v7().to_string();
        let now = crm_server::db::now();
        let answers = serde_json::to_value(&r.answers).map_err(internal)?;
        let (id, created_at, updated_at): (String, DateTime<Utc>, DateTime<Utc>) = match pool {
            Pool::Postgres(p) => {
                bind_application!(sqlx::query_as(INSERT_PG), r, &id, &answers, now)
                    .fetch_one(p)
                    .await
            }
            Pool::Sqlite(p) => {
                bind_application!(sqlx::query_as(INSERT_SQLITE), r, &id, &answers, now)
                    .fetch_one(p)
                    .await
            }
        }
        .map_err(internal)?;
        Ok(Response::new(proto::Application {
            id,
            full_name: r.full_name,
            phone: r.phone,
            email: r.email,
            telegram_user_id: r.telegram_user_id,
            telegram_username: r.telegram_username,
            program_code: r.program_code,
            language: r.language,
            answers: r.answers,
            source: SERVICE.to_owned(),
            status: proto::ApplicationStatus::New.into(),
            note: String::new(),
            created_at: Some(timestamp(created_at)),
            updated_at: Some(timestamp(updated_at)),
        }))
    }

    async fn get_application(
        &self,
        _: Request<proto::GetApplicationRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn list_applications(
        &self,
        _: Request<proto::ListApplicationsRequest>,
    ) -> Result<Response<proto::ListApplicationsResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn update_application_status(
        &self,
        _: Request<proto::UpdateApplicationStatusRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn upsert_program(
        &self,
        _: Request<proto::UpsertProgramRequest>,
    ) -> Result<Response<proto::Program>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn watch_applications(
        &self,
        _: Request<proto::WatchApplicationsRequest>,
    ) -> Result<Response<Self::WatchApplicationsStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}
