//! `crm-bench`: performance as ratios measured in one run (see bench.md), production path
//! against a baseline on the same machine, alternating short rounds.
//!
//! ```text
//! cargo build --release && target/release/crm-bench all      # p1 p2 p6 p8
//! target/release/crm-bench p1 --rounds 6 --secs 10
//! ```
//!
//! Needs `h2load` (Debian `nghttp2-client`) and `taskset`. The load generator is pinned to CPU 0,
//! the server under test to CPU 1 with one tokio worker. Results are printed as a table and
//! written as JSON under `target/bench/`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, bail};
use crm_server::proto::{self, application_service_server::ApplicationService};
use prost::Message;
use tonic::{Request, Response, Status};

const TOKEN: &str = "bench-service-token-0123456789abcdef0123456789abcdef";
const LIST_PROGRAMS: &str = "/crm.v1.ApplicationService/ListPrograms";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("baseline") {
        return baseline(args.get(1).context("baseline needs the response file")?);
    }
    let option = |name: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args.get(i + 1).context("a value")?.parse()?),
            None => Ok(default),
        }
    };
    let plan = Plan {
        rounds: option("--rounds", 6)? as usize,
        secs: option("--secs", 10)?,
    };
    let scenario = args.first().map(String::as_str).unwrap_or("all");
    let scenarios: Vec<&str> = match scenario {
        "all" => vec!["p1", "p2", "p6", "p8"],
        one @ ("p1" | "p2" | "p6" | "p8") => vec![one],
        other => bail!("unknown scenario {other:?}: p1, p2, p6, p8 or all"),
    };
    for tool in ["h2load", "taskset"] {
        if Command::new(tool).arg("--help").output().is_err() {
            bail!("{tool} is required (Debian: apt-get install nghttp2-client util-linux)");
        }
    }
    let work = tempfile_dir()?;
    let mut results = Vec::new();
    for s in scenarios {
        let result = match s {
            "p1" => p1(&plan, &work)?,
            "p2" => p2(&plan, &work)?,
            "p6" => p6(&plan, &work)?,
            _ => p8(&work)?,
        };
        println!("{}", result.line());
        results.push(result);
    }
    let out = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!(
        "results-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    ));
    let json: Vec<_> = results.iter().map(Outcome::json).collect();
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!("\nwritten to {}", file.display());
    Ok(())
}

struct Plan {
    rounds: usize,
    secs: u64,
}

/// One goal's measurement: the median ratio over rounds, the worst round, and absolutes.
struct Outcome {
    goal: &'static str,
    what: &'static str,
    must_reach: f64,
    higher_is_better: bool,
    ratios: Vec<f64>,
    absolutes: String,
}

impl Outcome {
    fn median(&self) -> f64 {
        let mut r = self.ratios.clone();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn worst(&self) -> f64 {
        let pick = if self.higher_is_better {
            f64::min
        } else {
            f64::max
        };
        self.ratios.iter().copied().reduce(pick).unwrap_or(f64::NAN)
    }

    fn met(&self) -> bool {
        if self.higher_is_better {
            self.median() >= self.must_reach
        } else {
            self.median() <= self.must_reach
        }
    }

    fn line(&self) -> String {
        let cmp = if self.higher_is_better { "≥" } else { "≤" };
        format!(
            "{:<4} {:<58} median {:>6.3}  worst {:>6.3}  must {cmp} {:<5} {}  | {}",
            self.goal,
            self.what,
            self.median(),
            self.worst(),
            self.must_reach,
            if self.met() { "MET " } else { "MISSED" },
            self.absolutes
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "goal": self.goal, "what": self.what, "median_ratio": self.median(),
            "worst_ratio": self.worst(), "must_reach": self.must_reach, "met": self.met(),
            "ratios": self.ratios, "absolutes": self.absolutes,
        })
    }
}

/// A process under test, pinned to CPU 1, found by the `local_addr` it logs.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["local_addr"].as_str()?.parse::<SocketAddr>().ok());
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .context("the process never said where it listens")?;
        Ok(Self { child, addr })
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        Ok(ticks / 100.0)
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("VmRSS")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib / 1024.0)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The real server, release build next to this binary, on a fresh SQLite database.
fn server(work: &Path, extra: &[(&str, &str)]) -> anyhow::Result<Process> {
    let bin = std::env::current_exe()?.with_file_name("crm-server");
    let dir = work.join(format!("server-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"])
        .arg(&bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/crm.db?mode=rwc", dir.display()),
        )
        .env("CRM_DATA_DIR", &dir)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,crm_server::startup=info")
        .env("TOKIO_WORKER_THREADS", "1")
        .env(
            "SERVICE_TOKEN_BENCH_HASH",
            hex::encode(crm_server::auth::service_token::sha256(TOKEN)),
        )
        .env("RATE_LIMIT_PER_MINUTE", "4000000000");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Process::spawn(cmd)
}

