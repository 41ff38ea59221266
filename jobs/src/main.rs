//! `portico-jobs`: runs the ops service (see `portico_jobs`), restores a
//! backup from the command line (`restore`, see jobs/RESTORE.md), or
//! manages staff accounts (`user add|passwd|disable|enable`: the first
//! super admin, and recovery when nobody can log in), or prints the API's
//! description (`openapi`).

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
    /// Staff accounts of the console (stored in jobs.postgres_url).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Prints the API's description (OpenAPI 3.1, as `GET /api/openapi.json`
    /// serves it) and exits.
    Openapi,
    /// Runs one instance of a shop's service from its spec (written by an
    /// upgrade; process managers run this): sets the directory and the
    /// environment, then becomes the release's start command.
    RunInstance {
        /// The spec (JSON) under the customer's `run/` directory.
        spec: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Adds an account; prints the password when it is generated.
    Add {
        /// The user id (a-z 0-9 . _ -).
        id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// super_admin, ops_lead or technician.
        #[arg(long, default_value = "technician")]
        role: String,
        /// Read the password from the first line of stdin instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Sets a new password (ends the user's sessions); prints it when generated.
    Passwd {
        id: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disables an account: its sessions end at once.
    Disable { id: String },
    /// Enables a disabled account.
    Enable { id: String },
}

fn stdin_password(read: bool) -> anyhow::Result<Option<String>> {
    if !read {
        return Ok(None);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

async fn user(cfg: portico_config::PorticoConfig, action: UserAction) -> anyhow::Result<()> {
    let url = cfg.jobs.postgres_url.as_ref().ok_or_else(|| {
        anyhow::anyhow!("jobs.postgres_url is not set: staff accounts live in the jobs database")
    })?;
    let db = portico_jobs::queue::Db::connect(url.expose(), 1, &portico_jobs::schemas()).await?;
    let api_err = |e: portico_common::api::ApiError| anyhow::anyhow!("{}", e.2);
    let (action_name, id, printed) = match action {
        UserAction::Add {
            id,
            email,
            name,
            role,
            password_stdin,
        } => {
            let pw = stdin_password(password_stdin)?;
            let (u, generated) = portico_jobs::staff::api::add_account(&db, &id, &email, &name, &role, pw)
                .await
                .map_err(api_err)?;
            eprintln!("added {} ({}, {})", u.id, u.email, u.role.as_str());
            ("staff.add", id, generated)
        }
        UserAction::Passwd { id, password_stdin } => {
            use portico_jobs::staff::api::{hashed, new_password};
            let (pw, generated) =
                new_password(stdin_password(password_stdin)?, "invalid_password").map_err(api_err)?;
            let hash = hashed(&pw).await.map_err(api_err)?;
            db.set_password(&id, &hash).await?;
            eprintln!("password of {id} set; their sessions ended");
            ("staff.password", id, generated.then_some(pw))
        }
        UserAction::Disable { id } => {
            db.set_disabled(&id, true).await?;
            eprintln!("{id} disabled; their sessions ended");
            ("staff.disable", id, None)
        }
        UserAction::Enable { id } => {
            db.set_disabled(&id, false).await?;
            eprintln!("{id} enabled");
            ("staff.enable", id, None)
        }
    };
    let actor = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    db.audit_row(
        &actor,
        action_name,
        None,
        Some(&format!("staff:{id}")),
        "ok",
        &serde_json::json!({}),
    )
    .await?;
    if let Some(pw) = printed {
        // The only time the password is shown: stdout, for a script to keep.
        println!("{pw}");
    }
    Ok(())
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
            let db = portico_jobs::queue::Db::connect(url.expose(), 1, &portico_jobs::schemas()).await?;
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
        Some(Command::User { action }) => {
            portico_common::cli::run_async(cfg, |cfg, _stop| async move { user(cfg, action).await })
        }
        Some(Command::Openapi) => match portico_jobs::openapi(&cfg).to_pretty_json() {
            Ok(json) => {
                println!("{json}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
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
