//! `crm-bench`: performance as ratios measured in one run (the method of bench.md, summarised in the README): the
//! production path against a baseline doing the same work without our layers, same machine,
//! same load generator, alternating short rounds; the median ratio and the worst round.
//!
//! ```text
//! cargo build --release --bins
//! target/release/crm-bench all                  # P1–P10, 6 rounds × (2 s warm-up + 10 s)
//! target/release/crm-bench p3 p9 --rounds 2 --secs 5
//! target/release/crm-bench soak                 # P8's 10-minute soak, not part of `all`
//! target/release/crm-bench p11                  # how to run P11 (the Python peer) by hand
//! ```
//!
//! Options: `--rounds N` (6), `--secs S` (10), `--warmup S` (2), `--postgres URL`
//! (`postgres://postgres@127.0.0.1:5432/postgres`; P4 creates and drops `crm_bench_<pid>`
//! there), `--soak-secs S` (600), `--no-idempotency-key` (P4/P5 submits without the key),
//! `--otlp-protocol grpc|http/protobuf` (P10's exporter; `grpc` by default), `--rust-log F`
//! (the servers' `RUST_LOG`, `warn` by default; `info` is the production default and costs
//! the request span on every call), `--baselines-like-server` (the echo and the raw insert on
//! the server's runtime and sockets instead of tokio's and tonic's defaults: what P1 would be
//! without those two settings).
//!
//! How a run goes: everything a goal needs is started once (`rig.rs`): the release
//! `crm-server` (fresh database, one tokio worker) and the baselines served by this binary,
//! all pinned to CPU 1; the load generators (h2load, and this binary's client, `client.rs`)
//! and this orchestrator on CPU 0. Each round runs every needed *side* once (`sides.rs`);
//! goals are computed from the sides they share (`goals.rs`). Correctness counters (the
//! servers' `/metrics`, rows in the database, every answer's status) are checked in the same
//! run. The table is printed and written as JSON under `target/bench/`.
//!
//! Files: `process.rs` (spawning, pinning, CPU and RSS), `load.rs` (h2load, the client child,
//! `/metrics`), `client.rs` (the client itself), `http1.rs` (its HTTP/1.1 for webhooks),
//! `baselines/` (echo, raw insert, bare Payme), `db.rs` (PostgreSQL database, invoices, row
//! counts), `sink.rs` (OTLP sink), `rig.rs` (the processes), `sides.rs` (one measured run
//! each), `goals.rs` (sides → outcomes), `outcome.rs`, `soak.rs`, `p11.rs`.

mod baselines;
mod client;
mod db;
mod goals;
mod http1;
mod load;
mod outcome;
mod p11;
mod process;
mod rig;
mod sides;
mod sink;
mod soak;

use std::{collections::BTreeSet, path::PathBuf, time::Instant};

use anyhow::{Context, bail};

use crate::{
    goals::Goal,
    outcome::Outcome,
    rig::{Plan, Rig},
    sides::{Round, Side},
};

const USAGE: &str = "usage: crm-bench [all | soak | p1 … p10 …] [--rounds N] [--secs S] \
    [--warmup S] [--postgres URL] [--soak-secs S] [--no-idempotency-key] [--baselines-like-server] \
    [--otlp-protocol grpc|http/protobuf] [--rust-log FILTER]\n       \
    crm-bench p11 | payme-load …";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> anyhow::Result<&str> { args.get(i).map(String::as_str).context(USAGE) };
    // The children this binary also is.
    match args.first().map(String::as_str) {
        Some("baseline") => return baselines::grpc::echo(arg(1)?),
        Some("baseline-insert") => return baselines::grpc::insert(arg(1)?, arg(2)?),
        Some("baseline-payme") => return baselines::payme::run(arg(1)?, arg(2)?),
        Some("client") => return client::run(arg(1)?),
        Some("payme-load") => return p11::payme_load(&args[1..]),
        Some("otlp-sink") => return sink::standalone(),
        Some("p11") => {
            print!("{}", p11::INSTRUCTIONS);
            return Ok(());
        }
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            return Ok(());
        }
        _ => {}
    }
    let (plan, goals, soak) = parse(&args)?;
    let result = run(plan, goals, soak);
    // The run's files (databases, client specs), whatever happened.
    let _ = std::fs::remove_dir_all(process::work_dir()?);
    result
}

