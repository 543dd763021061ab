//! The processes of a run: the real server and the baselines, each pinned to the server CPU,
//! found by the `local_addr` they log, and measured through `/proc` (CPU time, RSS). What
//! they log at WARN or ERROR level is tallied: a server complaining under load is a finding.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The load generators (h2load, wrk-like clients, this orchestrator) run here...
pub const LOAD_CPU: &str = "0";
/// ...and whatever is under test here, so the two never share a core.
pub const SERVER_CPU: &str = "1";

/// The raw service token of the bench's service (`SERVICE_TOKEN_BENCH_HASH`): service `bench`.
pub const TOKEN: &str = "bench-service-token-0123456789abcdef0123456789abcdef";
/// The source the server writes for the bench's submits.
pub const SERVICE: &str = "bench";
/// Database pool size of every server and baseline: 2 × the machine's 2 cores, set explicitly.
pub const POOL_SIZE: u32 = 4;
/// Payme credentials of the bench's servers (not a real cashbox).
pub const PAYME_MERCHANT_ID: &str = "587f72c72cac0d162c722ae2";
pub const PAYME_KEY: &str = "bench-payme-key";
pub const PAYME_LOGIN: &str = "Paycom";

/// `RUST_LOG` of every server (`--rust-log`); `crm_server::startup=info` is always added, as
/// the bench finds a server by the address it logs at start.
static RUST_LOG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
pub const DEFAULT_RUST_LOG: &str = "warn";

pub fn set_rust_log(filter: &str) {
    let _ = RUST_LOG.set(filter.to_owned());
}

pub fn rust_log() -> String {
    let base = RUST_LOG.get().map_or(DEFAULT_RUST_LOG, String::as_str);
    format!("{base},crm_server::startup=info")
}

/// `--baselines-like-server`: the gRPC baselines (echo, raw insert) run on the server's own
/// runtime and sockets (`crm_server::startup::runtime`, `transport::socket`) instead of
/// tokio's and tonic's defaults, which shows how much of P1 those two settings account for.
pub const BASELINES_LIKE_SERVER: &str = "CRM_BENCH_BASELINES_LIKE_SERVER";
static LIKE_SERVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_baselines_like_server() {
    LIKE_SERVER.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Pins this process (and the threads it starts afterwards) to the load CPU.
pub fn pin_self() -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-p", "-c", LOAD_CPU, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset")?;
    if !status.success() {
        bail!("taskset -p failed: {status}");
    }
    Ok(())
}

/// WARN and ERROR lines a process wrote (its logs are JSON lines; anything else is kept raw).
#[derive(Default)]
pub struct LogTally {
    pub errors: u64,
    pub warnings: u64,
    pub samples: Vec<String>,
    tail: VecDeque<String>,
}

impl LogTally {
    fn note(&mut self, line: &str, json: Option<&serde_json::Value>) {
        // A panic is two raw lines: "thread … panicked at <file>:" and the message.
        if self.tail.back().is_some_and(|l| l.contains("panicked at"))
            && let Some(last) = self.samples.last_mut()
            && last.contains("panicked at")
        {
            last.push(' ');
            last.push_str(line);
        }
        self.tail.push_back(line.to_owned());
        if self.tail.len() > 20 {
            self.tail.pop_front();
        }
        let Some(json) = json else {
            if line.contains("panicked at") {
                self.errors += 1;
                if self.samples.len() < 5 {
                    self.samples.push(line.to_owned());
                }
            }
            return;
        };
        let level = json["level"].as_str().unwrap_or("");
        match level {
            "ERROR" => self.errors += 1,
            "WARN" => self.warnings += 1,
            _ => return,
        }
        let message = json["message"]
            .as_str()
            .or_else(|| json["fields"]["message"].as_str())
            .map(|m| format!("{level} {m}"))
            .unwrap_or_else(|| line.to_owned());
        if self.samples.len() < 5 && !self.samples.contains(&message) {
            self.samples.push(message);
        }
    }
}

/// A process under test.
pub struct Process {
    pub name: String,
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<LogTally>>,
}

