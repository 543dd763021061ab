//! `crm-bench client <spec.json>`: the load generator for what h2load cannot do, run as a
//! child pinned to the load CPU. It reads a `Spec`, drives the target on one thread, and prints
//! a `Report` as JSON on standard output.
//!
//! - `FixedRate`: ListPrograms in an open loop at a fixed rate over several connections (one
//!   tonic channel = one connection). Latency counts from each call's *scheduled* send time, so
//!   a server that stalls cannot slow the sender and hide its own delay (no coordinated
//!   omission). Optionally, Argon2 logins hammer the same server from a given second on.
//! - `Submit`: SubmitApplication in a closed loop, N calls in flight, every call a distinct
//!   phone and idempotency key.
//! - `Payme`: the Payme webhook over HTTP/1.1 keep-alive connections, closed loop:
//!   CheckPerformTransaction, or CreateTransaction → PerformTransaction cycles, each cycle on
//!   its own pre-created invoice. Every answer must be a Payme success.
//!
//! Closed loops stop sending at the deadline and wait for the calls in flight, so that what was
//! acknowledged is exactly what the server committed.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use crm_server::proto::{
    self, application_service_client::ApplicationServiceClient,
    auth_service_client::AuthServiceClient,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

use crate::http1;

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Spec {
    FixedRate(FixedRate),
    Submit(Submit),
    Payme(Payme),
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FixedRate {
    pub addr: String,
    /// The service token to send (`None` for the bare echo, which checks nothing).
    pub token: Option<String>,
    /// Calls per second.
    pub rate: f64,
    pub channels: usize,
    /// Measurement windows in seconds from the start; the calls scheduled inside each are
    /// reported apart. The run ends with the last window.
    pub windows: Vec<(f64, f64)>,
    pub logins: Option<Logins>,
}

/// `concurrency` Login calls in flight, over and over, from second `from` to the end.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Logins {
    pub login: String,
    pub password: String,
    pub concurrency: usize,
    pub from: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Submit {
    pub addr: String,
    pub token: String,
    pub in_flight: usize,
    pub channels: usize,
    pub warmup: f64,
    pub secs: f64,
    /// Active program codes (from ListPrograms), used in turn.
    pub program_codes: Vec<String>,
    /// Phones are +998 9xx xxx xxx counting up from here.
    pub first_phone: u64,
    /// Idempotency keys are `<prefix>-<n>`; `None` sends none.
    pub key_prefix: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PaymeMode {
    Check,
    Cycle,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Payme {
    pub addr: String,
    pub path: String,
    pub authorization: String,
    pub connections: usize,
    pub warmup: f64,
    pub secs: f64,
    pub amount: i64,
    /// The account field naming the invoice (`order_id` here).
    pub account_field: String,
    pub mode: PaymeMode,
    /// Check: invoices asked about in turn. Cycle: one fresh invoice per cycle.
    pub invoices: Vec<String>,
    /// 8 characters; Payme transaction ids are this plus 16 hex digits (24 in all).
    pub id_prefix: String,
}

/// Latency of the calls of one window, in microseconds (NaN without calls; JSON `null`).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Window {
    pub calls: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p50_us: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99_us: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub max_us: f64,
}

/// serde_json writes NaN as `null`; read it back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Report {
    pub windows: Vec<Window>,
    /// Every success, warm-up included (what the server must have committed).
    pub acked: u64,
    /// Successes completed inside the measured window, per second.
    pub per_s: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub logins_ok: u64,
    pub logins_failed: u64,
    /// Open loop only: calls sent more than 1 ms after their scheduled time (the client
    /// falling behind), and the worst delay.
    pub late_sends: u64,
    pub max_lateness_us: f64,
    /// Open loop only: calls still unanswered `DRAIN` after the end (an overloaded server).
    /// Their latency is counted as at least their age then, never left out.
    pub unanswered: u64,
}

impl Report {
    /// The first (for closed loops, the only) window; empty if there is none.
    pub fn first_window(&self) -> Window {
        self.windows.first().cloned().unwrap_or(Window {
            calls: 0,
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            max_us: f64::NAN,
        })
    }
}

/// How long the open loop waits for the calls in flight after its last window.
const DRAIN: Duration = Duration::from_millis(500);

pub fn run(spec_file: &str) -> anyhow::Result<()> {
    let spec: Spec = serde_json::from_slice(&std::fs::read(spec_file)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async move {
        match spec {
            Spec::FixedRate(s) => fixed_rate(s).await,
            Spec::Submit(s) => submit(s).await,
            Spec::Payme(s) => payme(s).await,
        }
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Errors seen: a count and a few distinct messages.
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Errors {
    fn note(&self, message: impl std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut samples) = self.samples.lock() {
            let message = message.to_string();
            if samples.len() < 5 && !samples.contains(&message) {
                samples.push(message);
            }
        }
    }

    fn fill(&self, report: &mut Report) {
        report.errors = self.count.load(Ordering::Relaxed);
        report.error_samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
    }
}

fn window(mut latencies: Vec<u32>) -> Window {
    latencies.sort_unstable();
    let pick = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        f64::from(latencies[rank - 1])
    };
    Window {
        calls: latencies.len() as u64,
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        max_us: pick(1.0),
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// `n` connections to `addr`.
async fn channels(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(endpoint.connect().await.context("connect")?);
    }
    Ok(out)
}

async fn fixed_rate(s: FixedRate) -> anyhow::Result<Report> {
    if s.rate.is_nan() || s.rate <= 0.0 {
        bail!("rate must be positive, got {}", s.rate);
    }
    let clients: Vec<_> = channels(&s.addr, s.channels)
        .await?
        .into_iter()
        .map(ApplicationServiceClient::new)
        .collect();
    let token: Option<MetadataValue<Ascii>> = s.token.as_deref().map(str::parse).transpose()?;
    let end = s.windows.iter().map(|w| w.1).fold(0.0, f64::max);
    let errors = Arc::new(Errors::default());
    let expected = (s.rate * end * 1.05) as usize;
    let samples: Arc<Mutex<Vec<(f64, u32)>>> = Arc::new(Mutex::new(Vec::with_capacity(expected)));
    let in_flight = Arc::new(AtomicUsize::new(0));
    // One flag per scheduled call: answered (or failed) yet?
    let calls = (s.rate * end).ceil() as usize + 1;
    let done: Arc<Vec<AtomicBool>> = Arc::new((0..calls).map(|_| AtomicBool::new(false)).collect());
    let t0 = Instant::now() + Duration::from_millis(100);
    let (logins_ok, logins_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let logins = s.logins.clone().map(|l| {
        tokio::spawn(logins(
            s.addr.clone(),
            l,
            (t0, t0 + Duration::from_secs_f64(end)),
            (logins_ok.clone(), logins_failed.clone()),
            errors.clone(),
        ))
    });

    let interval = 1.0 / s.rate;
    let (mut sent, mut late, mut max_late) = (0u64, 0u64, Duration::ZERO);
    loop {
        let offset = sent as f64 * interval;
        if offset >= end || sent as usize >= calls {
            break;
        }
        let due = t0 + Duration::from_secs_f64(offset);
        let now = Instant::now();
        if due > now {
            // Sleep through long gaps (the timer is coarse), spin through short ones.
            if due - now > Duration::from_millis(2) {
                tokio::time::sleep(due - now - Duration::from_millis(1)).await;
            } else {
                tokio::task::yield_now().await;
            }
            continue;
        }
        let lateness = now - due;
        if lateness > Duration::from_millis(1) {
            late += 1;
        }
        max_late = max_late.max(lateness);
        let mut client = clients[sent as usize % clients.len()].clone();
        let mut request = Request::new(proto::ListProgramsRequest::default());
        if let Some(token) = &token {
            request
                .metadata_mut()
                .insert("x-service-token", token.clone());
        }
        let (samples, errors, in_flight) = (samples.clone(), errors.clone(), in_flight.clone());
        let done = done.clone();
        let seq = sent as usize;
        in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = client.list_programs(request).await;
            let latency = due.elapsed();
            match result {
                Ok(_) => {
                    if let Ok(mut samples) = samples.lock() {
                        samples.push((offset, micros(latency)));
                    }
                }
                Err(e) => errors.note(format!("ListPrograms: {e}")),
            }
            done[seq].store(true, Ordering::Relaxed);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        sent += 1;
    }
    let cutoff = Instant::now() + DRAIN;
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < cutoff {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Calls still out are counted at their age now: a lower bound of their latency. (No
    // await from here on: nothing can complete meanwhile.) Exiting closes the connections,
    // so the server drops them and the next side starts clean.
    let now = Instant::now();
    let mut samples =
        std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut unanswered = 0;
    for seq in 0..sent as usize {
        if !done[seq].load(Ordering::Relaxed) {
            let offset = seq as f64 * interval;
            let age = now.saturating_duration_since(t0 + Duration::from_secs_f64(offset));
            samples.push((offset, micros(age)));
            unanswered += 1;
        }
    }
    // Logins still waiting for their hash are left to the connection's close; a login task
    // that failed to start is an error.
    if let Some(task) = logins
        && task.is_finished()
    {
        task.await??;
    }
    let windows = s
        .windows
        .iter()
        .map(|&(from, to)| {
            window(
                samples
                    .iter()
                    .filter(|(t, _)| *t >= from && *t < to)
                    .map(|(_, l)| *l)
                    .collect(),
            )
        })
        .collect();
    let answered = samples.len() as u64 - unanswered;
    let mut report = Report {
        windows,
        acked: answered,
        per_s: answered as f64 / end,
        logins_ok: logins_ok.load(Ordering::Relaxed),
        logins_failed: logins_failed.load(Ordering::Relaxed),
        late_sends: late,
        max_lateness_us: max_late.as_micros() as f64,
        unanswered,
        ..Report::default()
    };
    errors.fill(&mut report);
    Ok(report)
}

/// Logins over one connection, `concurrency` in flight, from `t0 + from` until `stop`,
/// counted in `ok` and `failed`.
async fn logins(
    addr: String,
    l: Logins,
    (t0, stop): (Instant, Instant),
    (ok, failed): (Arc<AtomicU64>, Arc<AtomicU64>),
    errors: Arc<Errors>,
) -> anyhow::Result<()> {
    let channel = channels(&addr, 1).await?.remove(0);
    tokio::time::sleep_until((t0 + Duration::from_secs_f64(l.from)).into()).await;
    let mut tasks = Vec::with_capacity(l.concurrency);
    for _ in 0..l.concurrency {
        let mut client = AuthServiceClient::new(channel.clone());
        let (ok, failed, errors) = (ok.clone(), failed.clone(), errors.clone());
        let request = proto::LoginRequest {
            login: l.login.clone(),
            password: l.password.clone(),
        };
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                match client.login(request.clone()).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.note(format!("Login: {e}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// Per-worker tally of a closed loop.
#[derive(Default)]
struct Tally {
    acked: u64,
    latencies: Vec<u32>,
}

fn closed_loop_report(tallies: Vec<Tally>, secs: f64, errors: &Errors) -> Report {
    let acked = tallies.iter().map(|t| t.acked).sum();
    let latencies: Vec<u32> = tallies.into_iter().flat_map(|t| t.latencies).collect();
    let mut report = Report {
        per_s: latencies.len() as f64 / secs,
        windows: vec![window(latencies)],
        acked,
        ..Report::default()
    };
    errors.fill(&mut report);
    report
}

async fn submit(s: Submit) -> anyhow::Result<Report> {
    let clients: Vec<_> = channels(&s.addr, s.channels)
        .await?
        .into_iter()
        .map(ApplicationServiceClient::new)
        .collect();
    let token: MetadataValue<Ascii> = s.token.parse()?;
    let s = Arc::new(s);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let warm_end = Instant::now() + Duration::from_secs_f64(s.warmup);
    let end = warm_end + Duration::from_secs_f64(s.secs);
    let mut tasks = Vec::with_capacity(s.in_flight);
    for worker in 0..s.in_flight {
        let mut client = clients[worker % clients.len()].clone();
        let (s, next, errors, token) = (s.clone(), next.clone(), errors.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let request = submit_request(&s, n, &token)?;
                let sent = Instant::now();
                match client.submit_application(request).await {
                    Ok(_) => {
                        tally.acked += 1;
                        let done = Instant::now();
                        if done >= warm_end && done <= end {
                            tally.latencies.push(micros(done - sent));
                        }
                    }
                    Err(e) => errors.note(format!("SubmitApplication: {e}")),
                }
            }
            anyhow::Ok(tally)
        }));
    }
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await??);
    }
    Ok(closed_loop_report(tallies, s.secs, &errors))
}

fn submit_request(
    s: &Submit,
    n: u64,
    token: &MetadataValue<Ascii>,
) -> anyhow::Result<Request<proto::SubmitApplicationRequest>> {
    let codes = &s.program_codes;
    let message = proto::SubmitApplicationRequest {
        full_name: format!("Bench Applicant {n}"),
        phone: format!("+998{:09}", 900_000_000 + (s.first_phone + n) % 100_000_000),
        language: ["uz", "ru", "en"][(n % 3) as usize].to_owned(),
        program_code: (!codes.is_empty()).then(|| codes[(n as usize) % codes.len()].clone()),
        answers: [("school".to_owned(), "Lyceum 1".to_owned())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-service-token", token.clone());
    if let Some(prefix) = &s.key_prefix {
        request
            .metadata_mut()
            .insert("idempotency-key", format!("{prefix}-{n:012}").parse()?);
    }
    Ok(request)
}

async fn payme(s: Payme) -> anyhow::Result<Report> {
    if s.invoices.is_empty() {
        bail!("no invoices to work on");
    }
    let s = Arc::new(s);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Errors::default());
    let mut connections = Vec::with_capacity(s.connections);
    for _ in 0..s.connections {
        connections.push(http1::Connection::connect(&s.addr).await?);
    }
    let warm_end = Instant::now() + Duration::from_secs_f64(s.warmup);
    let end = warm_end + Duration::from_secs_f64(s.secs);
    let mut tasks = Vec::with_capacity(s.connections);
    for mut conn in connections {
        let (s, next, errors) = (s.clone(), next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let outcome = match s.mode {
                    PaymeMode::Check => check_once(&mut conn, &s, n).await,
                    PaymeMode::Cycle => match s.invoices.get(n) {
                        Some(invoice) => cycle_once(&mut conn, &s, n, invoice).await,
                        None => {
                            errors.note("ran out of pre-created invoices");
                            break;
                        }
                    },
                };
                match outcome {
                    Ok(()) => {
                        tally.acked += 1;
                        let done = Instant::now();
                        if done >= warm_end && done <= end {
                            tally.latencies.push(micros(done - started));
                        }
                    }
                    Err(Failure::Answer(e)) => errors.note(e),
                    Err(Failure::Connection(e)) => {
                        errors.note(format!("connection lost: {e:#}"));
                        break;
                    }
                }
            }
            tally
        }));
    }
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await?);
    }
    Ok(closed_loop_report(tallies, s.secs, &errors))
}

enum Failure {
    /// The server answered, but not with a Payme success.
    Answer(String),
    /// The connection broke: this worker stops.
    Connection(anyhow::Error),
}

/// One JSON-RPC call; the `result` of a Payme success, or why it was not one.
async fn rpc(
    conn: &mut http1::Connection,
    s: &Payme,
    method: &str,
    params: String,
    id: usize,
) -> Result<Value, Failure> {
    let body = format!(r#"{{"method":"{method}","params":{params},"id":{id}}}"#);
    let headers = [
        ("authorization", s.authorization.as_str()),
        ("content-type", "text/json; charset=UTF-8"),
    ];
    let (status, bytes) = conn
        .post(&s.path, &headers, body.as_bytes())
        .await
        .map_err(Failure::Connection)?;
    if status != 200 {
        return Err(Failure::Answer(format!("{method}: HTTP {status}")));
    }
    let mut answer: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::Answer(format!("{method}: unreadable answer: {e}")))?;
    if let Some(error) = answer.get("error").filter(|e| !e.is_null()) {
        return Err(Failure::Answer(format!("{method}: {error}")));
    }
    if answer.get("id") != Some(&Value::from(id)) {
        return Err(Failure::Answer(format!("{method}: the id was not echoed")));
    }
    Ok(answer["result"].take())
}

async fn check_once(conn: &mut http1::Connection, s: &Payme, n: usize) -> Result<(), Failure> {
    let invoice = &s.invoices[n % s.invoices.len()];
    let params = format!(
        r#"{{"amount":{},"account":{{"{}":"{invoice}"}}}}"#,
        s.amount, s.account_field
    );
    let result = rpc(conn, s, "CheckPerformTransaction", params, n).await?;
    if result["allow"] != Value::Bool(true) {
        return Err(Failure::Answer(format!(
            "CheckPerformTransaction: {result}"
        )));
    }
    Ok(())
}

async fn cycle_once(
    conn: &mut http1::Connection,
    s: &Payme,
    n: usize,
    invoice: &str,
) -> Result<(), Failure> {
    let id = format!("{}{n:016x}", s.id_prefix);
    let params = format!(
        r#"{{"id":"{id}","time":{},"amount":{},"account":{{"{}":"{invoice}"}}}}"#,
        chrono::Utc::now().timestamp_millis(),
        s.amount,
        s.account_field
    );
    let created = rpc(conn, s, "CreateTransaction", params, 2 * n).await?;
    if created["state"] != 1 {
        return Err(Failure::Answer(format!("CreateTransaction: {created}")));
    }
    let performed = rpc(
        conn,
        s,
        "PerformTransaction",
        format!(r#"{{"id":"{id}"}}"#),
        2 * n + 1,
    )
    .await?;
    if performed["state"] != 2 {
        return Err(Failure::Answer(format!("PerformTransaction: {performed}")));
    }
    Ok(())
}