fn parse(args: &[String]) -> anyhow::Result<(Plan, Vec<Goal>, bool)> {
    let mut plan = Plan {
        rounds: 6,
        secs: 10,
        warmup: 2,
        postgres: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        submit_keys: true,
        soak_secs: 600,
        otlp_protocol: "grpc".into(),
    };
    let (mut goals, mut soak) = (BTreeSet::new(), false);
    let mut i = 0;
    while let Some(a) = args.get(i) {
        let mut value = || -> anyhow::Result<&String> {
            i += 1;
            args.get(i).with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--rounds" => plan.rounds = value()?.parse()?,
            "--secs" => plan.secs = value()?.parse()?,
            "--warmup" => plan.warmup = value()?.parse()?,
            "--postgres" => plan.postgres = value()?.clone(),
            "--soak-secs" => plan.soak_secs = value()?.parse()?,
            "--otlp-protocol" => plan.otlp_protocol = value()?.clone(),
            "--rust-log" => process::set_rust_log(value()?),
            "--no-idempotency-key" => plan.submit_keys = false,
            "--baselines-like-server" => process::set_baselines_like_server(),
            "all" => goals.extend(goals::ALL),
            "soak" => soak = true,
            other => match Goal::parse(other) {
                Some(goal) => {
                    goals.insert(goal);
                }
                None => bail!("unknown argument {other:?}\n{USAGE}"),
            },
        }
        i += 1;
    }
    if goals.is_empty() && !soak {
        goals.extend(goals::ALL);
    }
    if plan.rounds == 0 || plan.secs == 0 {
        bail!("--rounds and --secs must be positive");
    }
    Ok((plan, goals.into_iter().collect(), soak))
}

fn run(plan: Plan, goals: Vec<Goal>, soak: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    rig::check_tools(&["h2load", "taskset"])?;
    process::pin_self()?;
    let sides: BTreeSet<Side> = goals
        .iter()
        .flat_map(|g| g.sides().iter().copied())
        .collect();
    let per_round: f64 = sides
        .iter()
        .map(|s| (plan.warmup + plan.secs) as f64 + s.extra_secs(plan.secs))
        .sum();
    let expected = per_round * plan.rounds as f64 + if soak { plan.soak_secs as f64 } else { 0.0 };
    println!(
        "crm-bench: {} sides × {} rounds{}; about {:.0} min of load",
        sides.len(),
        plan.rounds,
        if soak { " + soak" } else { "" },
        expected / 60.0
    );

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut logs: Vec<String> = Vec::new();
    if !goals.is_empty() {
        let mut rig = Rig::start(plan.clone(), &sides)?;
        println!("started in {:.1} s", started.elapsed().as_secs_f64());
        let mut rounds: Vec<Round> = Vec::with_capacity(plan.rounds);
        for index in 0..plan.rounds {
            let mut round = Round::default();
            for &side in &sides {
                let side_started = Instant::now();
                let summary = rig.run_side(side, &mut round, index)?;
                println!(
                    "  round {}/{} {:<15} {:>5.1} s  {summary}",
                    index + 1,
                    plan.rounds,
                    format!("{side:?}"),
                    side_started.elapsed().as_secs_f64()
                );
            }
            for (side, failure) in &round.failures {
                println!("  !! {side:?}: {failure}");
            }
            println!(
                "round {}/{} done, {:.1} min elapsed",
                index + 1,
                plan.rounds,
                started.elapsed().as_secs_f64() / 60.0
            );
            rounds.push(round);
        }
        let mut failures: Vec<(Side, String)> =
            rounds.iter().flat_map(|r| r.failures.clone()).collect();
        failures.extend(rig.final_checks()?);
        for goal in &goals {
            outcomes.extend(goal.outcomes(&rounds, &rig, &failures));
        }
        logs = rig.log_summaries();
        rig.close();
    }
    if soak {
        let work = process::work_dir()?;
        outcomes.push(soak::run(&work, plan.soak_secs)?);
    }

    println!();
    for outcome in &outcomes {
        println!("{}", outcome.line());
    }
    if !logs.is_empty() {
        println!("\nserver logs at WARN/ERROR:");
        for line in &logs {
            println!("  {line}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let out = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!(
        "results-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    ));
    let json = serde_json::json!({
        "rounds": plan.rounds,
        "secs": plan.secs,
        "warmup": plan.warmup,
        "idempotency_keys": plan.submit_keys,
        "elapsed_secs": elapsed,
        "outcomes": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
        "server_logs": logs,
    });
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!("\nwritten to {}", file.display());
    println!("elapsed {:.0} s ({:.1} min)", elapsed, elapsed / 60.0);
    if outcomes.iter().any(|o| !o.failures.is_empty()) {
        bail!("correctness checks failed (see CORRECTNESS CHECK FAILED above)");
    }
    Ok(())
}