/// The baseline: a bare tonic server answering ListPrograms with the same bytes, no layers.
fn baseline_process(work: &Path, response: &[u8]) -> anyhow::Result<Process> {
    let file = work.join("list_programs.bin");
    std::fs::write(&file, response)?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"])
        .arg(std::env::current_exe()?)
        .arg("baseline")
        .arg(&file)
        .env("TOKIO_WORKER_THREADS", "1");
    Process::spawn(cmd)
}

struct Echo(proto::ListProgramsResponse);

#[tonic::async_trait]
impl ApplicationService for Echo {
    type WatchApplicationsStream = futures::stream::Empty<Result<proto::ApplicationEvent, Status>>;

    async fn list_programs(
        &self,
        _: Request<proto::ListProgramsRequest>,
    ) -> Result<Response<proto::ListProgramsResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }
    async fn submit_application(
        &self,
        _: Request<proto::SubmitApplicationRequest>,
    ) -> Result<Response<proto::Application>, Status> {
        Err(Status::unimplemented("baseline"))
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

fn baseline(response_file: &str) -> anyhow::Result<()> {
    let response = proto::ListProgramsResponse::decode(std::fs::read(response_file)?.as_slice())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        eprintln!(
            "{}",
            serde_json::json!({"local_addr": listener.local_addr()?.to_string()})
        );
        tonic::transport::Server::builder()
            .add_service(
                proto::application_service_server::ApplicationServiceServer::new(Echo(response)),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await?;
        Ok(())
    })
}

/// The catalog as the real server answers it (the baseline answers the same bytes).
fn fetch_catalog(server: &Process) -> anyhow::Result<Vec<u8>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client =
            proto::application_service_client::ApplicationServiceClient::connect(server.url(""))
                .await?;
        let mut request = Request::new(proto::ListProgramsRequest::default());
        request
            .metadata_mut()
            .insert("x-service-token", TOKEN.parse()?);
        Ok(client
            .list_programs(request)
            .await?
            .into_inner()
            .encode_to_vec())
    })
}

/// One h2load run against `url`: the requests answered.
struct Load {
    succeeded: u64,
}

fn h2load(
    work: &Path,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    secs: u64,
    clients: u32,
    streams: u32,
) -> anyhow::Result<Load> {
    let file = work.join("body.bin");
    std::fs::write(&file, frame(body))?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", "h2load"])
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
    let succeeded = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find(|p| p.contains("succeeded")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("h2load output: {text}"))?;
    Ok(Load { succeeded })
}

/// A gRPC data frame: flag 0, big-endian length, message.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

const GRPC: (&str, &str) = ("content-type", "application/grpc");
const TE: (&str, &str) = ("te", "trailers");

/// Requests per server CPU-second over one round (after a 2 s warm-up).
fn efficiency(
    work: &Path,
    p: &Process,
    path: &str,
    headers: &[(&str, &str)],
    secs: u64,
) -> anyhow::Result<(f64, u64)> {
    let url = p.url(path);
    h2load(work, &url, headers, &[], 2, 4, 16)?;
    let cpu_before = p.cpu_seconds()?;
    let load = h2load(work, &url, headers, &[], secs, 4, 16)?;
    let cpu = p.cpu_seconds()? - cpu_before;
    Ok((load.succeeded as f64 / cpu.max(0.01), load.succeeded))
}

