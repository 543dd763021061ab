//! The command line: `serve` (the default), `migrate`, and service-token management.
//! Standard output carries only what a command prints; logs go to standard error.

use std::io::{BufRead, Write};

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use clap::{Parser, Subcommand};
use secrecy::SecretString;

use crate::{
    audit::Actor,
    auth::{
        Role, ServiceName, ServiceTokenStore,
        accounts::{self, NewUser},
        password::Passwords,
        service_token::RawToken,
    },
    config::Settings,
    db,
    startup::Application,
};

#[derive(Debug, Parser)]
#[command(name = "crm-server", version, about = "Admissions CRM backend")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then serve (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Service tokens for the bots.
    #[command(subcommand)]
    Token(TokenCommand),
    /// People who sign in.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password comes from CRM_PASSWORD, else from standard input.
    /// Prints the new user's id.
    Create {
        #[arg(long, value_parser = ["admin", "staff", "applicant"])]
        role: String,
        #[arg(long, required_unless_present = "phone")]
        email: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        #[arg(long)]
        full_name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints the raw token (64 hex characters) alone on one line.
    Create {
        /// The service name, e.g. bot1 ([a-z][a-z0-9_]{0,31}).
        service: String,
        #[arg(long)]
        expires_in_days: Option<u32>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Print the SHA-256 hex of RAW (or of standard input) for SERVICE_TOKEN_<NAME>_HASH.
    Hash { raw: Option<String> },
    /// List tokens: id service_name created_at expires_at last_used_at revoked_at.
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

/// `token hash` needs neither configuration nor a database.
pub fn hash_command(raw: Option<String>) -> anyhow::Result<()> {
    let raw = match raw {
        Some(raw) => raw,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read standard input")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    anyhow::ensure!(!raw.is_empty(), "nothing to hash: pass RAW or pipe it in");
    println!("{}", hex::encode(crate::auth::service_token::sha256(&raw)));
    Ok(())
}

pub async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(settings).await,
        Command::Migrate => {
            let db = db::connect(&settings)
                .await
                .context("cannot connect to the database")?;
            db::migrate(&db).await.context("cannot apply migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Token(TokenCommand::Hash { raw }) => hash_command(raw),
        Command::Token(token) => token_command(token, settings).await,
        Command::User(user) => user_command(user, settings).await,
    }
}

async fn user_command(command: UserCommand, settings: Settings) -> anyhow::Result<()> {
    let UserCommand::Create {
        role,
        email,
        phone,
        full_name,
    } = command;
    let role = Role::parse(&role).context("role must be admin, staff or applicant")?;
    let password = match std::env::var("CRM_PASSWORD").ok().filter(|p| !p.is_empty()) {
        Some(password) => password,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let full_name = full_name
        .or_else(|| email.clone())
        .or_else(|| phone.clone())
        .unwrap_or_default();
    // No server is started (one may already hold the port): just the database.
    let db = db::connect(&settings)
        .await
        .context("cannot connect to the database")?;
    db::migrate(&db).await.context("cannot apply migrations")?;
    let passwords = Passwords::new()
        .await
        .map_err(|e| anyhow::anyhow!(e.public_detail()))?;
    let new = NewUser {
        phone,
        email,
        password: SecretString::from(password),
        full_name,
        role,
    };
    let user = accounts::create_user(&db, &passwords, new, &Actor::operator())
        .await
        .map_err(|e| anyhow::anyhow!(e.public_detail()))?;
    tracing::info!(id = %user.id, role = role.as_str(), "user created");
    println!("{}", user.id);
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown_signal()).await
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

async fn token_command(command: TokenCommand, settings: Settings) -> anyhow::Result<()> {
    let db = db::connect(&settings)
        .await
        .context("cannot connect to the database")?;
    db::migrate(&db).await.context("cannot apply migrations")?;
    let store = ServiceTokenStore::load(db, Vec::new()).await?;
    let actor = Actor::operator();
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Create {
            service,
            expires_in_days,
            description,
        } => {
            let service = ServiceName::parse(&service).map_err(anyhow::Error::msg)?;
            let expires_at = expires_in_days.map(|d| Utc::now() + Duration::days(i64::from(d)));
            let (raw, row): (RawToken, _) = store
                .create(&service, &description, expires_at, &actor)
                .await
                .map_err(|e| anyhow::anyhow!(e.public_detail()))?;
            tracing::info!(id = %row.id, service = %service, "service token created");
            writeln!(out, "{}", raw.expose())?;
        }
        TokenCommand::List => {
            let dash =
                |t: Option<DateTime<Utc>>| t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
            writeln!(
                out,
                "id service_name created_at expires_at last_used_at revoked_at"
            )?;
            for t in store
                .list()
                .await
                .map_err(|e| anyhow::anyhow!(e.public_detail()))?
            {
                writeln!(
                    out,
                    "{} {} {} {} {} {}",
                    t.id,
                    t.service_name,
                    t.created_at.to_rfc3339(),
                    dash(t.expires_at),
                    dash(t.last_used_at),
                    dash(t.revoked_at)
                )?;
            }
        }
        TokenCommand::Revoke { id } => {
            let row = store
                .revoke(&id, &actor)
                .await
                .map_err(|e| anyhow::anyhow!(e.public_detail()))?;
            tracing::info!(id = %row.id, service = %row.service_name, "service token revoked");
        }
        TokenCommand::Hash { raw } => hash_command(raw)?,
    }
    Ok(())
}
