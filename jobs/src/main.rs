//! `portico-jobs`: runs the ops service (see `portico_jobs`), or restores
//! a backup from the command line (`restore`, see jobs/RESTORE.md).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Portico jobs service")]
struct Args {
    /// Configuration file (TOML); keys may also come from PORTICO_* variables.
    #[arg(long, env = "PORTICO_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Verifies a backup's checksums, then restores its database dump and
    /// archives (runbook: jobs/RESTORE.md).
    Restore {
        /// The backup id (YYYYMMDD-HHMMSS).
        backup: String,
        /// The customer id.
        #[arg(long)]
        customer: String,
        /// Only list what would change.
        #[arg(long)]
        dry_run: bool,
        /// Restore the dump into this database instead of the customer's.
        #[arg(long)]
        target_db: Option<String>,
        /// Unpack the archives under this directory instead of the customer root.
        #[arg(long)]
        target_root: Option<PathBuf>,
    },
    /// Runs one instance of a shop's service from its spec (written by an
    /// upgrade; process managers run this): sets the directory and the
    /// environment, then becomes the release's start command.
    RunInstance {
        /// The spec (JSON) under the customer's `run/` directory.
        spec: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::RunInstance { spec }) = &args.command {
        return run_instance(spec);
    }
    let cfg = match portico_common::cli::load_config(args.config.as_deref(), args.check_config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    match args.command {
        None => portico_common::cli::run_async(cfg, |cfg, stop| async move {
            portico_jobs::bind(&cfg).await?.serve(stop).await?;
            Ok(())
        }),
        Some(Command::Restore {
            backup,
            customer,
            dry_run,
            target_db,
            target_root,
        }) => portico_common::cli::run_async(cfg, |cfg, _stop| async move {
            let url = cfg.jobs.postgres_url.as_ref().ok_or_else(|| {
                anyhow::anyhow!("jobs.postgres_url is not set: the customer registry is needed")
            })?;
            let db =
                portico_jobs::queue::Db::connect(url.expose(), 1, &portico_jobs::kinds::Kinds::schemas())
                    .await?;
            let c = db
                .customer(&customer)
                .await?
                .ok_or_else(|| anyhow::anyhow!("customer {customer} is not registered"))?;
            let o = portico_jobs::kinds::restore::Options {
                dry_run,
                target_db,
                target_root,
                pg_bin_dir: cfg.jobs.pg_bin_dir.clone(),
            };
            let report = portico_jobs::kinds::restore::restore(&c, &backup, &o).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }),
        Some(Command::RunInstance { .. }) => unreachable!("handled before the config is read"),
    }
}

fn run_instance(path: &std::path::Path) -> std::process::ExitCode {
    let spec: portico_jobs::kinds::upgrade::pm::Spec = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portico-jobs run-instance: {}: {e}", path.display());
            return std::process::ExitCode::from(2);
        }
    };
    let e = spec.exec();
    eprintln!(
        "portico-jobs run-instance: cannot start `{}` in {}: {e}",
        spec.command,
        spec.dir.display()
    );
    std::process::ExitCode::from(1)
}
