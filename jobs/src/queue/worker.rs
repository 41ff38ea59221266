//! Workers: claim tasks, run them under a renewed lease, report progress,
//! and end each attempt with a fenced update; the reaper takes back tasks
//! whose worker died. Every task belongs to this module's `JoinSet`.
//!
//! What a task does is its [`Kind`]'s business: the worker looks the kind
//! up by the task's `kind` column and knows nothing else about it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portico_config::JobsConfig;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use std::collections::HashMap;

use tracing::Instrument;

use super::db::{Claimed, Db, Outcome, Subject};
use super::progress::{Events, Progress};
use crate::archive::Meter;

/// A task kind: what runs when a task of this kind is claimed.
#[async_trait::async_trait]
pub trait Kind: Send + Sync + 'static {
    /// The task's `kind` column (and the prefix of its events).
    fn name(&self) -> &'static str;

    /// Runs one attempt. Progress goes to `progress`; a cancel request
    /// sets `progress.meter.cancelled`.
    async fn perform(&self, t: &Claimed, progress: &Arc<Progress>) -> Result<Value, Failure>;

    /// After an attempt failed, or its lease ran out: remove what a dead
    /// attempt leaves behind (partial files). Runs before any retry.
    async fn abandoned(&self, _subject: Subject<'_>) {}

    /// Background work the kind needs while the service runs (e.g. keeping
    /// containers in their desired state), until `stop`.
    async fn watch(self: Arc<Self>, _stop: CancellationToken) {}
}

/// Runs `f` every `period` until `stop` (a kind's [`Kind::watch`] work,
/// such as publishing gauges).
pub async fn every<F, Fut>(period: Duration, stop: CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => f().await,
        }
    }
}

/// What a task failed with, and whether to try again.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub retryable: bool,
    pub cancelled: bool,
}

impl Failure {
    /// Will not get better by trying again.
    pub fn fatal(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: false,
            cancelled: false,
        }
    }

    /// Transient: the task is queued again while attempts remain.
    pub fn retry(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: true,
            cancelled: false,
        }
    }

    /// Stopped on request.
    pub fn cancelled(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: false,
            cancelled: true,
        }
    }
}

pub struct Workers {
    db: Db,
    cfg: JobsConfig,
    events: Events,
    kinds: HashMap<&'static str, Arc<dyn Kind>>,
}

impl Workers {
    pub fn new(db: Db, cfg: JobsConfig, events: Events, kinds: &[Arc<dyn Kind>]) -> Workers {
        Workers {
            db,
            cfg,
            events,
            kinds: kinds.iter().map(|k| (k.name(), k.clone())).collect(),
        }
    }

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
        for k in self.kinds.values() {
            set.spawn(k.clone().watch(stop.clone()));
        }
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
            if let Ok(active) = self.db.active_counts().await {
                for kind in self.kinds.keys() {
                    for state in ["queued", "running"] {
                        let n = active
                            .iter()
                            .find(|(k, s, _)| k == kind && s == state)
                            .map_or(0, |(_, _, n)| *n);
                        metrics::gauge!("portico_jobs_tasks", "kind" => *kind, "state" => state)
                            .set(n as f64);
                    }
                }
            }
            match self.db.reap().await {
                Ok(reaped) => {
                    for r in reaped {
                        tracing::warn!(task = r.id, subject = %r.subject(), kind = r.kind, state = r.state, "lease expired: worker lost");
                        metrics::counter!("portico_jobs_tasks_reaped_total", "kind" => r.kind.clone())
                            .increment(1);
                        if r.state == "failed"
                            && let Some(k) = self.kinds.get(r.kind.as_str())
                        {
                            k.abandoned(r.subject()).await;
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
        self.attempt(t).instrument(span).await
    }

    async fn attempt(&self, t: Claimed) {
        tracing::info!("task started");
        let kind = self.kinds.get(t.kind.as_str()).cloned();
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
        let result = match &kind {
            Some(k) => k.perform(&t, &progress).await,
            None => Err(Failure::fatal(format!("unknown task kind `{}`", t.kind))),
        };
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
            && let Some(k) = &kind
        {
            k.abandoned(t.subject()).await;
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
