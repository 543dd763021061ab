//! The `crm-server` binary itself: CLI output, configuration errors, logs that never show a
//! token, and a clean exit on SIGTERM.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::helpers::sha256_hex;

const BIN: &str = env!("CARGO_BIN_EXE_crm-server");

/// A command with a clean environment pointing at a SQLite file in `dir`.
fn crm(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/crm.db?mode=rwc", dir.display()),
        )
        .env("CRM_DATA_DIR", dir)
        .env("LISTEN_ADDR", "127.0.0.1:0");
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn token_commands_print_only_what_they_promise() {
    let dir = tempfile::tempdir().expect("dir");
    let (code, stdout, _) =
        run(crm(dir.path()).args(["token", "create", "bot1", "--expires-in-days", "30"]));
    assert_eq!(code, 0);
    let raw = stdout.strip_suffix('\n').expect("one line");
    assert_eq!(raw.len(), 64);
    assert!(
        raw.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );

    let (code, stdout, _) = run(crm(dir.path()).args(["token", "hash", raw]));
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("{}\n", sha256_hex(raw)));

    let mut child = crm(dir.path())
        .args(["token", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"from-stdin\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", sha256_hex("from-stdin"))
    );

    let (code, stdout, _) = run(crm(dir.path()).args(["token", "list"]));
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "id",
            "service_name",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at"
        ]
    );
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(fields.len(), 6);
    assert_eq!(fields[1], "bot1");
    assert_ne!(fields[3], "-", "expires_at is set");
    assert_eq!(&fields[4..], ["-", "-"]);
    assert!(!stdout.contains(raw), "the list never shows the token");

    let id = fields[0].to_owned();
    let (code, _, _) = run(crm(dir.path()).args(["token", "revoke", &id]));
    assert_eq!(code, 0);
    let (_, stdout, _) = run(crm(dir.path()).args(["token", "list"]));
    let revoked: Vec<&str> = stdout
        .lines()
        .nth(1)
        .expect("row")
        .split_whitespace()
        .collect();
    assert_ne!(revoked[5], "-", "revoked_at is set");

    let (code, _, stderr) = run(crm(dir.path()).args(["token", "create", "Not-A-Name"]));
    assert_ne!(code, 0);
    assert!(stderr.contains("service name"), "{stderr}");
}

#[test]
fn bad_configuration_exits_non_zero_with_a_one_line_reason() {
    let dir = tempfile::tempdir().expect("dir");
    for (var, value, expected) in [
        ("ENVIRONMENT", "production", "SECRET_KEY"),
        ("LISTEN_ADDR", "not-an-address", "LISTEN_ADDR"),
        ("SERVICE_TOKEN_BOT1_HASH", "xyz", "SERVICE_TOKEN_BOT1_HASH"),
    ] {
        let (code, stdout, stderr) = run(crm(dir.path()).env(var, value).arg("migrate"));
        assert_ne!(code, 0, "{var}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn migrate_creates_the_database_and_can_run_twice() {
    let dir = tempfile::tempdir().expect("dir");
    for _ in 0..2 {
        let (code, stdout, stderr) = run(crm(dir.path()).arg("migrate"));
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.is_empty());
    }
    assert!(dir.path().join("crm.db").exists());
}

/// Collects the server's standard error on a thread; returns the buffer and the thread.
pub(crate) fn capture_stderr(
    child: &mut Child,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().expect("log");
            log.push_str(&line);
            log.push('\n');
        }
    });
    (log, reader)
}

