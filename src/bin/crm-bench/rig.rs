//! The rig: every process a run needs, started once and kept for all rounds, and the sides a
//! round is made of. A *side* is one measured run (warm-up, then `--secs`) against one
//! process; goals share sides wherever they compare against the same thing (see
//! `goals.rs`), which is what keeps `all` under 20 minutes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD};
use crm_server::proto;
use prost::Message;
use sea_orm::sqlx::SqlitePool;

use crate::{
    baselines::pool::{self, Pool},
    client::{self, Report, Spec},
    db::{self, PgDatabase},
    load::{self, Efficiency, GRPC, GRPC_WEB, LIST_PROGRAMS, Outcomes, TE, X_GRPC_WEB},
    process::{
        self, PAYME_KEY, PAYME_LOGIN, PAYME_MERCHANT_ID, POOL_SIZE, Process, SERVER_CPU,
        ServerHome, TOKEN, bench_command, work_dir,
    },
    sink::Sink,
};

/// The sides, in the order a round runs them. The echo's closed loop comes first: it gives
/// this round's echo maximum, half of which is the fixed rate of the latency sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// Bare echo, h2load closed loop at 256 in flight: the denominator of P1, P2, P8 and the
    /// echo maximum for P3/P9.
    EchoMax,
    /// ListPrograms with the service token, quotas on: P1's numerator, P6's and P10's
    /// denominator, P8's memory.
    Native,
    /// The same over gRPC-web (binary), same server: P6.
    GrpcWeb,
    /// A bad token on a server with the default-like quota (60/min): P2.
    Refusals,
    /// ListPrograms on a server exporting 10% of its spans over OTLP/HTTP: P10.
    Otlp,
    /// Bare echo at the fixed rate, open loop: P3's denominator.
    EchoFixedRate,
    /// ListPrograms at the fixed rate, open loop; then the same with 50 logins running: P3's
    /// numerator, P9's "without" and "with".
    FixedRate,
    /// SubmitApplication / raw insert on PostgreSQL: P4.
    PgSubmit,
    PgInsert,
    /// SubmitApplication / raw insert on SQLite: P5.
    SqliteSubmit,
    SqliteInsert,
    /// Payme CheckPerformTransaction, server / bare axum: P7.
    PaymeCheck,
    BarePaymeCheck,
    /// Payme CreateTransaction → PerformTransaction cycles, server / bare axum: P7.
    PaymeCycle,
    BarePaymeCycle,
}

impl Side {
    /// Seconds one side takes beyond `warmup + secs`.
    pub fn extra_secs(self, secs: u64) -> f64 {
        match self {
            // The login phase follows on the same server without a second warm-up.
            Side::FixedRate => (secs as f64) + LOGIN_RAMP,
            _ => 0.0,
        }
    }
}

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

/// What one round measured.
#[derive(Default)]
pub struct Round {
    pub eff: BTreeMap<Side, Efficiency>,
    pub reports: BTreeMap<Side, Report>,
    pub failures: Vec<(Side, String)>,
}

