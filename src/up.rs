//! `portico up`: gateway + chat shards + jobs in one process.
//!
//! The chat shards and the jobs service run on one Tokio runtime in a
//! helper thread, sharing in-memory engines; Pingora runs the gateway on the
//! main thread with its own runtimes. One cancellation token, fired by
//! SIGTERM/SIGINT, stops both sides.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::Context;
use portico_config::{PorticoConfig, Secret};
use tokio_util::sync::CancellationToken;

pub fn run(mut cfg: PorticoConfig, config_path: Option<&std::path::Path>) -> ExitCode {
    portico_common::telemetry::init_tracing(&cfg.log);
    if let Err(e) = prepare(&mut cfg) {
        tracing::error!(error = format!("{e:#}"), "cannot start");
        return ExitCode::FAILURE;
    }
    // Held until `up` returns, after its PostgreSQL has stopped.
    let _lock = match lock_data_dir(&cfg.data_dir) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // Stopped with `up` (dropped last, after the services).
    let postgres = private_postgres(&mut cfg);
    let stop = CancellationToken::new();
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Option<String>>>();
    let backend = {
        let cfg = cfg.clone();
        let stop = stop.clone();
        std::thread::spawn(move || backends(cfg, stop, ready_tx))
    };
    let new_admin = match ready_rx.recv() {
        Ok(Ok(admin)) => admin,
        Ok(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "cannot start");
            return ExitCode::FAILURE;
        }
        Err(_) => return ExitCode::FAILURE,
    };
    let server = match portico_gateway::build(
        &cfg,
        portico_gateway::Reload {
            config_path: config_path.map(Into::into),
            adjust: Some(same_process_routes),
        },
        false,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "gateway cannot start");
            stop.cancel();
            let _ = backend.join();
            return ExitCode::FAILURE;
        }
    };
    let g = &cfg.gateway;
    let host = &g.hostnames[0];
    println!();
    println!(
        "  Portico is up: https://{host}:{}/  (self-signed certificate)",
        g.https_listen.port()
    );
    println!(
        "  chat shards: {:?}  jobs: {}  metrics: http://{}/metrics",
        g.chat_shards, g.jobs_upstream, g.admin_listen
    );
    println!(
        "  hosted apps: https://<app>.{}:{}/ (the apps API needs jobs.postgres_url and Docker)",
        cfg.paas.domain,
        g.https_listen.port()
    );
    if cfg.jobs.postgres_url.is_some() {
        let file = cfg.data_dir.join(CONSOLE_ADMIN);
        println!("  ops console: https://{host}:{}/console/", g.https_listen.port());
        match &new_admin {
            Some(pw) => println!(
                "    user admin, password {pw}  (shown once; kept in {})",
                file.display()
            ),
            None => println!(
                "    log in as a staff user (the first password is in {})",
                file.display()
            ),
        }
    }
    println!("  staff API token: portico token --role super_admin  (backups, apps, audit)");
    if let Some(pg) = &postgres {
        println!(
            "  jobs: a private PostgreSQL under {} (127.0.0.1:{})",
            cfg.data_dir.join("postgres").display(),
            pg.port
        );
    }
    if cfg.jobs.postgres_url.is_none() {
        println!(
            "  jobs: backups, restores and apps need PostgreSQL: install it (apt-get install postgresql) \
             and set jobs.postgres_url (PORTICO_JOBS__POSTGRES_URL)"
        );
    }
    println!("  Ctrl-C stops everything.");
    println!();
    portico_gateway::run(server, stop.clone());
    stop.cancel();
    match backend.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Jobs needs PostgreSQL: without a configured one, `up` runs its own when
/// the binaries are installed (see `pg`). A failure to start it is told,
/// not fatal: the chat works without it. Customers live under
/// `data_dir/customers` unless configured.
fn private_postgres(cfg: &mut PorticoConfig) -> Option<crate::pg::PrivatePostgres> {
    if cfg.jobs.customers_root == portico_config::JobsConfig::default().customers_root {
        cfg.jobs.customers_root = cfg.data_dir.join("customers");
    }
    if cfg.jobs.postgres_url.is_some() || !cfg.up.postgres {
        return None;
    }
    let bin = crate::pg::bin_dir()?;
    match crate::pg::PrivatePostgres::start(&cfg.data_dir, &bin) {
        Ok(pg) => {
            cfg.jobs.postgres_url = Some(Secret::new(pg.url.clone()));
            if cfg.jobs.pg_bin_dir.is_none() {
                cfg.jobs.pg_bin_dir = Some(bin);
            }
            Some(pg)
        }
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "the private PostgreSQL for jobs did not start"
            );
            None
        }
    }
}

