//! `portico-jobs`: runs the ops service (see `portico_jobs`).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Portico jobs service")]
struct Args {
    /// Configuration file (TOML); keys may also come from PORTICO_* variables.
    #[arg(long, env = "PORTICO_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match portico_common::cli::load_config(args.config.as_deref(), args.check_config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    portico_common::cli::run_async(cfg, |cfg, stop| async move {
        portico_jobs::bind(&cfg.jobs).await?.serve(stop).await?;
        Ok(())
    })
}
