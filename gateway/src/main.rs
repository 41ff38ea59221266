//! `portico-gateway`: runs the HTTPS edge (see `portico_gateway`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Portico gateway (HTTPS edge)")]
struct Args {
    /// Configuration file (TOML); keys may also come from PORTICO_* variables.
    #[arg(long, env = "PORTICO_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Take over the listening sockets of the running gateway, which was
    /// sent SIGQUIT (zero-downtime upgrade).
    #[arg(short, long)]
    upgrade: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match portico_common::cli::load_config(args.config.as_deref(), args.check_config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    portico_common::telemetry::init_tracing(&cfg.log);
    let server = match portico_gateway::build(
        &cfg,
        portico_gateway::Reload {
            config_path: args.config.clone(),
            adjust: None,
        },
        args.upgrade,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "gateway cannot start");
            return ExitCode::FAILURE;
        }
    };
    // Pingora owns the runtimes and the signals; nothing else to stop.
    portico_gateway::run(server, CancellationToken::new());
    ExitCode::SUCCESS
}
