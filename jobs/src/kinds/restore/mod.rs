//! Restoring a backup (runbook: jobs/RESTORE.md), all or nothing:
//!
//! 1. **Verify** every artifact's checksum and every archive entry (plain
//!    files and directories only, no path that leaves the target, no
//!    existing link on the way) before anything is touched.
//! 2. **Stage**: unpack every archive into a fresh directory beside the
//!    target (same filesystem, so moves are renames).
//! 3. **Commit files**: each staged file is renamed into place, the file it
//!    replaces moved aside first; on any error the moves are undone.
//! 4. **Database**: `pg_restore --single-transaction` into the customer
//!    database (or a named target): all of it or none; if it fails, the
//!    files are rolled back too.
//!
//! So a refused archive, a failed `pg_restore` or an I/O error leaves the
//! database and the tree as they were. A dry run stops after step 1 and
//! reports what would change.

pub mod api;
mod task;

pub use task::RestoreKind;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};

use crate::archive::{self, Change};
use crate::customers::Customer;
use crate::kinds::backup::{self, MANIFEST};

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
    #[error("staging or moving restored files: {0}; nothing was changed")]
    Files(String),
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
    let text = tokio::fs::read_to_string(dir.join(MANIFEST))
        .await
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
    let db_url = match files.iter().any(|(f, _)| f == "db.dump") {
        true => Some(
            o.target_db
                .clone()
                .or_else(|| c.db_url.clone())
                .ok_or(RestoreError::NoDatabase)?,
        ),
        false => None,
    };

    // 2. Every archive entry checked (nothing written), and the plan.
    let mut plan = Vec::new();
    let mut archives = Vec::new();
    for (file, path) in &files {
        if file == "db.dump" {
            let db = db_url
                .as_deref()
                .and_then(|u| u.parse::<tokio_postgres::Config>().ok())
                .and_then(|c| c.get_dbname().map(str::to_string));
            plan.push(json!({ "file": file, "action": "pg_restore --clean", "database": db }));
            continue;
        }
        let into = if file == "uploads.tar.gz" {
            target_root.clone()
        } else {
            services.clone()
        };
        let changes = unpack(path, &into, false).await?;
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
        archives.push((path.clone(), into));
    }
    let report = json!({ "backup": backup_id, "dry_run": o.dry_run, "verified": files.len(), "plan": plan });
    if o.dry_run {
        return Ok(report);
    }

    // 3. Stage, then move into place (undone on error).
    let stage = {
        let (root, id) = (target_root.clone(), backup_id.to_string());
        tokio::task::spawn_blocking(move || Stage::create(&root, &id))
            .await
            .map_err(|e| RestoreError::Files(e.to_string()))??
    };
    let result = async {
        let mut staged = Vec::new();
        for (i, (path, into)) in archives.iter().enumerate() {
            let dir = stage.dir.join(format!("{i}"));
            for ch in unpack(path, &dir, true).await? {
                let (Change::Create(rel) | Change::Replace(rel)) = ch;
                staged.push((dir.join(&rel), into.join(&rel)));
            }
        }
        let moved = tokio::task::spawn_blocking({
            let aside = stage.dir.join("replaced");
            move || commit(&staged, &aside)
        })
        .await
        .map_err(|e| RestoreError::Files(e.to_string()))??;
        // 4. The database, in one transaction; files back if it fails.
        if let Some(url) = &db_url
            && let Some((_, dump)) = files.iter().find(|(f, _)| f == "db.dump")
            && let Err(e) = pg_restore(url, dump, o).await
        {
            match tokio::task::spawn_blocking(move || moved.undo()).await {
                Ok(Ok(())) => {}
                Ok(Err(u)) => tracing::error!(error = %u, "rolling restored files back failed"),
                Err(u) => tracing::error!(error = %u, "rolling restored files back failed"),
            }
            return Err(e);
        }
        Ok::<_, RestoreError>(())
    }
    .await;
    let _ = tokio::task::spawn_blocking(move || stage.remove()).await;
    result.map(|()| report)
}

async fn unpack(path: &Path, into: &Path, apply: bool) -> Result<Vec<Change>, RestoreError> {
    let (path, into) = (path.to_path_buf(), into.to_path_buf());
    tokio::task::spawn_blocking(move || archive::unpack_tar_gz(&path, &into, apply))
        .await
        .map_err(|e| RestoreError::Files(e.to_string()))?
        .map_err(RestoreError::from)
}

/// A fresh staging directory inside the target root (so that moving out
/// of it is a rename on the same filesystem), removed at the end.
struct Stage {
    dir: PathBuf,
}

impl Stage {
    fn create(root: &Path, backup_id: &str) -> Result<Stage, RestoreError> {
        let dir = root.join(format!(".portico-restore-{backup_id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| RestoreError::Files(format!("{}: {e}", dir.display())))?;
        Ok(Stage { dir })
    }

    fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "staging directory not removed");
        }
    }
}

/// What [`commit`] did, so that it can be undone.
#[derive(Debug, Default)]
struct Moved {
    /// (destination, where its old file went, if it had one).
    files: Vec<(PathBuf, Option<PathBuf>)>,
    /// Directories created for new files, outermost first.
    dirs: Vec<PathBuf>,
}

impl Moved {
    /// Puts every replaced file back and removes what was created.
    fn undo(self) -> Result<(), RestoreError> {
        let mut first_error = None;
        for (dest, old) in self.files.into_iter().rev() {
            let r = match old {
                Some(old) => std::fs::rename(&old, &dest),
                None => std::fs::remove_file(&dest),
            };
            if let Err(e) = r {
                first_error.get_or_insert(format!("{}: {e}", dest.display()));
            }
        }
        for dir in self.dirs.into_iter().rev() {
            let _ = std::fs::remove_dir(&dir);
        }
        first_error.map_or(Ok(()), |e| Err(RestoreError::Files(e)))
    }
}

/// Moves each staged file over its destination (the old one aside into
/// `aside` first); on an error, undoes what it moved.
fn commit(staged: &[(PathBuf, PathBuf)], aside: &Path) -> Result<Moved, RestoreError> {
    let mut moved = Moved::default();
    let step = |moved: &mut Moved, (from, to): &(PathBuf, PathBuf), n: usize| -> std::io::Result<()> {
        if let Some(parent) = to.parent() {
            let mut missing = Vec::new();
            let mut p = parent.to_path_buf();
            while !p.exists() {
                missing.push(p.clone());
                if !p.pop() {
                    break;
                }
            }
            std::fs::create_dir_all(parent)?;
            moved.dirs.extend(missing.into_iter().rev());
        }
        let old = if to.exists() {
            let keep = aside.join(n.to_string());
            std::fs::create_dir_all(aside)?;
            std::fs::rename(to, &keep)?;
            Some(keep)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(from, to) {
            if let Some(keep) = &old {
                let _ = std::fs::rename(keep, to);
            }
            return Err(e);
        }
        moved.files.push((to.clone(), old));
        Ok(())
    };
    for (n, pair) in staged.iter().enumerate() {
        if let Err(e) = step(&mut moved, pair, n) {
            let why = format!("{}: {e}", pair.1.display());
            if let Err(u) = moved.undo() {
                tracing::error!(error = %u, "rolling restored files back failed");
            }
            return Err(RestoreError::Files(why));
        }
    }
    Ok(moved)
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
