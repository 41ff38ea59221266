//! A private PostgreSQL for `portico up`'s jobs service: when the machine
//! has PostgreSQL's binaries (`initdb` on PATH or under
//! `/usr/lib/postgresql/*/bin`) and no `jobs.postgres_url` is set, `up`
//! runs its own cluster under `data/postgres/` (created on first start,
//! password authentication with a generated password kept in
//! `data/postgres/password`, mode 600; listening on 127.0.0.1 at a port
//! chosen once and kept in `data/postgres/port`, and on a socket in that
//! directory), and stops it with itself. PostgreSQL refuses to run as root:
//! as root the cluster belongs to, and runs as, the `postgres` user.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The database the jobs service uses in the private cluster.
const JOBS_DB: &str = "portico_jobs";
const USER: &str = "portico";

/// The programs `up` and the backups need, all from one installation.
const PROGRAMS: &[&str] = &[
    "initdb",
    "postgres",
    "pg_isready",
    "createdb",
    "pg_dump",
    "pg_restore",
];

fn complete(dir: &Path) -> bool {
    PROGRAMS.iter().all(|p| dir.join(p).is_file())
}

/// Where PostgreSQL's programs are, if they are installed (a directory on
/// PATH that has all of them, else the newest `/usr/lib/postgresql/*/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if complete(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| complete(b))
        .collect();
    versions.sort();
    versions.pop()
}

/// A running private cluster; stopped (fast shutdown) when dropped.
pub struct PrivatePostgres {
    child: Child,
    pub url: String,
    pub port: u16,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` through `setpriv`, which execs in place (the child is the
/// program itself): as the `postgres` user when we are root, and told to
/// stop (SIGINT, a fast shutdown) if `up` dies without stopping it.
fn command(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.arg("--pdeathsig=INT");
    if is_root() {
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    }
    c.arg("--").arg(program);
    c
}

/// A small secret or setting kept in `path` (created with `make` once).
fn kept(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if let Ok(s) = fs::read_to_string(path) {
        return Ok(s.trim().to_string());
    }
    let value = make();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{value}")?;
    Ok(value)
}

impl PrivatePostgres {
    /// Creates (first time) and starts the cluster under `data_dir/postgres`.
    pub fn start(data_dir: &Path, bin: &Path) -> anyhow::Result<PrivatePostgres> {
        let dir = data_dir.join("postgres");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let password = kept(&dir.join("password"), || {
            (0..24).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
        })?;
        let port: u16 = kept(&dir.join("port"), || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port().to_string())
                .unwrap_or_else(|_| "55432".into())
        })?
        .parse()
        .context("data/postgres/port holds no port number")?;
        if is_root() {
            // The cluster is the postgres user's (it refuses root), and that
            // user may pass through the data directory (group, no listing).
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&dir)
                .status();
            if !ok.is_ok_and(|s| s.success()) {
                bail!(
                    "as root, {} must belong to the postgres user (chown failed)",
                    dir.display()
                );
            }
            let _ = Command::new("chgrp").arg("postgres").arg(data_dir).status();
            let mode = fs::metadata(data_dir)?.permissions().mode() | 0o010;
            fs::set_permissions(data_dir, fs::Permissions::from_mode(mode))?;
        }
        let data = dir.join("data");
        if !data.join("PG_VERSION").exists() {
            let pwfile = dir.join("initdb-password");
            fs::write(&pwfile, format!("{password}\n"))?;
            if is_root() {
                let _ = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&pwfile)
                    .status();
            }
            let out = command(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    USER,
                    "-A",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output()
                .context("running initdb")?;
            let _ = fs::remove_file(&pwfile);
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        let log = fs::File::create(dir.join("postgres.log"))?;
        let child = command(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        let mut pg = PrivatePostgres {
            child,
            url: format!("postgres://{USER}:{password}@127.0.0.1:{port}/{JOBS_DB}"),
            port,
        };
        pg.wait_ready(bin, &dir)?;
        pg.ensure_database(bin, &password)?;
        Ok(pg)
    }

    fn wait_ready(&mut self, bin: &Path, dir: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                bail!(
                    "postgres exited ({status}): {}",
                    log.lines().last().unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not accept connections within 30 s (see {})",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ensure_database(&self, bin: &Path, password: &str) -> anyhow::Result<()> {
        let out = Command::new(bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                JOBS_DB,
            ])
            .env("PGPASSWORD", password)
            .output()
            .context("running createdb")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || err.contains("already exists") {
            return Ok(());
        }
        bail!("createdb {JOBS_DB} failed: {}", err.trim())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Fast shutdown (SIGINT): active transactions roll back, data is kept.
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
