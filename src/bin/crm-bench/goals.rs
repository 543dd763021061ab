//! The goals of bench.md and the sides each is computed from. Sides are shared: one echo
//! closed loop per round serves P1, P2, P8 (and gives P3's rate); the main server's native
//! side serves P1, P6's and P10's denominators and P8; P3's fixed-rate side on our server
//! continues into P9's login window.

use crate::{
    client::{Report, Window},
    load::Efficiency,
    outcome::{Outcome, median},
    rig::Rig,
    sides::{Round, Side},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Goal {
    P1,
    P2,
    P3,
    P4,
    P5,
    P6,
    P7,
    P8,
    P9,
    P10,
}

pub const ALL: [Goal; 10] = [
    Goal::P1,
    Goal::P2,
    Goal::P3,
    Goal::P4,
    Goal::P5,
    Goal::P6,
    Goal::P7,
    Goal::P8,
    Goal::P9,
    Goal::P10,
];

impl Goal {
    pub fn parse(name: &str) -> Option<Self> {
        ALL.into_iter()
            .find(|g| format!("{g:?}").eq_ignore_ascii_case(name))
    }

    pub fn sides(self) -> &'static [Side] {
        use Side::*;
        match self {
            Goal::P1 => &[EchoMax, Native],
            Goal::P2 => &[EchoMax, Refusals],
            Goal::P3 => &[EchoMax, EchoFixedRate, FixedRate],
            Goal::P4 => &[PgSubmit, PgInsert],
            Goal::P5 => &[SqliteSubmit, SqliteInsert],
            Goal::P6 => &[Native, GrpcWeb],
            Goal::P7 => &[PaymeCheck, BarePaymeCheck, PaymeCycle, BarePaymeCycle],
            Goal::P8 => &[EchoMax, Native],
            Goal::P9 => &[EchoMax, FixedRate],
            Goal::P10 => &[Native, Otlp],
        }
    }

    /// The goal's outcomes from every round, with the correctness failures of its sides.
    pub fn outcomes(
        self,
        rounds: &[Round],
        rig: &Rig,
        failures: &[(Side, String)],
    ) -> Vec<Outcome> {
        let mut outcomes = match self {
            Goal::P1 => vec![efficiency_ratio(
                Outcome::new(
                    "P1",
                    "ListPrograms (token, quotas on) vs bare echo, req/CPU-s",
                )
                .at_least(0.90),
                rounds,
                Side::Native,
                Side::EchoMax,
            )],
            Goal::P2 => p2(rounds, rig),
            Goal::P3 => p3(rounds),
            Goal::P4 => database(
                rounds,
                "P4",
                "PostgreSQL",
                Side::PgSubmit,
                Side::PgInsert,
                true,
            ),
            Goal::P5 => database(
                rounds,
                "P5",
                "SQLite",
                Side::SqliteSubmit,
                Side::SqliteInsert,
                false,
            ),
            Goal::P6 => vec![efficiency_ratio(
                Outcome::new(
                    "P6",
                    "gRPC-web (binary) vs native gRPC, ListPrograms, req/CPU-s",
                )
                .at_least(0.85),
                rounds,
                Side::GrpcWeb,
                Side::Native,
            )],
            Goal::P7 => p7(rounds),
            Goal::P8 => p8(rounds, rig),
            Goal::P9 => vec![p9(rounds)],
            Goal::P10 => {
                let mut o = efficiency_ratio(
                    Outcome::new(
                        "P10",
                        "OTLP on (request spans, 10% exported) vs off, ListPrograms, req/CPU-s",
                    )
                    .at_least(0.80),
                    rounds,
                    Side::Otlp,
                    Side::Native,
                );
                if let Some((requests, bytes)) = rig.sink_received() {
                    o.absolutes.push_str(&format!(
                        "; OTLP/{} sink got {requests} exports, {bytes} bytes",
                        rig.plan.otlp_protocol
                    ));
                }
                vec![o]
            }
        };
        let mut mine: Vec<String> = failures
            .iter()
            .filter(|(side, _)| self.sides().contains(side))
            .map(|(side, message)| format!("{side:?}: {message}"))
            .collect();
        mine.dedup();
        for outcome in &mut outcomes {
            outcome.failures = mine.clone();
        }
        outcomes
    }
}

fn eff(round: &Round, side: Side) -> Option<&Efficiency> {
    round.eff.get(&side)
}

fn report(round: &Round, side: Side) -> Option<&Report> {
    round.reports.get(&side)
}

fn first_window(round: &Round, side: Side) -> Option<&Window> {
    report(round, side)?.windows.first()
}

