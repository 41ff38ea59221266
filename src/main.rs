//! `portico`: the whole stack in one process (`portico up`), on embedded
//! engines — no Redis, PostgreSQL or Docker needed. See README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod up;

#[derive(Parser)]
#[command(version, about = "Portico: a self-hosted platform edge")]
struct Cli {
    /// Configuration file (TOML); keys may also come from PORTICO_* variables.
    #[arg(long, global = true, env = "PORTICO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway, the chat shards and the jobs service in one process.
    Up,
    /// Validate the configuration and exit (0: valid, 2: invalid).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file: Option<&Path> = cli.config.as_deref();
    let check = matches!(cli.command, Command::CheckConfig);
    let cfg = match portico_common::cli::load_config(file, check) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    match cli.command {
        Command::Up => up::run(cfg, file),
        Command::CheckConfig => ExitCode::SUCCESS,
    }
}
