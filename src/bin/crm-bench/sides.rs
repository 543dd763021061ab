//! The sides a round is made of. A *side* is one measured run (warm-up, then `--secs`) of
//! one load against one process of the rig; what it measured goes into the round's `Round`,
//! and any correctness check it failed into `Round::failures`.
//!
//! - h2load sides (closed loop, 4 × 64 streams): requests per CPU-second of the process;
//! - fixed-rate sides (this binary's client, open loop): latency percentiles per window;
//! - submit sides (client, 32 in flight): throughput and p99, rows added = acknowledged;
//! - Payme sides (client, 32 HTTP/1.1 connections): throughput and p99, every answer a Payme
//!   success, invoices paid = cycles acknowledged, none paid twice.

use std::collections::BTreeMap;

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD};

use crate::{
    client::{self, Report, Spec},
    db,
    load::{self, Efficiency, GRPC, GRPC_WEB, TE, X_GRPC_WEB},
    process::{PAYME_KEY, PAYME_LOGIN, Process, TOKEN},
    rig::Rig,
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
    /// ListPrograms on a server exporting 10% of its spans over OTLP (gRPC by default): P10.
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
pub const LOGIN_PHONE: &str = "+998900000001";
pub const LOGIN_PASSWORD: &str = "bench-login-password-1";
pub const PAYER_PHONE: &str = "+998900000002";
/// Every invoice of the Payme sides, in tiyin.
pub const AMOUNT: i64 = 500_000;

impl Rig {
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
            report.first_window().p50_us / 1000.0,
            report.first_window().p99_us / 1000.0,
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
            report.first_window().p50_us / 1000.0,
            report.first_window().p99_us / 1000.0,
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
}