/// The gateway keys `up` derives from other sections, again on SIGHUP.
fn same_process_routes(cfg: &mut PorticoConfig) {
    cfg.gateway.jobs_upstream = cfg.jobs.listen;
    // Task progress goes to the first shard's publish API.
    if cfg.jobs.chat_url.is_none() {
        cfg.jobs.chat_url = cfg.gateway.chat_shards.first().map(|a| format!("http://{a}"));
    }
}

/// One `up` per data directory: a second one (or one started while the
/// last is still stopping) would find the private PostgreSQL's files in use
/// and run without it. The lock is the kernel's (`flock`): it ends with the
/// process, however it ends.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("up.lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        anyhow::bail!(
            "another `portico up` (pid {}) is running on {} or still stopping: stop it first",
            pid.trim(),
            dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Derives the one-process layout from the configuration: demo on, shard
/// N on `chat.listen` + N - 1, and a JWT secret kept under `data_dir`.
fn prepare(cfg: &mut PorticoConfig) -> anyhow::Result<()> {
    fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // Absolute from here on: PostgreSQL runs in its own directory (a
    // relative socket directory fails there), and every path derived from
    // this one is handed to other processes.
    cfg.data_dir = std::path::absolute(&cfg.data_dir)
        .with_context(|| format!("resolving {}", cfg.data_dir.display()))?;
    if cfg.auth.jwt_secret.is_empty() {
        cfg.auth.jwt_secret = load_or_create_secret(&cfg.data_dir.join("jwt-secret"))?;
    }
    cfg.chat.demo = true;
    let base = cfg.chat.listen;
    let ports = (0..cfg.up.chat_shards).map(|i| {
        base.port()
            .checked_add(i)
            .context("chat.listen port + shards > 65535")
    });
    cfg.gateway.chat_shards = ports
        .map(|p| p.map(|p| base.with_port(p)))
        .collect::<anyhow::Result<_>>()?;
    same_process_routes(cfg);
    let https = format!(
        "https://{}:{}",
        cfg.gateway.hostnames[0],
        cfg.gateway.https_listen.port()
    );
    if !cfg.chat.allowed_origins.contains(&https) {
        cfg.chat.allowed_origins.push(https);
    }
    Ok(())
}

fn load_or_create_secret(path: &Path) -> anyhow::Result<Secret> {
    if let Ok(s) = fs::read_to_string(path) {
        let s = s.trim();
        anyhow::ensure!(
            s.len() >= 32,
            "{} holds a secret shorter than 32 bytes",
            path.display()
        );
        return Ok(Secret::new(s));
    }
    let secret: String = (0..48).map(|_| format!("{:02x}", rand_byte())).collect();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    Ok(Secret::new(secret))
}

/// Where `up` keeps the console's first admin password (mode 0600).
const CONSOLE_ADMIN: &str = "console-admin.txt";

fn rand_byte() -> u8 {
    rand::random()
}

/// The Tokio side: chat shards and jobs, until `stop`.
fn backends(
    cfg: PorticoConfig,
    stop: CancellationToken,
    ready: mpsc::Sender<anyhow::Result<Option<String>>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        portico_common::shutdown::cancel_on_signal(stop.clone());
        let started: anyhow::Result<_> = async {
            // One set of engines for every shard: the memory bus joins
            // them; the store is on disk unless configured otherwise.
            let engines = portico_chat::Engines::from_config(&cfg.chat, &cfg.data_dir).await?;
            let mut shards = Vec::new();
            for (i, addr) in cfg.gateway.chat_shards.iter().enumerate() {
                let mut c = cfg.chat.clone();
                c.listen = *addr;
                c.shard_id = i as u16 + 1;
                shards.push(portico_chat::bind(c, &cfg.auth, engines.clone()).await?);
            }
            let jobs = portico_jobs::bind(&cfg).await?;
            let admin = jobs.demo_admin(&cfg.data_dir.join(CONSOLE_ADMIN)).await?;
            Ok((shards, jobs, admin))
        }
        .await;
        let (shards, jobs) = match started {
            Ok((shards, jobs, admin)) => {
                let _ = ready.send(Ok(admin));
                (shards, jobs)
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return Ok(());
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for shard in shards {
            tasks.spawn(shard.serve(stop.clone()));
        }
        tasks.spawn(jobs.serve(stop.clone()));
        let mut result = Ok(());
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) | Err(e) = r.map_err(std::io::Error::other) {
                tracing::error!(error = %e, "service failed");
                result = Err(e.into());
                stop.cancel();
            }
        }
        result
    })
}
