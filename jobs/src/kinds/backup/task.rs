//! The `backup` task: runs a backup, records its row once per task, then
//! applies retention. A re-run after a crash that had already recorded its
//! backup returns that one instead of making a second.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portico_config::JobsConfig;
use serde_json::{Value, json};

use super::{BackupError, Include, Settings};
use crate::queue::progress::Progress;
use crate::queue::{Claimed, Db, Failure, Kind, Subject};

pub struct BackupKind {
    pub db: Db,
    pub cfg: JobsConfig,
}

impl From<BackupError> for Failure {
    fn from(e: BackupError) -> Failure {
        Failure {
            cancelled: matches!(e, BackupError::Cancelled),
            retryable: e.retryable(),
            message: e.to_string(),
        }
    }
}

/// A backup made (or found) by a task.
pub struct Made {
    pub id: String,
    pub size: u64,
    pub retention_deleted: Vec<String>,
    /// Recorded by an earlier attempt of the same task.
    pub recovered: bool,
}

impl BackupKind {
    /// Keeps the newest `keep` backups of a customer (directories and rows).
    async fn retain(&self, customer: &str, root: &Path, keep: usize) -> Vec<String> {
        let root = root.to_path_buf();
        let deleted = tokio::task::spawn_blocking(move || super::retain(&root, keep))
            .await
            .unwrap_or_default();
        for old in &deleted {
            let _ = self.db.delete_backup(customer, old).await;
        }
        deleted
    }

    /// Makes a backup of `t`'s customer for task `t` (recorded as `kind`),
    /// once: an attempt that finds the task's backup recorded returns it.
    /// Used by the backup task and by tasks that need one first (upgrade).
    pub async fn make(
        &self,
        t: &Claimed,
        kind: &str,
        inc: Include,
        progress: &Arc<Progress>,
    ) -> Result<Made, Failure> {
        let c = crate::customers::of_task(&self.db, t).await?;
        let settings = Settings::from(&self.cfg);
        let root = PathBuf::from(&c.root);
        if let Some((id, size)) = self
            .db
            .backup_of_task(t.id)
            .await
            .map_err(|e| Failure::retry(e.to_string()))?
        {
            let retention_deleted = self.retain(&c.id, &root, settings.keep).await;
            return Ok(Made {
                id,
                size,
                retention_deleted,
                recovered: true,
            });
        }
        let started = std::time::Instant::now();
        let (id, manifest) = super::run(&c, kind, inc, &settings, progress.clone()).await?;
        let size = manifest["stats"]["total_bytes"].as_u64().unwrap_or(0);
        let recorded = self
            .db
            .add_backup(t, &id, kind, size, started.elapsed(), &manifest)
            .await
            .map_err(|e| Failure::retry(e.to_string()))?;
        if !recorded {
            // Another attempt owns the task now: this copy is surplus.
            let dir = super::backups_dir(&root).join(&id);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            return Err(Failure::fatal("the task was taken over by another attempt"));
        }
        // Only now that the new one is complete: drop the oldest.
        let retention_deleted = self.retain(&c.id, &root, settings.keep).await;
        Ok(Made {
            id,
            size,
            retention_deleted,
            recovered: false,
        })
    }
}

#[async_trait::async_trait]
impl Kind for BackupKind {
    fn name(&self) -> &'static str {
        "backup"
    }

    async fn perform(&self, t: &Claimed, progress: &Arc<Progress>) -> Result<Value, Failure> {
        let kind = t.params["type"].as_str().unwrap_or("fast").to_string();
        let inc: Include = serde_json::from_value(t.params["include"].clone()).unwrap_or(Include::FAST);
        let started = std::time::Instant::now();
        let made = self.make(t, &kind, inc, progress).await?;
        let mut result = json!({
            "backup": made.id,
            "size_bytes": made.size,
            "retention_deleted": made.retention_deleted,
        });
        if made.recovered {
            result["recovered"] = json!(true);
        } else {
            result["duration_ms"] = json!(started.elapsed().as_millis() as u64);
        }
        Ok(result)
    }

    async fn abandoned(&self, subject: Subject<'_>) {
        clean_partials_of(&self.db, subject).await;
    }

    /// Publishes each customer's backup freshness every 30 s.
    async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        crate::queue::every(std::time::Duration::from_secs(30), stop, || async {
            for (customer, at) in self.db.backup_freshness().await.unwrap_or_default() {
                metrics::gauge!("portico_jobs_backup_last_success_timestamp_seconds", "customer" => customer)
                    .set(at);
            }
        })
        .await
    }
}

/// Removes the partial backups a dead attempt left in the customer's tree.
pub async fn clean_partials_of(db: &Db, subject: Subject<'_>) {
    if let Subject::Customer(id) = subject
        && let Ok(Some(c)) = db.customer(id).await
    {
        let root = PathBuf::from(c.root);
        let _ = tokio::task::spawn_blocking(move || super::clean_partials(&root)).await;
    }
}