impl Process {
    /// Starts `cmd` and waits until it logs its `local_addr` (a JSON line on standard error).
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = Arc::new(Mutex::new(LogTally::default()));
        let (tx, rx) = mpsc::channel();
        let tally = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let json = serde_json::from_str::<serde_json::Value>(&line).ok();
                let addr = json
                    .as_ref()
                    .and_then(|v| v["local_addr"].as_str()?.parse::<SocketAddr>().ok());
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
                if let Ok(mut tally) = tally.lock() {
                    tally.note(&line, json.as_ref());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => break addr,
                Err(_) => {
                    let exited = child.try_wait()?;
                    if exited.is_some() || Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        std::thread::sleep(Duration::from_millis(100));
                        let tail = logs
                            .lock()
                            .map(|t| t.tail.iter().cloned().collect::<Vec<_>>().join("\n"))
                            .unwrap_or_default();
                        bail!(
                            "{name} never said where it listens ({exited:?}); its last words:\n{tail}"
                        );
                    }
                }
            }
        };
        Ok(Self {
            name: name.to_owned(),
            child,
            addr,
            logs,
        })
    }

    /// User + system CPU seconds so far (all threads).
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("stat")?
            .1
            .split_whitespace()
            .collect();
        let field = |i: usize| -> anyhow::Result<f64> {
            Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
        };
        Ok((field(11)? + field(12)?) / 100.0)
    }

    pub fn rss_mib(&self) -> anyhow::Result<f64> {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What it logged at WARN/ERROR so far, or `None` if nothing.
    pub fn log_summary(&self) -> Option<String> {
        let tally = self.logs.lock().ok()?;
        (tally.errors + tally.warnings > 0).then(|| {
            format!(
                "{}: {} ERROR, {} WARN lines; e.g. {}",
                self.name,
                tally.errors,
                tally.warnings,
                tally.samples.join(" | ")
            )
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh folder for the run's files (databases, request bodies, client specs).
pub fn work_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("crm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} not found: build both binaries (cargo build --release --bins)",
            bin.display()
        );
    }
    Ok(bin)
}

/// This binary, pinned to `cpu`, for the baselines and the client.
pub fn bench_command(cpu: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu]).arg(std::env::current_exe()?);
    if LIKE_SERVER.load(std::sync::atomic::Ordering::Relaxed) {
        cmd.env(BASELINES_LIKE_SERVER, "1");
    }
    Ok(cmd)
}

/// A `crm-server` of the bench: its own data folder and database, one tokio worker, the
/// bench's service token, a pool of `POOL_SIZE`, quotas on but far above any load (unless
/// `extra` says otherwise), JSON logs filtered by `--rust-log` (WARN by default).
pub struct ServerHome {
    pub name: String,
    pub dir: PathBuf,
    pub database_url: String,
    env: Vec<(String, String)>,
}

impl ServerHome {
    /// `database_url` `None`: a fresh SQLite file in the server's own folder.
    pub fn new(
        work: &Path,
        name: &str,
        database_url: Option<String>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        let database_url =
            database_url.unwrap_or_else(|| format!("sqlite://{}/crm.db?mode=rwc", dir.display()));
        let mut env: Vec<(String, String)> = [
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("DATABASE_URL", database_url.clone()),
            ("CRM_DATA_DIR", dir.display().to_string()),
            ("LISTEN_ADDR", "127.0.0.1:0".into()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", rust_log()),
            ("TOKIO_WORKER_THREADS", "1".into()),
            (
                "SERVICE_TOKEN_BENCH_HASH",
                hex::encode(crm_server::auth::service_token::sha256(TOKEN)),
            ),
            ("RATE_LIMIT_PER_MINUTE", "4000000000".into()),
            ("DATABASE_POOL_SIZE", POOL_SIZE.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Ok(Self {
            name: name.to_owned(),
            dir,
            database_url,
            env,
        })
    }

    fn command(&self, cpu: Option<&str>) -> anyhow::Result<Command> {
        let bin = sibling("crm-server")?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", cpu]).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.env_clear().current_dir(&self.dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Runs an operator command (`crm-server user create …`) on this server's database and
    /// returns what it printed.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut cmd = self.command(None)?;
        cmd.args(args).envs(env.iter().copied());
        let out = cmd.output().context("crm-server cli")?;
        if !out.status.success() {
            bail!(
                "crm-server {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts the server on the server CPU; it applies its migrations first.
    pub fn serve(&self) -> anyhow::Result<Process> {
        Process::spawn(&self.name, self.command(Some(SERVER_CPU))?)
    }
}
