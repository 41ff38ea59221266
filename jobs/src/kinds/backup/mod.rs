//! Customer backups (seed 001): a PostgreSQL dump (`pg_dump -Fc -Z9`),
//! service archives (`backend|admin|store.tar.gz` without node_modules,
//! .next, dist, logs unless asked for), `uploads.tar.gz` (from
//! `backend/uploads`, or `shared/uploads` after blue/green), `env-pm2.tar.gz`
//! (`.env` files and the PM2 ecosystem file), and `backup.json` written
//! last and atomically: a directory without it is partial and is removed
//! by the next task of the customer (or the reaper). Retention deletes old
//! backups only after a new one succeeded.
//!
//! Layout: `customers/<domain>/backups/<YYYYMMDD-HHMMSS>/` (700), files 600.

pub mod api;
pub mod db;
pub mod links;
mod task;

pub use task::{BackupKind, Made, clean_partials_of};

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::archive::{self, Excludes};
use crate::customers::Customer;
use crate::queue::progress::Progress;

pub const MANIFEST: &str = "backup.json";
const SERVICES: [&str; 3] = ["backend", "admin", "store"];

/// What a backup includes (seed 001's `include` flags).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Include {
    pub db: bool,
    pub uploads: bool,
    pub env_pm2: bool,
    pub logs: bool,
    pub artifacts: bool,
}

impl Include {
    /// The recommended "fast" backup: DB, uploads, .env + PM2.
    pub const FAST: Include = Include {
        db: true,
        uploads: true,
        env_pm2: true,
        logs: false,
        artifacts: false,
    };
}

/// Why a backup failed. `retryable` ones are tried again by the queue.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "not enough disk space at {path}: the backup needs about {need} bytes and {reserve} bytes must stay free, but only {free} are available"
    )]
    Disk {
        path: String,
        need: u64,
        reserve: u64,
        free: u64,
    },
    #[error("customer root {0} does not exist or is not a directory")]
    NoRoot(String),
    #[error("include.db is set but customer {0} has no database configured")]
    NoDatabase(String),
    #[error("pg_dump failed: {0}")]
    Dump(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

impl BackupError {
    pub fn retryable(&self) -> bool {
        matches!(self, BackupError::Dump(_) | BackupError::Io(..))
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |e| BackupError::Io(what, e)
}

/// Settings a backup runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub disk_reserve_bytes: u64,
    pub keep: usize,
    pub pg_bin_dir: Option<PathBuf>,
}

impl From<&portico_config::JobsConfig> for Settings {
    fn from(c: &portico_config::JobsConfig) -> Settings {
        Settings {
            disk_reserve_bytes: c.disk_reserve_bytes,
            keep: c.keep_backups,
            pg_bin_dir: c.pg_bin_dir.clone(),
        }
    }
}

/// Where things are in a customer tree.
#[derive(Debug, Clone)]
struct Layout {
    /// `.` or `current` (blue/green): where backend/admin/store live.
    services: String,
    /// Relative to root: `backend/uploads` or `shared/uploads`.
    uploads: String,
}

fn layout(root: &Path) -> Layout {
    let services = if fs::symlink_metadata(root.join("current")).is_ok_and(|m| m.file_type().is_symlink()) {
        "current"
    } else {
        "."
    };
    let in_backend = Path::new(services).join("backend/uploads");
    let linked = fs::symlink_metadata(root.join(&in_backend)).is_ok_and(|m| m.file_type().is_symlink());
    let uploads = if linked || (services == "current" && root.join("shared/uploads").is_dir()) {
        "shared/uploads".to_string()
    } else {
        in_backend.to_string_lossy().trim_start_matches("./").to_string()
    };
    Layout {
        services: services.to_string(),
        uploads,
    }
}

fn service_excludes(inc: &Include) -> Excludes {
    let mut names = Vec::new();
    if !inc.artifacts {
        names.extend(["node_modules", ".next", "dist"]);
    }
    if !inc.logs {
        names.push("logs");
    }
    Excludes {
        names,
        // Uploads have their own archive.
        paths: vec![PathBuf::from("backend/uploads")],
    }
}

fn no_excludes() -> Excludes {
    Excludes {
        names: vec![],
        paths: vec![],
    }
}

/// The `.env` files and PM2 ecosystem files, relative to the services dir.
fn env_pm2_files(services: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut scan = |dir: &Path, rel: &Path| {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            if is_file
                && (name == ".env" || name.starts_with(".env.") || name.starts_with("ecosystem.config."))
            {
                out.push(rel.join(&name));
            }
        }
    };
    scan(services, Path::new(""));
    for s in SERVICES {
        scan(&services.join(s), Path::new(s));
    }
    out.sort();
    out
}