/// Scrapes a counter from the server's `/metrics` (correctness counters).
fn counter(p: &Process, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(p.addr)?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nhost: bench\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let wanted = |line: &str| {
        line.starts_with(name)
            && labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
    };
    Ok(text
        .lines()
        .filter(|l| wanted(l))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

fn p1(plan: &Plan, work: &Path) -> anyhow::Result<Outcome> {
    let prod = server(work, &[])?;
    let base = baseline_process(work, &fetch_catalog(&prod)?)?;
    let auth = [GRPC, TE, ("x-service-token", TOKEN)];
    let ok_before = counter(
        &prod,
        "crm_requests_total",
        &[("method", LIST_PROGRAMS), ("outcome", "OK")],
    )?;
    let (mut ratios, mut served, mut last) = (Vec::new(), 0u64, (0.0, 0.0));
    for _ in 0..plan.rounds {
        let (ours, n) = efficiency(work, &prod, LIST_PROGRAMS, &auth, plan.secs)?;
        let (theirs, _) = efficiency(work, &base, LIST_PROGRAMS, &[GRPC, TE], plan.secs)?;
        served += n;
        ratios.push(ours / theirs);
        last = (ours, theirs);
    }
    let ok = counter(
        &prod,
        "crm_requests_total",
        &[("method", LIST_PROGRAMS), ("outcome", "OK")],
    )? - ok_before;
    if ok < served as f64 {
        bail!("P1: h2load saw {served} answers but the server counted {ok} OK");
    }
    Ok(Outcome {
        goal: "P1",
        what: "ListPrograms (token, quotas on) vs bare echo, req/CPU-s",
        must_reach: 0.90,
        higher_is_better: true,
        ratios,
        absolutes: format!(
            "last round {:.0} vs {:.0} req/CPU-s; {ok} OK counted",
            last.0, last.1
        ),
    })
}

fn p2(plan: &Plan, work: &Path) -> anyhow::Result<Outcome> {
    // Default quotas: a flood from one address is refused for rate after its first minute's
    // worth, without touching the database.
    let prod = server(work, &[("RATE_LIMIT_PER_MINUTE", "60")])?;
    let catalog = fetch_catalog(&prod)?;
    let base = baseline_process(work, &catalog)?;
    let bad = [GRPC, TE, ("x-service-token", "not-a-valid-token")];
    let (mut ratios, mut last) = (Vec::new(), (0.0, 0.0));
    for _ in 0..plan.rounds {
        let (ours, _) = efficiency(work, &prod, LIST_PROGRAMS, &bad, plan.secs)?;
        let (theirs, _) = efficiency(work, &base, LIST_PROGRAMS, &[GRPC, TE], plan.secs)?;
        ratios.push(ours / theirs);
        last = (ours, theirs);
    }
    let limited = counter(
        &prod,
        "crm_requests_total",
        &[("method", LIST_PROGRAMS), ("outcome", "RATE_LIMITED")],
    )?;
    let audited = counter(
        &prod,
        "crm_requests_total",
        &[
            ("method", LIST_PROGRAMS),
            ("outcome", "SERVICE_TOKEN_INVALID"),
        ],
    )?;
    Ok(Outcome {
        goal: "P2",
        what: "refusals (bad token, then over quota) vs bare echo, req/CPU-s",
        must_reach: 1.0,
        higher_is_better: true,
        ratios,
        absolutes: format!(
            "last round {:.0} vs {:.0} req/CPU-s; {limited} RATE_LIMITED, {audited} SERVICE_TOKEN_INVALID (audited)",
            last.0, last.1
        ),
    })
}

fn p6(plan: &Plan, work: &Path) -> anyhow::Result<Outcome> {
    let prod = server(work, &[])?;
    let native = [GRPC, TE, ("x-service-token", TOKEN)];
    let web = [
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
        ("x-service-token", TOKEN),
    ];
    let (mut ratios, mut last) = (Vec::new(), (0.0, 0.0));
    for _ in 0..plan.rounds {
        let (w, _) = efficiency(work, &prod, LIST_PROGRAMS, &web, plan.secs)?;
        let (n, _) = efficiency(work, &prod, LIST_PROGRAMS, &native, plan.secs)?;
        ratios.push(w / n);
        last = (w, n);
    }
    Ok(Outcome {
        goal: "P6",
        what: "gRPC-web (binary) vs native gRPC, ListPrograms, req/CPU-s",
        must_reach: 0.85,
        higher_is_better: true,
        ratios,
        absolutes: format!("last round {:.0} vs {:.0} req/CPU-s", last.0, last.1),
    })
}

fn p8(work: &Path) -> anyhow::Result<Outcome> {
    let prod = server(work, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = prod.rss_mib()?;
    let base = baseline_process(work, &fetch_catalog(&prod)?)?;
    let auth = [GRPC, TE, ("x-service-token", TOKEN)];
    // 256 in flight: 4 connections × 64 streams, sampled mid-run.
    let under_load = |p: &Process, headers: &[(&str, &str)]| -> anyhow::Result<f64> {
        let url = p.url(LIST_PROGRAMS);
        std::thread::scope(|s| {
            let load = s.spawn(|| h2load(work, &url, headers, &[], 6, 4, 64));
            std::thread::sleep(Duration::from_secs(4));
            let rss = p.rss_mib();
            let _ = load.join();
            rss
        })
    };
    let ours = under_load(&prod, &auth)?;
    let theirs = under_load(&base, &[GRPC, TE])?;
    Ok(Outcome {
        goal: "P8",
        what: "RSS growth at 256 in flight vs bare echo's (MiB over)",
        must_reach: 48.0,
        higher_is_better: false,
        ratios: vec![ours - theirs],
        absolutes: format!(
            "idle {idle:.1} MiB (must ≤ 30); at 256 in flight {ours:.1} vs echo {theirs:.1} MiB"
        ),
    })
}