/// Waits until the server logs where it listens (JSON logs, `local_addr`).
pub(crate) fn wait_for_port(log: &Mutex<String>) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = log.lock().expect("log").lines().find_map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).ok()?;
            json["local_addr"]
                .as_str()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        });
        if let Some(port) = found {
            return port;
        }
        assert!(
            Instant::now() < deadline,
            "the server never logged its address"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_never_logs_tokens_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, stdout, _) = run(crm(dir.path()).args(["token", "create", "bot1"]));
    let db_token = stdout.trim().to_owned();
    let env_token = "environment-configured-raw-token-for-bot2-000000";
    let wrong_token = "this-is-a-wrong-token-that-must-not-be-logged-either";

    let mut child = crm(dir.path())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .env("SERVICE_TOKEN_BOT2_HASH", sha256_hex(env_token))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("server starts");
    let (log, reader) = capture_stderr(&mut child);
    let port = wait_for_port(&log);
    let http = reqwest::Client::new();
    let url = |service: &str| format!("http://127.0.0.1:{port}/api/v1/{service}/application");
    let body = serde_json::json!({"full_name": "Nodira Saidova", "phone": "+998911234567", "language": "uz"});
    for (service, token, expected) in [
        ("bot1", db_token.as_str(), 201),
        ("bot2", env_token, 201),
        ("bot1", wrong_token, 403),
    ] {
        let res = http
            .post(url(service))
            .header("X-SERVICE-TOKEN", token)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), expected);
    }

    let started = Instant::now();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no exit within the grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "clean exit after SIGTERM");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    assert!(
        stdout.is_empty(),
        "serve prints nothing on stdout: {stdout}"
    );

    reader.join().expect("log reader");
    let log = log.lock().expect("log").clone();
    assert!(log.contains("shutting down"), "{log}");
    for secret in [db_token.as_str(), env_token, wrong_token] {
        assert!(!log.contains(secret), "a token reached the log");
    }
    // Nor any file the server wrote (database, WAL).
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("file");
        let text = String::from_utf8_lossy(&bytes);
        for secret in [db_token.as_str(), env_token, wrong_token] {
            assert!(!text.contains(secret), "a raw token reached a file");
        }
    }
}

#[test]
fn user_create_prints_the_new_id_and_refuses_bad_input() {
    let dir = tempfile::tempdir().expect("dir");
    // A port already taken must not matter: the command starts no server.
    let _taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = _taken.local_addr().expect("addr").to_string();
    let (code, stdout, stderr) = run(crm(dir.path())
        .env("LISTEN_ADDR", &taken)
        .env("CRM_PASSWORD", "first-admin-password")
        .args([
            "user",
            "create",
            "--role",
            "admin",
            "--email",
            "Admin@Example.uz",
            "--full-name",
            "First Admin",
        ]));
    assert_eq!(code, 0, "{stderr}");
    let id = stdout.strip_suffix('\n').expect("one line");
    uuid::Uuid::parse_str(id).expect("prints the new user's id");
    assert!(!stderr.contains("first-admin-password"));

    // The password can come from standard input instead.
    let mut child = crm(dir.path())
        .args([
            "user",
            "create",
            "--role",
            "staff",
            "--phone",
            "+998901234000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"staff-password-42\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (args, why) in [
        (
            vec![
                "user",
                "create",
                "--role",
                "root",
                "--email",
                "x@example.uz",
            ],
            "unknown role",
        ),
        (vec!["user", "create", "--role", "admin"], "no login"),
        (
            vec![
                "user",
                "create",
                "--role",
                "admin",
                "--email",
                "admin@example.uz",
            ],
            "email taken",
        ),
    ] {
        let (code, stdout, _) = run(crm(dir.path())
            .env("CRM_PASSWORD", "another-password")
            .args(&args));
        assert_ne!(code, 0, "{why}");
        assert!(stdout.is_empty(), "{why}");
    }
    let (code, _, stderr) = run(crm(dir.path()).env("CRM_PASSWORD", "short").args([
        "user",
        "create",
        "--role",
        "admin",
        "--email",
        "b@example.uz",
    ]));
    assert_ne!(code, 0);
    assert!(stderr.contains("password"), "{stderr}");
}

/// sqlx asks `tracing::enabled!` about every PostgreSQL notice (migrations raise some); a
/// subscriber whose only filter is a per-layer one drops the next event after such a refused
/// query, which here was the line saying where the server listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_at_warn_the_server_still_says_where_it_listens() {
    let Some(pg) = crate::helpers::PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let (code, _, stderr) = run(crm(dir.path()).env("DATABASE_URL", &pg.url).arg("migrate"));
    assert_eq!(code, 0, "{stderr}");
    let mut child = crm(dir.path())
        .env("DATABASE_URL", &pg.url)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,crm_server::startup=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("server starts");
    let (log, reader) = capture_stderr(&mut child);
    let port = wait_for_port(&log);
    assert!(port > 0);
    let _ = child.kill();
    let _ = child.wait();
    reader.join().expect("log reader");
}