/// The median over rounds of `f`, for the absolutes.
fn med(rounds: &[Round], f: impl Fn(&Round) -> Option<f64>) -> f64 {
    median(&rounds.iter().filter_map(f).collect::<Vec<_>>())
}

fn ratios(rounds: &[Round], f: impl Fn(&Round) -> Option<f64>) -> Vec<f64> {
    rounds.iter().filter_map(f).collect()
}

fn efficiency_ratio(mut o: Outcome, rounds: &[Round], ours: Side, theirs: Side) -> Outcome {
    o.values = ratios(rounds, |r| {
        Some(eff(r, ours)?.per_cpu_s / eff(r, theirs)?.per_cpu_s)
    });
    o.absolutes = format!(
        "median {:.0} vs {:.0} req/CPU-s ({:.0} vs {:.0} req/s)",
        med(rounds, |r| Some(eff(r, ours)?.per_cpu_s)),
        med(rounds, |r| Some(eff(r, theirs)?.per_cpu_s)),
        med(rounds, |r| Some(eff(r, ours)?.per_s)),
        med(rounds, |r| Some(eff(r, theirs)?.per_s)),
    );
    o
}

fn p2(rounds: &[Round], rig: &Rig) -> Vec<Outcome> {
    let mut out = vec![efficiency_ratio(
        Outcome::new(
            "P2",
            "refusals (bad token, then over quota) vs bare echo, req/CPU-s",
        )
        .at_least(1.0),
        rounds,
        Side::Refusals,
        Side::EchoMax,
    )];
    if let Some((rows, invalid, limited)) = rig.refusal_audit {
        // Refusals for the token itself are audited (through the queue); over the quota,
        // nothing may reach the database.
        let over_quota = (rows - invalid).max(0.0);
        let mut o = Outcome::new("P2", "database rows written per refusal over quota").at_most(0.0);
        o.values = vec![if limited > 0.0 {
            over_quota / limited
        } else {
            0.0
        }];
        o.absolutes = format!(
            "{rows:.0} audit rows for {invalid:.0} SERVICE_TOKEN_INVALID + {limited:.0} \
             RATE_LIMITED refusals"
        );
        out.push(o);
    }
    out
}

/// A note when our server could not keep up with the fixed rate in some rounds: calls left
/// unanswered, or a p99 over a second in the window without logins.
fn overload_note(rounds: &[Round]) -> String {
    let overloaded = rounds
        .iter()
        .filter_map(|r| report(r, Side::FixedRate))
        .filter(|r| r.unanswered > 0 || r.windows.first().is_some_and(|w| w.p99_us > 1e6))
        .count();
    if overloaded == 0 {
        return String::new();
    }
    format!(
        "; OUR SERVER WAS OVERLOADED at this rate in {overloaded} of {} rounds (calls left \
         unanswered or p99 > 1 s): latencies are queueing",
        rounds.len()
    )
}

fn p3(rounds: &[Round]) -> Vec<Outcome> {
    let rate = med(rounds, |r| Some(eff(r, Side::EchoMax)?.per_s * 0.5));
    let pick = |side: Side, p99: bool| {
        move |r: &Round| {
            let w = first_window(r, side)?;
            Some(if p99 { w.p99_us } else { w.p50_us })
        }
    };
    let late = med(rounds, |r| {
        Some(
            report(r, Side::FixedRate)?.late_sends as f64
                + report(r, Side::EchoFixedRate)?.late_sends as f64,
        )
    });
    let mut out = Vec::new();
    for (p99, bar, label) in [(false, 1.15, "p50"), (true, 1.3, "p99")] {
        let mut o = Outcome::new(
            "P3",
            format!("ListPrograms {label} latency vs bare echo at 50% of echo max"),
        )
        .at_most(bar);
        o.values = ratios(rounds, |r| {
            Some(pick(Side::FixedRate, p99)(r)? / pick(Side::EchoFixedRate, p99)(r)?)
        });
        o.absolutes = format!(
            "median {:.0} vs {:.0} µs at {rate:.0} calls/s (open loop, {} connections; quotas \
             off on this server for P9's logins; median late sends {late:.0})",
            med(rounds, pick(Side::FixedRate, p99)),
            med(rounds, pick(Side::EchoFixedRate, p99)),
            4,
        ) + &overload_note(rounds);
        out.push(o);
    }
    out
}