/// Free bytes for unprivileged users on the filesystem of `path`.
fn free_bytes(path: &Path) -> Result<u64, BackupError> {
    let st = rustix::fs::statvfs(path).map_err(|e| BackupError::Io(path.display().to_string(), e.into()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Size of the customer database, for the estimate.
async fn database_size(url: &str) -> Result<(u64, String), BackupError> {
    let client = portico_common::pg::connect(url)
        .await
        .map_err(|e| BackupError::Dump(format!("cannot connect to the customer database: {e}")))?;
    let row = client
        .query_one(
            "SELECT pg_database_size(current_database())::bigint, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(|e| BackupError::Dump(e.to_string()))?;
    Ok((row.get::<_, i64>(0) as u64, row.get(1)))
}

/// The estimate and checks before anything is written.
pub struct Precheck {
    pub estimate: u64,
    pub pg_version: Option<String>,
}

pub async fn precheck(c: &Customer, inc: &Include, s: &Settings) -> Result<Precheck, BackupError> {
    let root = PathBuf::from(&c.root);
    if !root.is_dir() {
        return Err(BackupError::NoRoot(c.root.clone()));
    }
    let l = layout(&root);
    let (db_size, pg_version) = match (inc.db, &c.db_url) {
        (true, Some(url)) => {
            let (size, v) = database_size(url).await?;
            (size, Some(v))
        }
        (true, None) => return Err(BackupError::NoDatabase(c.id.clone())),
        (false, _) => (0, None),
    };
    let services = root.join(&l.services);
    let mut files = archive::tree_size(&services, &SERVICES.map(PathBuf::from), &service_excludes(inc));
    if inc.uploads {
        files += archive::tree_size(&root, &[PathBuf::from(&l.uploads)], &no_excludes());
    }
    let estimate = files + db_size;
    let free = free_bytes(&root)?;
    if free < estimate.saturating_add(s.disk_reserve_bytes) {
        return Err(BackupError::Disk {
            path: root.display().to_string(),
            need: estimate,
            reserve: s.disk_reserve_bytes,
            free,
        });
    }
    Ok(Precheck { estimate, pg_version })
}

pub fn backups_dir(root: &Path) -> PathBuf {
    root.join("backups")
}

/// Removes backup directories without a manifest (left by a killed or
/// failed attempt). Only one task per customer runs, so none is in use.
pub fn clean_partials(root: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(backups_dir(root)).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.join(MANIFEST).exists() && fs::remove_dir_all(&p).is_ok() {
            tracing::info!(dir = %p.display(), "removed a partial backup");
            n += 1;
        }
    }
    n
}

/// Completed backup ids (directory names with a manifest), newest first.
pub fn completed(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = fs::read_dir(backups_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(MANIFEST).is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| is_backup_id(n))
        .collect();
    ids.sort_by(|a, b| b.cmp(a));
    ids
}

/// `YYYYMMDD-HHMMSS` with an optional `-N`: the only names a backup id
/// (from a URL) may have, so it can never name another path.
pub fn is_backup_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 15
        && b.len() <= 20
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && (b.len() == 15 || (b[15] == b'-' && b.len() > 16 && b[16..].iter().all(u8::is_ascii_digit)))
}

/// Runs a backup; returns its id and manifest.
pub async fn run(
    c: &Customer,
    kind: &str,
    inc: Include,
    s: &Settings,
    progress: Arc<Progress>,
) -> Result<(String, Value), BackupError> {
    let started = Instant::now();
    let root = PathBuf::from(&c.root);
    progress.step("pre-check");
    let partials = root.clone();
    let _ = tokio::task::spawn_blocking(move || clean_partials(&partials)).await;
    let pre = precheck(c, &inc, s).await?;
    progress.set_total(pre.estimate.max(1));
    let l = layout(&root);

    let parent = backups_dir(&root);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(io(parent.display().to_string()))?;
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let (id, dir) = (0..1000)
        .map(|n| {
            if n == 0 {
                stamp.clone()
            } else {
                format!("{stamp}-{n}")
            }
        })
        .find_map(|id| {
            let dir = parent.join(&id);
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .ok()
                .map(|_| (id, dir))
        })
        .ok_or_else(|| {
            BackupError::Io(
                parent.display().to_string(),
                std::io::ErrorKind::AlreadyExists.into(),
            )
        })?;

    let mut artifacts = Vec::new();
    if inc.db {
        progress.step("database");
        let url = c
            .db_url
            .as_deref()
            .ok_or_else(|| BackupError::NoDatabase(c.id.clone()))?;
        let out = dir.join("db.dump");
        pg_dump(url, &out, s).await?;
        let dump = out.clone();
        let (sha, size) = tokio::task::spawn_blocking(move || archive::sha256_file(&dump))
            .await
            .map_err(|e| BackupError::Io("db.dump".into(), std::io::Error::other(e)))?
            .map_err(io("db.dump"))?;
        artifacts.push(json!({ "file": "db.dump", "sha256": sha, "size": size }));
    }

    let services = root.join(&l.services);
    let mut jobs: Vec<(String, PathBuf, Vec<PathBuf>, Excludes)> = SERVICES
        .iter()
        .filter(|s| services.join(s).is_dir())
        .map(|s| {
            (
                format!("{s}.tar.gz"),
                services.clone(),
                vec![PathBuf::from(s)],
                service_excludes(&inc),
            )
        })
        .collect();
    if inc.uploads && root.join(&l.uploads).is_dir() {
        jobs.push((
            "uploads.tar.gz".into(),
            root.clone(),
            vec![PathBuf::from(&l.uploads)],
            no_excludes(),
        ));
    }
    if inc.env_pm2 {
        jobs.push((
            "env-pm2.tar.gz".into(),
            services.clone(),
            env_pm2_files(&services),
            no_excludes(),
        ));
    }
    for (name, base, entries, ex) in jobs {
        progress.step(&name);
        let out = dir.join(&name);
        let meter = progress.meter.clone();
        let written =
            tokio::task::spawn_blocking(move || archive::write_tar_gz(&base, &entries, &ex, &out, &meter))
                .await
                .map_err(|e| BackupError::Io(name.clone(), std::io::Error::other(e)))?
                .map_err(|e| {
                    if progress
                        .meter
                        .cancelled
                        .load(std::sync::atomic::Ordering::Acquire)
                    {
                        BackupError::Cancelled
                    } else {
                        BackupError::Io(name.clone(), e)
                    }
                })?;
        artifacts.push(
            json!({ "file": name, "sha256": written.sha256, "size": written.size, "files": written.files }),
        );
    }

    progress.step("manifest");
    let total: u64 = artifacts.iter().filter_map(|a| a["size"].as_u64()).sum();
    let manifest = json!({
        "id": id,
        "customer": { "id": c.id, "domain": c.domain },
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "type": kind,
        "include": inc,
        "versions": versions(&services),
        "paths": { "services": l.services, "uploads": l.uploads },
        "engine": engines(&services, pre.pg_version, s).await,
        "artifacts": artifacts,
        "stats": { "total_bytes": total, "duration_ms": started.elapsed().as_millis() as u64 },
    });
    write_manifest(&dir, &manifest).map_err(io(MANIFEST))?;
    Ok((id, manifest))
}

/// Writes `backup.json` (600) through a temporary name and a rename, then
/// syncs the directory: the backup is complete exactly when it appears.
fn write_manifest(dir: &Path, manifest: &Value) -> std::io::Result<()> {
    portico_common::files::write_private(
        &dir.join(MANIFEST),
        serde_json::to_string_pretty(manifest)?.as_bytes(),
    )
}

fn pg_tool(s: &Settings, name: &str) -> PathBuf {
    s.pg_bin_dir
        .as_ref()
        .map_or_else(|| PathBuf::from(name), |d| d.join(name))
}

/// Connection settings as libpq variables: the password never appears on
/// a command line (visible to every user in /proc).
pub fn pg_env(url: &str) -> Result<Vec<(&'static str, String)>, String> {
    let cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("database URL: {e}"))?;
    let mut env = Vec::new();
    if let Some(tokio_postgres::config::Host::Tcp(h)) = cfg.get_hosts().first() {
        env.push(("PGHOST", h.clone()));
    }
    if let Some(p) = cfg.get_ports().first() {
        env.push(("PGPORT", p.to_string()));
    }
    if let Some(u) = cfg.get_user() {
        env.push(("PGUSER", u.to_string()));
    }
    if let Some(p) = cfg.get_password() {
        env.push(("PGPASSWORD", String::from_utf8_lossy(p).into_owned()));
    }
    if let Some(d) = cfg.get_dbname() {
        env.push(("PGDATABASE", d.to_string()));
    }
    Ok(env)
}

async fn pg_dump(url: &str, out: &Path, s: &Settings) -> Result<(), BackupError> {
    let env = pg_env(url).map_err(BackupError::Dump)?;
    let output = tokio::process::Command::new(pg_tool(s, "pg_dump"))
        .args(["-Fc", "-Z9", "--no-password", "-f"])
        .arg(out)
        .envs(env)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| BackupError::Dump(format!("cannot run pg_dump: {e}")))?;
    if !output.status.success() {
        return Err(BackupError::Dump(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io("db.dump"))
}

fn versions(services: &Path) -> Value {
    let mut v = serde_json::Map::new();
    for s in SERVICES {
        let version = fs::read_to_string(services.join(s).join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|p| p["version"].as_str().map(str::to_string));
        v.insert(s.into(), version.map_or(Value::Null, Value::String));
    }
    Value::Object(v)
}

async fn command_version(cmd: &Path, arg: &str) -> Value {
    match tokio::process::Command::new(cmd)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .await
    {
        Ok(o) if o.status.success() => Value::String(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        _ => Value::Null,
    }
}

async fn engines(services: &Path, pg: Option<String>, s: &Settings) -> Value {
    let backend = services.join("backend");
    let pm = if backend.join("pnpm-lock.yaml").exists() {
        "pnpm"
    } else if backend.join("yarn.lock").exists() {
        "yarn"
    } else {
        "npm"
    };
    json!({
        "node": command_version(Path::new("node"), "--version").await,
        "package_manager": { "name": pm, "version": command_version(Path::new(pm), "--version").await },
        "postgresql": pg,
        "pg_dump": command_version(&pg_tool(s, "pg_dump"), "--version").await,
    })
}

/// Keeps the newest `keep` completed backups; returns the deleted ids.
pub fn retain(root: &Path, keep: usize) -> Vec<String> {
    let mut deleted = Vec::new();
    for id in completed(root).into_iter().skip(keep) {
        if fs::remove_dir_all(backups_dir(root).join(&id)).is_ok() {
            deleted.push(id);
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_ids_cannot_name_other_paths() {
        assert!(is_backup_id("20261123-154501"));
        assert!(is_backup_id("20261123-154501-2"));
        for bad in [
            "..",
            "20261123-154501/..",
            "../20261123-15450",
            "20261123-154501-",
            "2026112a-154501",
            "",
        ] {
            assert!(!is_backup_id(bad), "{bad}");
        }
    }

    #[test]
    fn uploads_follow_blue_green() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("backend/uploads")).unwrap();
        let l = layout(d.path());
        assert_eq!(
            (l.services.as_str(), l.uploads.as_str()),
            (".", "backend/uploads")
        );
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("releases/v2/backend")).unwrap();
        fs::create_dir_all(d.path().join("shared/uploads")).unwrap();
        std::os::unix::fs::symlink("releases/v2", d.path().join("current")).unwrap();
        std::os::unix::fs::symlink(
            "../../../shared/uploads",
            d.path().join("releases/v2/backend/uploads"),
        )
        .unwrap();
        let l = layout(d.path());
        assert_eq!(
            (l.services.as_str(), l.uploads.as_str()),
            ("current", "shared/uploads")
        );
    }
}
