//! Restoring a backup (runbook: jobs/RESTORE.md): every checksum is
//! verified first, then `pg_restore` into the customer database (or a
//! named target) and the archives are unpacked into the customer tree,
//! refusing links and any path that would leave it. A dry run reports what
//! would change and touches nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};

use crate::archive::{self, Change};
use crate::backup::{self, MANIFEST};
use crate::db::Customer;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("backup {0} not found (no {MANIFEST})")]
    NotFound(String),
    #[error("backup manifest is unreadable: {0}")]
    Manifest(String),
    #[error("{file}: checksum mismatch (expected sha256 {expected} and {size} bytes); nothing was restored")]
    Checksum {
        file: String,
        expected: String,
        size: u64,
    },
    #[error("no database to restore into: the customer has none and no target was given")]
    NoDatabase,
    #[error("pg_restore failed: {0}")]
    PgRestore(String),
    #[error(transparent)]
    Unpack(#[from] archive::UnpackError),
}

/// What to restore and where.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dry_run: bool,
    /// Another database URL than the customer's.
    pub target_db: Option<String>,
    /// Another root than the customer's.
    pub target_root: Option<PathBuf>,
    pub pg_bin_dir: Option<PathBuf>,
}

pub async fn restore(c: &Customer, backup_id: &str, o: &Options) -> Result<Value, RestoreError> {
    if !backup::is_backup_id(backup_id) {
        return Err(RestoreError::NotFound(backup_id.to_string()));
    }
    let root = PathBuf::from(&c.root);
    let dir = backup::backups_dir(&root).join(backup_id);
    let text = std::fs::read_to_string(dir.join(MANIFEST))
        .map_err(|_| RestoreError::NotFound(backup_id.to_string()))?;
    let manifest: Value = serde_json::from_str(&text).map_err(|e| RestoreError::Manifest(e.to_string()))?;
    let artifacts = manifest["artifacts"]
        .as_array()
        .ok_or_else(|| RestoreError::Manifest("no artifacts list".into()))?;

    // 1. Every checksum, before anything is touched.
    let mut files = Vec::new();
    for a in artifacts {
        let file = a["file"].as_str().unwrap_or_default().to_string();
        let (expected, size) = (
            a["sha256"].as_str().unwrap_or_default().to_string(),
            a["size"].as_u64().unwrap_or(0),
        );
        // Artifact names come from our own manifest, but a manifest on disk
        // is input too: plain names only.
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(RestoreError::Manifest(format!("bad artifact name `{file}`")));
        }
        let path = dir.join(&file);
        let ok = tokio::task::spawn_blocking({
            let (path, expected) = (path.clone(), expected.clone());
            move || archive::sha256_file(&path).is_ok_and(|(sha, n)| sha == expected && n == size)
        })
        .await
        .unwrap_or(false);
        if !ok {
            return Err(RestoreError::Checksum { file, expected, size });
        }
        files.push((file, path));
    }

    let target_root = o.target_root.clone().unwrap_or(root);
    let services = target_root.join(manifest["paths"]["services"].as_str().unwrap_or("."));
    let mut plan = Vec::new();
    for (file, path) in &files {
        if file == "db.dump" {
            let url = o
                .target_db
                .as_deref()
                .or(c.db_url.as_deref())
                .ok_or(RestoreError::NoDatabase)?;
            let db = url
                .parse::<tokio_postgres::Config>()
                .ok()
                .and_then(|c| c.get_dbname().map(str::to_string));
            plan.push(json!({ "file": file, "action": "pg_restore --clean", "database": db }));
            if !o.dry_run {
                pg_restore(url, path, o).await?;
            }
            continue;
        }
        let into = if file == "uploads.tar.gz" {
            target_root.clone()
        } else {
            services.clone()
        };
        let changes = {
            let (path, into, apply) = (path.clone(), into.clone(), !o.dry_run);
            tokio::task::spawn_blocking(move || archive::unpack_tar_gz(&path, &into, apply))
                .await
                .map_err(|e| RestoreError::Manifest(e.to_string()))??
        };
        let (mut create, mut replace) = (Vec::new(), Vec::new());
        for ch in changes {
            match ch {
                Change::Create(p) => create.push(p.display().to_string()),
                Change::Replace(p) => replace.push(p.display().to_string()),
            }
        }
        plan.push(
            json!({ "file": file, "into": into.display().to_string(), "create": create, "replace": replace }),
        );
    }
    Ok(json!({ "backup": backup_id, "dry_run": o.dry_run, "verified": files.len(), "plan": plan }))
}

async fn pg_restore(url: &str, dump: &Path, o: &Options) -> Result<(), RestoreError> {
    let env = backup::pg_env(url).map_err(RestoreError::PgRestore)?;
    let db = env
        .iter()
        .find(|(k, _)| *k == "PGDATABASE")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| RestoreError::PgRestore("the target URL names no database".into()))?;
    let tool = o
        .pg_bin_dir
        .as_ref()
        .map_or_else(|| PathBuf::from("pg_restore"), |d| d.join("pg_restore"));
    let out = tokio::process::Command::new(tool)
        .args([
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--no-password",
        ])
        .arg(format!("--dbname={db}"))
        .arg(dump)
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| RestoreError::PgRestore(format!("cannot run pg_restore: {e}")))?;
    if !out.status.success() {
        return Err(RestoreError::PgRestore(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}