fn database(
    rounds: &[Round],
    goal: &'static str,
    db: &str,
    ours: Side,
    theirs: Side,
    with_p99: bool,
) -> Vec<Outcome> {
    let per_s = |side: Side| move |r: &Round| Some(report(r, side)?.per_s);
    let p99 = |side: Side| move |r: &Round| Some(first_window(r, side)?.p99_us / 1000.0);
    let absolutes = format!(
        "median {:.0} vs {:.0} submits/s, p99 {:.1} vs {:.1} ms ({} in flight, pool {})",
        med(rounds, per_s(ours)),
        med(rounds, per_s(theirs)),
        med(rounds, p99(ours)),
        med(rounds, p99(theirs)),
        crate::sides::IN_FLIGHT,
        crate::process::POOL_SIZE,
    );
    let mut throughput = Outcome::new(
        goal,
        format!("SubmitApplication vs raw sqlx INSERT RPC on {db}, throughput"),
    )
    .at_least(0.85);
    throughput.values = ratios(rounds, |r| Some(per_s(ours)(r)? / per_s(theirs)(r)?));
    throughput.absolutes = absolutes.clone();
    let mut out = vec![throughput];
    if with_p99 {
        let mut o = Outcome::new(
            goal,
            format!("SubmitApplication vs raw sqlx INSERT RPC on {db}, p99 latency"),
        )
        .at_most(1.25);
        o.values = ratios(rounds, |r| Some(p99(ours)(r)? / p99(theirs)(r)?));
        o.absolutes = absolutes;
        out.push(o);
    }
    out
}

fn p7(rounds: &[Round]) -> Vec<Outcome> {
    let per_s = |side: Side| move |r: &Round| Some(report(r, side)?.per_s);
    let mut out = Vec::new();
    for (what, ours, theirs, unit) in [
        (
            "Payme CheckPerformTransaction vs bare axum, same queries, SQLite",
            Side::PaymeCheck,
            Side::BarePaymeCheck,
            "calls",
        ),
        (
            "Payme Create→Perform cycle vs bare axum, same queries, SQLite",
            Side::PaymeCycle,
            Side::BarePaymeCycle,
            "cycles",
        ),
    ] {
        let mut o = Outcome::new("P7", what).at_least(0.85);
        o.values = ratios(rounds, |r| Some(per_s(ours)(r)? / per_s(theirs)(r)?));
        o.absolutes = format!(
            "median {:.0} vs {:.0} {unit}/s, p99 {:.1} vs {:.1} ms ({} connections)",
            med(rounds, per_s(ours)),
            med(rounds, per_s(theirs)),
            med(rounds, |r| Some(first_window(r, ours)?.p99_us / 1000.0)),
            med(rounds, |r| Some(first_window(r, theirs)?.p99_us / 1000.0)),
            crate::sides::IN_FLIGHT,
        );
        out.push(o);
    }
    out
}

fn p8(rounds: &[Round], rig: &Rig) -> Vec<Outcome> {
    let mut idle = Outcome::new("P8", "RSS at idle (MiB)")
        .at_most(30.0)
        .in_mib();
    idle.values = rig.idle_rss.into_iter().collect();
    idle.absolutes = "main server after start, before any load".into();
    let mut load = Outcome::new("P8", "RSS at 256 in flight over the bare echo's (MiB)")
        .at_most(48.0)
        .in_mib();
    load.values = ratios(rounds, |r| {
        Some(eff(r, Side::Native)?.rss_mib - eff(r, Side::EchoMax)?.rss_mib)
    });
    load.absolutes = format!(
        "median {:.1} vs echo {:.1} MiB, sampled halfway through P1's sides (4 × 64 streams)",
        med(rounds, |r| Some(eff(r, Side::Native)?.rss_mib)),
        med(rounds, |r| Some(eff(r, Side::EchoMax)?.rss_mib)),
    );
    vec![idle, load]
}

fn p9(rounds: &[Round]) -> Outcome {
    let window =
        |i: usize| move |r: &Round| Some(report(r, Side::FixedRate)?.windows.get(i)?.p99_us);
    let mut o = Outcome::new(
        "P9",
        "ListPrograms p99 with 50 Argon2 logins running vs without",
    )
    .at_most(2.0);
    o.values = ratios(rounds, |r| Some(window(1)(r)? / window(0)(r)?));
    o.absolutes = format!(
        "median p99 {:.0} vs {:.0} µs at P3's rate; median {:.0} logins per window",
        med(rounds, window(1)),
        med(rounds, window(0)),
        med(rounds, |r| Some(
            report(r, Side::FixedRate)?.logins_ok as f64
        )),
    ) + &overload_note(rounds);
    o
}
