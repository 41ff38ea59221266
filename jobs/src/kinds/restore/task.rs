//! The `restore` task: one attempt (a restore is all or nothing, and not
//! retried on its own).

use std::sync::Arc;

use portico_config::JobsConfig;
use serde_json::Value;

use crate::queue::progress::Progress;
use crate::queue::{Claimed, Db, Failure, Kind};

pub struct RestoreKind {
    pub db: Db,
    pub cfg: JobsConfig,
}

#[async_trait::async_trait]
impl Kind for RestoreKind {
    fn name(&self) -> &'static str {
        "restore"
    }

    async fn perform(&self, t: &Claimed, progress: &Arc<Progress>) -> Result<Value, Failure> {
        let c = crate::customers::of_task(&self.db, t).await?;
        progress.step("restore");
        let o = super::Options {
            dry_run: t.params["dry_run"].as_bool().unwrap_or(false),
            target_db: t.params["target_db"].as_str().map(str::to_string),
            target_root: None,
            pg_bin_dir: self.cfg.pg_bin_dir.clone(),
        };
        let backup_id = t.params["backup"].as_str().unwrap_or_default();
        super::restore(&c, backup_id, &o)
            .await
            .map_err(|e| Failure::fatal(e.to_string()))
    }
}
