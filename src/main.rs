//! The `crm-server` binary: parse the command line, load configuration, start logging, run.

use clap::Parser;
use crm_server::{
    cli::{self, Cli, Command, TokenCommand},
    config::Settings,
    telemetry,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    // Hashing a token needs no configuration, database or runtime.
    if let Command::Token(TokenCommand::Hash { raw }) = command {
        return exit(cli::hash_command(raw));
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("crm-server: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match crm_server::startup::runtime() {
        Ok(rt) => rt,
        Err(e) => return exit(Err(e.into())),
    };
    // The trace exporter needs the runtime; spans still queued are flushed before exit.
    let telemetry = {
        let _runtime = runtime.enter();
        telemetry::init(settings.log_format)
    };
    let result = runtime.block_on(cli::run(command, settings));
    telemetry.shutdown();
    exit(result)
}

fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crm-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
