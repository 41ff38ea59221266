//! The `backups` table: one row per completed backup, written once per
//! task and fenced by the attempt that made it.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::queue::db::{Claimed, Db, DbError, unavailable};

/// A completed backup's row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BackupRow {
    pub id: String,
    pub task: i64,
    pub kind: String,
    pub size_bytes: i64,
    pub duration_ms: i64,
    pub created_by: String,
    pub created_at: String,
    pub manifest: Value,
}

impl Db {
    #[allow(clippy::too_many_arguments)]
    pub async fn add_backup(
        &self,
        t: &Claimed,
        id: &str,
        kind: &str,
        size: u64,
        duration: Duration,
        manifest: &Value,
    ) -> Result<bool, DbError> {
        // Fenced by the attempt, and once per task: `false` if this attempt
        // no longer owns the task or the task already has its backup.
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO backups (customer_id, id, task_id, kind, size_bytes, duration_ms, manifest, created_by)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8
                 WHERE EXISTS (SELECT 1 FROM tasks WHERE id = $3 AND attempt = $9 AND state = 'running')
                 ON CONFLICT (task_id) DO NOTHING",
                &[
                    &t.customer_id,
                    &id,
                    &t.id,
                    &kind,
                    &(size as i64),
                    &(duration.as_millis() as i64),
                    manifest,
                    &t.created_by,
                    &t.attempt,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    /// The backup a task recorded, if it got that far (id, size, manifest).
    pub async fn backup_of_task(&self, task: i64) -> Result<Option<(String, u64)>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT id, size_bytes FROM backups WHERE task_id = $1", &[&task])
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
    }

    /// Newest first.
    pub async fn backups(&self, customer: &str) -> Result<Vec<BackupRow>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, task_id, kind, size_bytes, duration_ms, created_by,
                        to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), manifest
                 FROM backups WHERE customer_id = $1 ORDER BY created_at DESC, id DESC",
                &[&customer],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| BackupRow {
                id: r.get(0),
                task: r.get(1),
                kind: r.get(2),
                size_bytes: r.get(3),
                duration_ms: r.get(4),
                created_by: r.get(5),
                created_at: r.get(6),
                manifest: r.get(7),
            })
            .collect())
    }

    pub async fn delete_backup(&self, customer: &str, id: &str) -> Result<bool, DbError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM backups WHERE customer_id = $1 AND id = $2",
                &[&customer, &id],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    /// Per customer, when its newest backup was made (epoch seconds), or
    /// when it was registered while it has none.
    pub async fn backup_freshness(&self) -> Result<Vec<(String, f64)>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT c.id, extract(epoch FROM coalesce(max(b.created_at), c.created_at))::float8
                 FROM customers c LEFT JOIN backups b ON b.customer_id = c.id GROUP BY c.id, c.created_at",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