/// Calls in flight of the closed-loop database sides (P4, P5) and connections of P7.
pub const IN_FLIGHT: usize = 32;
/// Connections of the fixed-rate client (one tonic channel each).
const FIXED_RATE_CHANNELS: usize = 4;
/// Concurrent logins during P9's "with" window, and the seconds they get to ramp up.
const LOGINS: usize = 50;
pub const LOGIN_RAMP: f64 = 0.5;
const LOGIN_PHONE: &str = "+998900000001";
const LOGIN_PASSWORD: &str = "bench-login-password-1";
const PAYER_PHONE: &str = "+998900000002";
/// Every invoice of the Payme sides, in tiyin.
const AMOUNT: i64 = 500_000;

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
    last_rate: BTreeMap<Side, f64>,
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
    answered: BTreeMap<Side, u64>,
    runs: BTreeMap<Side, u64>,
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

    /// Runs one side of round `index`, recording what it measured in `round`; returns a
    /// one-line summary.
    pub fn run_side(
        &mut self,
        side: Side,
        round: &mut Round,
        index: usize,
    ) -> anyhow::Result<String> {
        use Side::*;
        match side {
            EchoMax | Native | GrpcWeb | Refusals | Otlp => self.h2load_side(side, round),
            EchoFixedRate | FixedRate => self.fixed_rate_side(side, round),
            PgSubmit | PgInsert | SqliteSubmit | SqliteInsert => {
                self.submit_side(side, round, index)
            }
            PaymeCheck | BarePaymeCheck | PaymeCycle | BarePaymeCycle => {
                self.payme_side(side, round, index)
            }
        }
    }

    fn h2load_side(&mut self, side: Side, round: &mut Round) -> anyhow::Result<String> {
        let auth = ("x-service-token", TOKEN);
        let (process, headers): (Option<&Process>, Vec<(&str, &str)>) = match side {
            Side::EchoMax => (self.echo.as_ref(), vec![GRPC, TE]),
            Side::Native => (self.main.as_ref(), vec![GRPC, TE, auth]),
            Side::GrpcWeb => (self.main.as_ref(), vec![GRPC_WEB, X_GRPC_WEB, auth]),
            Side::Refusals => (
                self.refusals.as_ref(),
                vec![GRPC, TE, ("x-service-token", "not-a-valid-token")],
            ),
            _ => (self.otlp.as_ref().map(|o| &o.server), vec![GRPC, TE, auth]),
        };
        let process = process.context("the side's process was not started")?;
        let e = load::efficiency(
            &self.work,
            process,
            &headers,
            self.plan.warmup,
            self.plan.secs,
        )?;
        *self.answered.entry(side).or_default() += e.answered;
        *self.runs.entry(side).or_default() += if self.plan.warmup > 0 { 2 } else { 1 };
        round.eff.insert(side, e);
        Ok(format!(
            "{:>8.0} req/CPU-s {:>8.0} req/s  RSS {:.1} MiB",
            e.per_cpu_s, e.per_s, e.rss_mib
        ))
    }

    fn fixed_rate_side(&mut self, side: Side, round: &mut Round) -> anyhow::Result<String> {
        let echo_max = round
            .eff
            .get(&Side::EchoMax)
            .context("the echo's maximum is measured first in a round")?
            .per_s;
        let rate = 0.5 * echo_max;
        let (w, s) = (self.plan.warmup as f64, self.plan.secs as f64);
        let spec = match side {
            Side::EchoFixedRate => client::FixedRate {
                addr: self.echo.as_ref().context("echo")?.addr.to_string(),
                token: None,
                rate,
                channels: FIXED_RATE_CHANNELS,
                windows: vec![(w, w + s)],
                logins: None,
            },
            _ => client::FixedRate {
                addr: self
                    .latency
                    .as_ref()
                    .context("latency server")?
                    .addr
                    .to_string(),
                token: Some(TOKEN.to_owned()),
                rate,
                channels: FIXED_RATE_CHANNELS,
                windows: vec![(w, w + s), (w + s + LOGIN_RAMP, w + 2.0 * s + LOGIN_RAMP)],
                logins: Some(client::Logins {
                    login: LOGIN_PHONE.to_owned(),
                    password: LOGIN_PASSWORD.to_owned(),
                    concurrency: LOGINS,
                    from: w + s,
                }),
            },
        };
        let report = load::run_client(&self.work, &Spec::FixedRate(spec))?;
        if report.errors > 0 {
            round.failures.push((
                side,
                format!("{} calls failed: {:?}", report.errors, report.error_samples),
            ));
        }
        if side == Side::FixedRate && report.logins_ok == 0 {
            round
                .failures
                .push((side, "no login succeeded during P9's window".into()));
        }
        let window = |i: usize| report.windows.get(i).cloned().unwrap_or_default();
        let mut summary = format!(
            "{rate:>7.0}/s  p50 {:.0} µs  p99 {:.0} µs",
            window(0).p50_us,
            window(0).p99_us
        );
        if side == Side::FixedRate {
            summary.push_str(&format!(
                "; with {LOGINS} logins: p50 {:.0} µs  p99 {:.0} µs ({} logins)",
                window(1).p50_us,
                window(1).p99_us,
                report.logins_ok
            ));
        }
        if report.unanswered > 0 {
            summary.push_str(&format!(
                "; {} calls unanswered at the end (overloaded)",
                report.unanswered
            ));
        }
        if report.late_sends > 0 {
            summary.push_str(&format!(
                "; {} sends >1 ms late (max {:.1} ms)",
                report.late_sends,
                report.max_lateness_us / 1000.0
            ));
        }
        round.reports.insert(side, report);
        Ok(summary)
    }

    fn submit_side(
        &mut self,
        side: Side,
        round: &mut Round,
        index: usize,
    ) -> anyhow::Result<String> {
        let pair = match side {
            Side::PgSubmit | Side::PgInsert => self.pg.as_ref(),
            _ => self.sqlite.as_ref(),
        }
        .context("submitters not started")?;
        let target = match side {
            Side::PgSubmit | Side::SqliteSubmit => &pair.server,
            _ => &pair.baseline,
        };
        const COUNT: &str = "SELECT count(*) FROM applications";
        let before = self.runtime.block_on(pair.db.count(COUNT))?;
        let spec = client::Submit {
            addr: target.addr.to_string(),
            token: TOKEN.to_owned(),
            in_flight: IN_FLIGHT,
            channels: FIXED_RATE_CHANNELS,
            warmup: self.plan.warmup as f64,
            secs: self.plan.secs as f64,
            program_codes: pair.codes.clone(),
            first_phone: (index as u64 * 16 + side as u64) * 1_000_000,
            key_prefix: self
                .plan
                .submit_keys
                .then(|| format!("bench-{}-r{index}-{side:?}", std::process::id())),
        };
        let report = load::run_client(&self.work, &Spec::Submit(spec))?;
        let after = self.runtime.block_on(pair.db.count(COUNT))?;
        if report.errors > 0 {
            round.failures.push((
                side,
                format!(
                    "{} submits failed: {:?}",
                    report.errors, report.error_samples
                ),
            ));
        }
        let added = (after - before) as u64;
        if added != report.acked {
            round.failures.push((
                side,
                format!(
                    "{added} rows added but {} submits acknowledged",
                    report.acked
                ),
            ));
        }
        let summary = format!(
            "{:>7.0} submits/s  p50 {:.1} ms  p99 {:.1} ms  ({added} rows = {} acks)",
            report.per_s,
            report.windows[0].p50_us / 1000.0,
            report.windows[0].p99_us / 1000.0,
            report.acked
        );
        round.reports.insert(side, report);
        Ok(summary)
    }

    fn payme_side(
        &mut self,
        side: Side,
        round: &mut Round,
        index: usize,
    ) -> anyhow::Result<String> {
        let pr = self.payme.as_mut().context("payme not started")?;
        let (target, mode) = match side {
            Side::PaymeCheck => (&pr.server, client::PaymeMode::Check),
            Side::BarePaymeCheck => (&pr.baseline, client::PaymeMode::Check),
            Side::PaymeCycle => (&pr.server, client::PaymeMode::Cycle),
            _ => (&pr.baseline, client::PaymeMode::Cycle),
        };
        let (w, s) = (self.plan.warmup as f64, self.plan.secs as f64);
        let cycles = mode == client::PaymeMode::Cycle;
        let (invoices, before) = if cycles {
            // Every cycle pays an invoice of its own: enough for 1.5× the last rate.
            let n = match pr.last_rate.get(&side) {
                Some(rate) => (rate * (w + s) * 1.5) as usize + 2_000,
                None => 40_000,
            };
            let ids = self
                .runtime
                .block_on(db::create_invoices(&pr.db, &pr.payer, n, AMOUNT))?;
            (ids, Some(self.runtime.block_on(db::payme_counts(&pr.db))?))
        } else {
            (pr.check_invoices.clone(), None)
        };
        let spec = client::Payme {
            addr: target.addr.to_string(),
            path: "/webhooks/payme".into(),
            authorization: format!(
                "Basic {}",
                STANDARD.encode(format!("{PAYME_LOGIN}:{PAYME_KEY}"))
            ),
            connections: IN_FLIGHT,
            warmup: w,
            secs: s,
            amount: AMOUNT,
            account_field: "order_id".into(),
            mode,
            invoices,
            id_prefix: format!("{:08x}", index * 16 + side as usize),
        };
        let report = load::run_client(&self.work, &Spec::Payme(spec))?;
        if report.errors > 0 {
            round.failures.push((
                side,
                format!(
                    "{} answers were not Payme successes: {:?}",
                    report.errors, report.error_samples
                ),
            ));
        }
        let mut summary = format!(
            "{:>7.0} {}/s  p50 {:.1} ms  p99 {:.1} ms",
            report.per_s,
            if cycles { "cycles" } else { "checks" },
            report.windows[0].p50_us / 1000.0,
            report.windows[0].p99_us / 1000.0,
        );
        if let Some((paid0, performed0, _)) = before {
            let (paid, performed, twice) = self.runtime.block_on(db::payme_counts(&pr.db))?;
            let (paid, performed) = ((paid - paid0) as u64, (performed - performed0) as u64);
            if paid != report.acked || performed != report.acked || twice != 0 {
                round.failures.push((
                    side,
                    format!(
                        "{} cycles acknowledged but {paid} invoices paid, {performed} \
                         transactions performed, {twice} invoices paid twice",
                        report.acked
                    ),
                ));
            }
            summary.push_str(&format!(
                "  ({paid} invoices paid = {} cycles)",
                report.acked
            ));
            pr.last_rate.insert(side, report.per_s);
        }
        round.reports.insert(side, report);
        Ok(summary)
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
