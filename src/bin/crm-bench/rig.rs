//! The rig: every process a run needs, started once and kept for all rounds: the servers
//! under test (each on a fresh database), the baselines, the OTLP sink, the throw-away
//! PostgreSQL database, and the bench's own database pools for the correctness counts. Also
//! the checks that need the whole run (the servers' `/metrics` against what h2load saw).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use crm_server::proto;
use prost::Message;
use sea_orm::sqlx::SqlitePool;

use crate::{
    baselines::pool::{self, Pool},
    db::{self, PgDatabase},
    load::{self, LIST_PROGRAMS, Outcomes},
    process::{
        self, PAYME_KEY, PAYME_LOGIN, PAYME_MERCHANT_ID, POOL_SIZE, Process, SERVER_CPU,
        ServerHome, TOKEN, bench_command, work_dir,
    },
    sides::{AMOUNT, LOGIN_PASSWORD, LOGIN_PHONE, PAYER_PHONE, Side},
    sink::Sink,
};

/// Options of a run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rounds: usize,
    pub secs: u64,
    pub warmup: u64,
    pub postgres: String,
    /// Send a fresh `idempotency-key` with every submit (bots that may retry do).
    pub submit_keys: bool,
    pub soak_secs: u64,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` of P10's server: `grpc` (the default) or `http/protobuf`.
    pub otlp_protocol: String,
}

pub struct Otlp {
    pub server: Process,
    pub sink: Sink,
}

/// A server and its raw-insert baseline on one database, and the bench's own pool on it.
pub struct Submitters {
    pub server: Process,
    pub baseline: Process,
    pub db: Pool,
    pub codes: Vec<String>,
}

pub struct PaymeRig {
    pub server: Process,
    pub baseline: Process,
    pub db: SqlitePool,
    pub payer: String,
    pub check_invoices: Vec<String>,
    /// Cycles per second each cycle side reached last time (sizes the next invoice batch).
    pub(crate) last_rate: BTreeMap<Side, f64>,
}

pub struct Rig {
    pub plan: Plan,
    pub work: PathBuf,
    pub echo: Option<Process>,
    pub main: Option<Process>,
    pub refusals: Option<Process>,
    /// The refusals server's database and its audit rows before the rounds: P2 says
    /// refusals touch no database.
    refusals_db: Option<(Pool, i64)>,
    /// After the rounds: audit rows written, calls refused for the token, for the quota.
    pub refusal_audit: Option<(f64, f64, f64)>,
    pub otlp: Option<Otlp>,
    pub latency: Option<Process>,
    pub pg: Option<Submitters>,
    pub sqlite: Option<Submitters>,
    pub payme: Option<PaymeRig>,
    /// The main server's RSS at idle, before any load.
    pub idle_rss: Option<f64>,
    /// h2load answers per side (warm-ups included) and h2load runs per side.
    pub(crate) answered: BTreeMap<Side, u64>,
    pub(crate) runs: BTreeMap<Side, u64>,
    before: BTreeMap<&'static str, Outcomes>,
    /// Dropped after the pools and processes that may use it.
    pub runtime: tokio::runtime::Runtime,
    /// Declared last: dropped after every process using it has been stopped.
    pg_db: Option<PgDatabase>,
}

fn any(sides: &BTreeSet<Side>, wanted: &[Side]) -> bool {
    wanted.iter().any(|s| sides.contains(s))
}

impl Rig {
    /// Starts the processes the `sides` need (servers run their migrations themselves).
    pub fn start(plan: Plan, sides: &BTreeSet<Side>) -> anyhow::Result<Self> {
        use Side::*;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let work = work_dir()?;
        let mut rig = Rig {
            plan,
            work,
            runtime,
            echo: None,
            main: None,
            refusals: None,
            refusals_db: None,
            refusal_audit: None,
            otlp: None,
            latency: None,
            pg: None,
            sqlite: None,
            payme: None,
            idle_rss: None,
            answered: BTreeMap::new(),
            runs: BTreeMap::new(),
            before: BTreeMap::new(),
            pg_db: None,
        };
        let work = rig.work.clone();
        let main_started = Instant::now();
        if any(sides, &[Native, GrpcWeb]) {
            rig.main = Some(ServerHome::new(&work, "main", None, &[])?.serve()?);
        }
        if sides.contains(&Refusals) {
            let home =
                ServerHome::new(&work, "refusals", None, &[("RATE_LIMIT_PER_MINUTE", "60")])?;
            rig.refusals = Some(home.serve()?);
            let db = rig.runtime.block_on(Pool::open(&home.database_url, 1))?;
            let rows = rig.runtime.block_on(db.count(AUDIT_ROWS))?;
            rig.refusals_db = Some((db, rows));
        }
        if sides.contains(&Otlp) {
            let sink = Sink::start(&rig.runtime)?;
            let endpoint = format!("http://{}", sink.addr);
            // Spans pass the same RUST_LOG filter as logs: the request span (INFO, in
            // crm_server::transport::context) must be enabled for anything to be exported.
            let filter = format!(
                "{},crm_server::transport::context=info",
                process::rust_log()
            );
            let home = ServerHome::new(
                &work,
                "otlp",
                None,
                &[
                    ("RUST_LOG", &filter),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", &rig.plan.otlp_protocol),
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
                ],
            )?;
            rig.otlp = Some(self::Otlp {
                server: home.serve()?,
                sink,
            });
        }
        if sides.contains(&FixedRate) {
            // Quotas off: Login's own quota (5/min) would refuse the login flood.
            let home = ServerHome::new(&work, "latency", None, &[("RATE_LIMIT_ENABLED", "false")])?;
            home.cli(
                &[
                    "user",
                    "create",
                    "--role",
                    "applicant",
                    "--phone",
                    LOGIN_PHONE,
                ],
                &[("CRM_PASSWORD", LOGIN_PASSWORD)],
            )?;
            rig.latency = Some(home.serve()?);
        }
        if any(sides, &[EchoMax, EchoFixedRate]) {
            rig.echo = Some(rig.start_echo()?);
        }
        if any(sides, &[PgSubmit, PgInsert]) {
            let pg_db = PgDatabase::create(&rig.runtime, &rig.plan.postgres)?;
            let url = pg_db.url.clone();
            rig.pg_db = Some(pg_db);
            rig.pg = Some(rig.start_submitters("pg", Some(url))?);
        }
        if any(sides, &[SqliteSubmit, SqliteInsert]) {
            rig.sqlite = Some(rig.start_submitters("sqlite", None)?);
        }
        if any(
            sides,
            &[PaymeCheck, BarePaymeCheck, PaymeCycle, BarePaymeCycle],
        ) {
            rig.payme = Some(rig.start_payme()?);
        }
        if let Some(main) = &rig.main {
            let settled = main_started + Duration::from_secs(2);
            std::thread::sleep(settled.saturating_duration_since(Instant::now()));
            rig.idle_rss = Some(main.rss_mib()?);
        }
        for (name, process) in [
            ("main", rig.main.as_ref()),
            ("refusals", rig.refusals.as_ref()),
            ("otlp", rig.otlp.as_ref().map(|o| &o.server)),
        ] {
            if let Some(p) = process {
                rig.before.insert(name, list_programs_outcomes(p)?);
            }
        }
        Ok(rig)
    }

    /// The bare echo, answering the bytes of a real server's catalog.
    fn start_echo(&self) -> anyhow::Result<Process> {
        let source = [
            self.main.as_ref(),
            self.latency.as_ref(),
            self.otlp.as_ref().map(|o| &o.server),
            self.refusals.as_ref(),
        ]
        .into_iter()
        .flatten()
        .next();
        let catalog = match source {
            Some(p) => self.catalog(p)?,
            None => {
                let home = ServerHome::new(&self.work, "catalog", None, &[])?;
                self.catalog(&home.serve()?)?
            }
        };
        let file = self.work.join("list_programs.bin");
        std::fs::write(&file, catalog.encode_to_vec())?;
        let mut cmd = bench_command(SERVER_CPU)?;
        cmd.arg("baseline")
            .arg(&file)
            .env("TOKIO_WORKER_THREADS", "1");
        Process::spawn("echo", cmd)
    }

    /// The catalog as a server answers it.
    fn catalog(&self, server: &Process) -> anyhow::Result<proto::ListProgramsResponse> {
        let url = server.url("");
        self.runtime.block_on(async {
            let mut client =
                proto::application_service_client::ApplicationServiceClient::connect(url).await?;
            let mut request = tonic::Request::new(proto::ListProgramsRequest::default());
            request
                .metadata_mut()
                .insert("x-service-token", TOKEN.parse()?);
            Ok(client.list_programs(request).await?.into_inner())
        })
    }

    fn start_submitters(
        &self,
        name: &str,
        database_url: Option<String>,
    ) -> anyhow::Result<Submitters> {
        let home = ServerHome::new(&self.work, name, database_url, &[])?;
        let server = home.serve()?;
        let mut cmd = bench_command(SERVER_CPU)?;
        cmd.arg("baseline-insert")
            .arg(&home.database_url)
            .arg(POOL_SIZE.to_string())
            .env("TOKIO_WORKER_THREADS", "1");
        let baseline = Process::spawn(&format!("{name}-insert"), cmd)?;
        let db = self.runtime.block_on(Pool::open(&home.database_url, 1))?;
        let codes = self
            .catalog(&server)?
            .programs
            .into_iter()
            .filter(|p| p.active)
            .map(|p| p.code)
            .collect();
        Ok(Submitters {
            server,
            baseline,
            db,
            codes,
        })
    }

    fn start_payme(&self) -> anyhow::Result<PaymeRig> {
        let home = ServerHome::new(
            &self.work,
            "payme",
            None,
            &[
                ("PAYME_MERCHANT_ID", PAYME_MERCHANT_ID),
                ("PAYME_SECRET_KEY", PAYME_KEY),
                ("PAYME_LOGIN", PAYME_LOGIN),
            ],
        )?;
        let payer = home.cli(
            &[
                "user",
                "create",
                "--role",
                "applicant",
                "--phone",
                PAYER_PHONE,
            ],
            &[("CRM_PASSWORD", LOGIN_PASSWORD)],
        )?;
        let server = home.serve()?;
        let mut cmd = bench_command(SERVER_CPU)?;
        cmd.arg("baseline-payme")
            .arg(&home.database_url)
            .arg(POOL_SIZE.to_string())
            .env("TOKIO_WORKER_THREADS", "1")
            .env("PAYME_SECRET_KEY", PAYME_KEY)
            .env("PAYME_LOGIN", PAYME_LOGIN);
        let baseline = Process::spawn("payme-bare", cmd)?;
        let db = self.runtime.block_on(pool::sqlite(&home.database_url, 1))?;
        let check_invoices = self
            .runtime
            .block_on(db::create_invoices(&db, &payer, 100, AMOUNT))?;
        Ok(PaymeRig {
            server,
            baseline,
            db,
            payer,
            check_invoices,
            last_rate: BTreeMap::new(),
        })
    }

    /// Checks that need the whole run: the servers' own counters against what h2load saw
    /// answered, and spans received by the OTLP sink.
    pub fn final_checks(&mut self) -> anyhow::Result<Vec<(Side, String)>> {
        let mut failures = Vec::new();
        let answered = |sides: &[Side]| -> (f64, f64) {
            sides.iter().fold((0.0, 0.0), |(a, r), s| {
                (
                    a + self.answered.get(s).copied().unwrap_or(0) as f64,
                    r + self.runs.get(s).copied().unwrap_or(0) as f64,
                )
            })
        };
        let served: [(&str, Option<&Process>, Side, &[Side]); 3] = [
            (
                "main",
                self.main.as_ref(),
                Side::Native,
                &[Side::Native, Side::GrpcWeb],
            ),
            (
                "otlp",
                self.otlp.as_ref().map(|o| &o.server),
                Side::Otlp,
                &[Side::Otlp],
            ),
            (
                "refusals",
                self.refusals.as_ref(),
                Side::Refusals,
                &[Side::Refusals],
            ),
        ];
        for (name, process, side, sides) in served {
            let Some(p) = process else { continue };
            let before = self.before.get(name).cloned().unwrap_or_default();
            let after = list_programs_outcomes(p)?;
            let (seen, runs) = answered(sides);
            let refusals = side == Side::Refusals;
            for failure in load::check_counts(name, &before, &after, seen, runs, refusals) {
                failures.push((side, failure));
            }
            if let (true, Some((db, rows_before))) = (refusals, &self.refusals_db) {
                // Let the audit queue drain (it writes in the background).
                std::thread::sleep(Duration::from_secs(1));
                let rows = self.runtime.block_on(db.count(AUDIT_ROWS))? - rows_before;
                let delta = |outcome: &str| {
                    after.get(outcome).copied().unwrap_or(0.0)
                        - before.get(outcome).copied().unwrap_or(0.0)
                };
                self.refusal_audit = Some((
                    rows as f64,
                    delta("SERVICE_TOKEN_INVALID"),
                    delta("RATE_LIMITED"),
                ));
            }
        }
        if let Some(otlp) = &self.otlp {
            let (requests, bytes) = otlp.sink.received();
            if requests == 0 || bytes == 0 {
                failures.push((
                    Side::Otlp,
                    format!(
                        "no span reached the OTLP sink ({})",
                        self.plan.otlp_protocol
                    ),
                ));
            }
        }
        Ok(failures)
    }

    /// What the processes logged at WARN/ERROR.
    pub fn log_summaries(&self) -> Vec<String> {
        let mut all: Vec<&Process> = Vec::new();
        all.extend(self.echo.iter());
        all.extend(self.main.iter());
        all.extend(self.refusals.iter());
        all.extend(self.otlp.iter().map(|o| &o.server));
        all.extend(self.latency.iter());
        for pair in self.pg.iter().chain(self.sqlite.iter()) {
            all.push(&pair.server);
            all.push(&pair.baseline);
        }
        for pr in self.payme.iter() {
            all.push(&pr.server);
            all.push(&pr.baseline);
        }
        all.into_iter().filter_map(Process::log_summary).collect()
    }

    pub fn sink_received(&self) -> Option<(u64, u64)> {
        self.otlp.as_ref().map(|o| o.sink.received())
    }

    /// Closes the bench's own pools before the databases go away.
    pub fn close(&mut self) {
        if let Some((db, _)) = &self.refusals_db {
            self.runtime.block_on(db.close());
        }
        for pair in self.pg.iter().chain(self.sqlite.iter()) {
            self.runtime.block_on(pair.db.close());
        }
        if let Some(pr) = &self.payme {
            self.runtime.block_on(pr.db.close());
        }
    }
}

const AUDIT_ROWS: &str = "SELECT count(*) FROM audit_log";

fn list_programs_outcomes(p: &Process) -> anyhow::Result<Outcomes> {
    load::outcomes(p, "crm_requests_total", LIST_PROGRAMS)
}

/// Fails early, before anything starts, when a needed tool is missing.
pub fn check_tools(tools: &[&str]) -> anyhow::Result<()> {
    for tool in tools {
        if std::process::Command::new(tool)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_err()
        {
            bail!("{tool} is required (Debian: apt-get install nghttp2-client util-linux)");
        }
    }
    Ok(())
}
