//! Workers: claim tasks, run them under a renewed lease, report progress,
//! and end each attempt with a fenced update; the reaper takes back tasks
//! whose worker died. Every task belongs to this module's `JoinSet`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portico_config::JobsConfig;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::archive::Meter;
use crate::backup::{self, Include};
use crate::db::{Claimed, Db, Outcome};
use crate::progress::{Events, Progress};
use crate::restore;

pub struct Workers {
    pub db: Db,
    pub cfg: JobsConfig,
    pub events: Events,
    pub paas: Arc<crate::paas::Paas>,
}

/// What a task failed with, and whether to try again.
struct Failure {
    message: String,
    retryable: bool,
    cancelled: bool,
}

impl Workers {
    fn lease(&self) -> Duration {
        Duration::from_secs(self.cfg.lease_secs)
    }

    /// Runs the workers and the reaper until `stop`. A task still running
    /// then is left to its lease: another process takes it over.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut set = JoinSet::new();
        for _ in 0..self.cfg.workers {
            set.spawn(self.clone().claim_loop(stop.clone()));
        }
        set.spawn(self.clone().reap_loop(stop.clone()));
        while set.join_next().await.is_some() {}
    }

    async fn claim_loop(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let wait = match self.db.claim(self.lease()).await {
                Ok(Some(task)) => {
                    tokio::select! {
                        _ = self.execute(task) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
                Ok(None) => Duration::from_millis(300),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim tasks");
                    Duration::from_secs(2)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn reap_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.reap_secs));
        let mut rounds = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.db.reap().await {
                Ok(reaped) => {
                    for (id, customer, state) in reaped {
                        tracing::warn!(task = id, customer, state, "lease expired: worker lost");
                        metrics::counter!("portico_jobs_tasks_reaped_total").increment(1);
                        if state == "failed"
                            && let Some(customer) = customer
                            && let Ok(Some(c)) = self.db.customer(&customer).await
                        {
                            backup::clean_partials(std::path::Path::new(&c.root));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reaper cannot reach the database"),
            }
            rounds += 1;
            if rounds % 720 == 1
                && let Ok(n) = self.db.prune(self.cfg.prune_after_days).await
                && n > 0
            {
                tracing::info!(tasks = n, "pruned finished tasks");
            }
        }
    }

    async fn execute(&self, t: Claimed) {
        let span = tracing::info_span!("task", id = t.id, kind = %t.kind, subject = %t.subject(), attempt = t.attempt);
        let _e = span.enter();
        tracing::info!("task started");
        let meter = Meter::new(self.cfg.backup_max_bytes_per_sec);
        let progress = Progress::new(meter.clone());
        let lost = Arc::new(AtomicBool::new(false));
        let beat_stop = CancellationToken::new();
        let beat = tokio::spawn(heartbeat(
            self.db.clone(),
            self.events.clone(),
            t.clone(),
            self.lease(),
            progress.clone(),
            lost.clone(),
            beat_stop.clone(),
        ));
        let result = self.perform(&t, progress.clone()).await;
        beat_stop.cancel();
        let _ = beat.await;
        if lost.load(Ordering::Acquire) {
            tracing::warn!("lease lost while running; the attempt's result is discarded");
            return;
        }
        let event = format!("{}-", t.kind);
        let mut last = serde_json::to_value(progress.snapshot()).unwrap_or_default();
        let (outcome, result_value, message) = match &result {
            Ok(v) => {
                last["percent"] = json!(100);
                last["step"] = json!("done");
                (Outcome::Succeeded(v), Some(v.clone()), None)
            }
            Err(f) if f.cancelled => (
                Outcome::Cancelled(f.message.clone()),
                None,
                Some(f.message.clone()),
            ),
            Err(f) if f.retryable => {
                let backoff = (2u64 << (t.attempt.clamp(1, 6) - 1)).min(60);
                let jitter = rand::random::<u64>() % 1000;
                let retry_in = Duration::from_secs(backoff) + Duration::from_millis(jitter);
                (
                    Outcome::Retry {
                        error: f.message.clone(),
                        retry_in,
                    },
                    None,
                    Some(f.message.clone()),
                )
            }
            Err(f) => (Outcome::Failed(f.message.clone()), None, Some(f.message.clone())),
        };
        if result.is_err()
            && let Some(c) = self.customer(&t).await
        {
            backup::clean_partials(std::path::Path::new(&c.root));
        }
        match self.db.finish(&t, outcome, &last).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("task was taken over before it finished; result discarded");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the task's end; the reaper will retry it");
                return;
            }
        }
        let (name, data, result_label) = match (&result_value, &message) {
            (Some(v), _) => (format!("{event}completed"), v.clone(), "ok"),
            (None, Some(m)) => (format!("{event}failed"), json!({ "error": m }), "failed"),
            (None, None) => unreachable!("a task ends with a result or an error"),
        };
        metrics::counter!("portico_jobs_tasks_total", "kind" => t.kind.clone(), "result" => result_label)
            .increment(1);
        tracing::info!(result = result_label, error = message.as_deref(), "task ended");
        self.events
            .publish(
                t.subject(),
                &format!("t{}-a{}-end", t.id, t.attempt),
                &name,
                t.id,
                data.clone(),
            )
            .await;
        let _ = self
            .db
            .audit(
                &t.created_by,
                &format!("task.{}", t.kind),
                t.subject(),
                Some(&t.id.to_string()),
                result_label,
                &data,
            )
            .await;
    }

    async fn customer(&self, t: &Claimed) -> Option<crate::db::Customer> {
        self.db.customer(t.customer_id.as_deref()?).await.ok().flatten()
    }

    /// Keeps the newest `keep` backups of a customer (directories and rows).
    async fn retain(&self, customer: &str, root: &std::path::Path, keep: usize) -> Vec<String> {
        let root = root.to_path_buf();
        let deleted = tokio::task::spawn_blocking(move || backup::retain(&root, keep))
            .await
            .unwrap_or_default();
        for old in &deleted {
            let _ = self.db.delete_backup(customer, old).await;
        }
        deleted
    }

    async fn perform(&self, t: &Claimed, progress: Arc<Progress>) -> Result<Value, Failure> {
        let fail = |message: String, retryable: bool| Failure {
            message,
            retryable,
            cancelled: false,
        };
        if t.kind == "deploy" {
            return self
                .paas
                .deploy(&self.db, t, &progress)
                .await
                .map_err(|e| Failure {
                    cancelled: matches!(e, crate::paas::PaasError::Cancelled),
                    retryable: e.retryable(),
                    message: e.to_string(),
                });
        }
        let c = self.customer(t).await.ok_or_else(|| {
            fail(
                format!(
                    "customer {} is not registered",
                    t.customer_id.as_deref().unwrap_or("?")
                ),
                false,
            )
        })?;
        match t.kind.as_str() {
            "backup" => {
                let settings = backup::Settings::from(&self.cfg);
                let root = std::path::PathBuf::from(&c.root);
                // A previous attempt died after recording its backup: that
                // one is the task's result, not a reason for a second.
                if let Some((id, size)) = self
                    .db
                    .backup_of_task(t.id)
                    .await
                    .map_err(|e| fail(e.to_string(), true))?
                {
                    let deleted = self.retain(&c.id, &root, settings.keep).await;
                    return Ok(
                        json!({ "backup": id, "size_bytes": size, "recovered": true, "retention_deleted": deleted }),
                    );
                }
                let kind = t.params["type"].as_str().unwrap_or("fast").to_string();
                let inc: Include =
                    serde_json::from_value(t.params["include"].clone()).unwrap_or(Include::FAST);
                let started = std::time::Instant::now();
                let (id, manifest) = backup::run(&c, &kind, inc, &settings, progress)
                    .await
                    .map_err(|e| Failure {
                        cancelled: matches!(e, backup::BackupError::Cancelled),
                        retryable: e.retryable(),
                        message: e.to_string(),
                    })?;
                let size = manifest["stats"]["total_bytes"].as_u64().unwrap_or(0);
                let recorded = self
                    .db
                    .add_backup(t, &id, &kind, size, started.elapsed(), &manifest)
                    .await
                    .map_err(|e| fail(e.to_string(), true))?;
                if !recorded {
                    // Another attempt owns the task now: this copy is surplus.
                    let dir = backup::backups_dir(&root).join(&id);
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                    return Err(fail("the task was taken over by another attempt".into(), false));
                }
                // Only now that the new one is complete: drop the oldest.
                let deleted = self.retain(&c.id, &root, settings.keep).await;
                Ok(
                    json!({ "backup": id, "size_bytes": size, "duration_ms": started.elapsed().as_millis() as u64, "retention_deleted": deleted }),
                )
            }
            "restore" => {
                progress.step("restore");
                let o = restore::Options {
                    dry_run: t.params["dry_run"].as_bool().unwrap_or(false),
                    target_db: t.params["target_db"].as_str().map(str::to_string),
                    target_root: None,
                    pg_bin_dir: self.cfg.pg_bin_dir.clone(),
                };
                let backup_id = t.params["backup"].as_str().unwrap_or_default();
                restore::restore(&c, backup_id, &o)
                    .await
                    .map_err(|e| fail(e.to_string(), false))
            }
            other => Err(fail(format!("unknown task kind `{other}`"), false)),
        }
    }
}

/// Renews the lease and publishes progress every second while the task
/// runs; flags `lost` (and stops the task's reads) if the lease is gone,
/// and stops the reads when a cancel was requested.
async fn heartbeat(
    db: Db,
    events: Events,
    t: Claimed,
    lease: Duration,
    progress: Arc<Progress>,
    lost: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let every = (lease / 3).min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = serde_json::to_value(progress.snapshot()).unwrap_or_default();
        match db.heartbeat(&t, lease, &snap).await {
            Ok(Some(cancel)) => {
                if cancel {
                    progress.meter.cancelled.store(true, Ordering::Release);
                }
            }
            Ok(None) => {
                lost.store(true, Ordering::Release);
                progress.meter.cancelled.store(true, Ordering::Release);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; the lease may run out"),
        }
        seq += 1;
        events
            .publish(
                t.subject(),
                &format!("t{}-a{}-p{seq}", t.id, t.attempt),
                &format!("{}-progress", t.kind),
                t.id,
                snap,
            )
            .await;
    }
}
