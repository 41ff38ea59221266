//! `portico`: the whole stack in one process (`portico up`), on embedded
//! engines — no Redis, PostgreSQL or Docker needed. See README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod pg;
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
    /// Print a bearer token for the REST APIs (staff roles, or `service`),
    /// signed with this installation's secret (`data/jwt-secret` for `up`).
    Token {
        /// super_admin, ops_lead, technician or service (repeatable).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Who the token names (audit log).
        #[arg(long, default_value = "admin")]
        user: String,
        /// Lifetime in seconds (at most 7 days).
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

/// Roles a token may carry (see jobs' API).
const ROLES: &[&str] = &["super_admin", "ops_lead", "technician", "service"];

/// `portico token`: the token on stdout, nothing else (for `$(…)`).
fn token(cfg: &portico_config::PorticoConfig, roles: &[String], user: &str, ttl_secs: u64) -> ExitCode {
    if let Some(bad) = roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
        eprintln!(
            "portico token: unknown role `{bad}` (one of: {})",
            ROLES.join(", ")
        );
        return ExitCode::from(2);
    }
    if !(60..=7 * 86400).contains(&ttl_secs) {
        eprintln!("portico token: --ttl-secs must be between 60 and 604800");
        return ExitCode::from(2);
    }
    if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
        eprintln!("portico token: --user must be 1 to 128 printable characters");
        return ExitCode::from(2);
    }
    let secret = if cfg.auth.jwt_secret.is_empty() {
        let path = cfg.data_dir.join("jwt-secret");
        match std::fs::read_to_string(&path) {
            Ok(s) => portico_config::Secret::new(s.trim()),
            Err(e) => {
                eprintln!(
                    "portico token: no secret: {} ({e}); start `portico up` once, or set PORTICO_AUTH__JWT_SECRET",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
    } else {
        cfg.auth.jwt_secret.clone()
    };
    let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
    let tokens = portico_common::auth::Tokens::new(&secret);
    println!(
        "{}",
        tokens.issue(user, &roles, std::time::Duration::from_secs(ttl_secs))
    );
    ExitCode::SUCCESS
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
        Command::Token {
            roles,
            user,
            ttl_secs,
        } => token(&cfg, &roles, &user, ttl_secs),
    }
}
