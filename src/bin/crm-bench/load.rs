//! Load generators, all pinned to the load CPU: h2load for identical unary gRPC calls, and
//! this binary's own client (`crm-bench client <spec>`, see `client.rs`) for open-loop pacing,
//! varied payloads and the Payme webhook.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, bail};

use crate::{
    client::{Report, Spec},
    process::{LOAD_CPU, Process, bench_command},
};

pub const LIST_PROGRAMS: &str = "/crm.v1.ApplicationService/ListPrograms";
pub const GRPC: (&str, &str) = ("content-type", "application/grpc");
pub const TE: (&str, &str) = ("te", "trailers");
pub const GRPC_WEB: (&str, &str) = ("content-type", "application/grpc-web+proto");
pub const X_GRPC_WEB: (&str, &str) = ("x-grpc-web", "1");

/// h2load's shape for every closed-loop gRPC side: 4 connections × 64 streams = 256 in flight
/// (P8's memory is read at that load).
pub const CONNECTIONS: u32 = 4;
pub const STREAMS: u32 = 64;

/// One h2load run against `url`: the requests answered (HTTP 2xx; gRPC errors are counted by
/// the server's `/metrics`, h2load cannot see trailers).
pub fn h2load(
    work: &Path,
    url: &str,
    headers: &[(&str, &str)],
    secs: u64,
    clients: u32,
    streams: u32,
) -> anyhow::Result<u64> {
    let file = work.join("body.bin");
    // ListProgramsRequest{} encodes to nothing: the frame is its 5-byte header.
    std::fs::write(&file, frame(&[]))?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOAD_CPU, "h2load"])
        .args([
            "-D",
            &secs.to_string(),
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .arg("-d")
        .arg(&file);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    let out = cmd.arg(url).output().context("h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find(|p| p.contains("succeeded")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("h2load output: {text}"))
}

/// A gRPC data frame: flag 0, big-endian length, message.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One closed-loop h2load side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Efficiency {
    /// Requests answered per CPU-second of the process under test (the figure compared).
    pub per_cpu_s: f64,
    /// Requests answered per wall-clock second.
    pub per_s: f64,
    /// Everything h2load saw answered, warm-up included (for the server's counters).
    pub answered: u64,
    /// RSS of the process under test halfway through the measured run.
    pub rss_mib: f64,
}

/// Warm-up, then a measured run; CPU time from `/proc`, RSS sampled halfway.
pub fn efficiency(
    work: &Path,
    p: &Process,
    headers: &[(&str, &str)],
    warmup: u64,
    secs: u64,
) -> anyhow::Result<Efficiency> {
    let url = p.url(LIST_PROGRAMS);
    let warm = if warmup > 0 {
        h2load(work, &url, headers, warmup, CONNECTIONS, STREAMS)?
    } else {
        0
    };
    let cpu_before = p.cpu_seconds()?;
    let (load, rss) = std::thread::scope(|s| {
        let load = s.spawn(|| h2load(work, &url, headers, secs, CONNECTIONS, STREAMS));
        std::thread::sleep(Duration::from_secs_f64(secs as f64 / 2.0));
        let rss = p.rss_mib();
        (load.join(), rss)
    });
    let answered = match load {
        Ok(result) => result?,
        Err(_) => bail!("the h2load thread panicked"),
    };
    let cpu = p.cpu_seconds()? - cpu_before;
    Ok(Efficiency {
        per_cpu_s: answered as f64 / cpu.max(0.01),
        per_s: answered as f64 / secs as f64,
        answered: answered + warm,
        rss_mib: rss?,
    })
}

/// Runs this binary's client on the load CPU with `spec`; its report comes back as JSON.
pub fn run_client(work: &Path, spec: &Spec) -> anyhow::Result<Report> {
    let file = work.join(format!("client-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, serde_json::to_vec(spec)?)?;
    let out = bench_command(LOAD_CPU)?
        .arg("client")
        .arg(&file)
        .output()
        .context("crm-bench client")?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!(
            "the client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "client output: {}",
            String::from_utf8_lossy(&out.stdout)
                .chars()
                .take(500)
                .collect::<String>()
        )
    })
}

fn metrics(p: &Process) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(p.addr)?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nhost: bench\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// A counter of `method` by its `outcome` label, from a server's `/metrics`.
pub fn outcomes(p: &Process, name: &str, method: &str) -> anyhow::Result<Outcomes> {
    let method_label = format!("method=\"{method}\"");
    let mut out = Outcomes::new();
    for line in metrics(p)?.lines() {
        if !line.starts_with(&format!("{name}{{")) || !line.contains(&method_label) {
            continue;
        }
        let outcome = line
            .split_once("outcome=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(o, _)| o.to_owned());
        let value = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok());
        if let (Some(outcome), Some(value)) = (outcome, value) {
            *out.entry(outcome).or_default() += value;
        }
    }
    Ok(out)
}

/// A server's calls of one method by outcome (`OK` or the error reason).
pub type Outcomes = std::collections::BTreeMap<String, f64>;

/// Checks a server's counts of ListPrograms outcomes between `before` and `after` against the
/// `seen` answers of `runs` h2load runs. `refusals`: every call must have been refused (bad
/// token, then quota), else every call must have been served. Returns what is wrong.
///
/// When h2load stops, the calls it has in flight (up to 256 per run) are either answered
/// unseen or cut off mid-request, which the server counts as `GRPC_ERROR` (no reason).
pub fn check_counts(
    name: &str,
    before: &Outcomes,
    after: &Outcomes,
    seen: f64,
    runs: f64,
    refusals: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut delta = after.clone();
    for (outcome, n) in before {
        *delta.entry(outcome.clone()).or_default() -= n;
    }
    let mut take = |outcome: &str| delta.remove(outcome).unwrap_or(0.0);
    let cut_off = take("GRPC_ERROR");
    let answered = if refusals {
        let served = take("OK");
        if served > 0.0 {
            failures.push(format!(
                "{name}: {served} calls with a bad token were served"
            ));
        }
        take("RATE_LIMITED") + take("SERVICE_TOKEN_INVALID")
    } else {
        take("OK")
    };
    for (outcome, n) in delta.iter().filter(|(_, n)| **n > 0.0) {
        failures.push(format!("{name}: {n} calls ended in {outcome}"));
    }
    let in_flight = f64::from(CONNECTIONS * STREAMS);
    if answered < seen || answered - seen + cut_off > runs * in_flight {
        failures.push(format!(
            "{name}: h2load saw {seen} answers, the server counted {answered} (and {cut_off} \
             cut off)"
        ));
    }
    failures
}
