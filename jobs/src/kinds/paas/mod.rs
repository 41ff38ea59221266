//! PaaS: hosted apps built from a git repository and run in capped Docker
//! containers, served by the gateway at `<app>.<paas.domain>` and
//! `/paas/<app>/` while their host ports stay private.
//!
//! A deploy is a task on the jobs queue (one active task per app): clone
//! ([`source`]), detect the type and generate a Dockerfile, tar the
//! context ([`context`]), build, start the new container next to the old
//! one ([`engine`]), wait for its health, then switch the app's route (a
//! fenced database update) and, once the gateways have had two polls to
//! follow, stop and remove the old container. If the new one
//! never becomes healthy the old one keeps serving and the task fails with
//! the new container's last log lines.
//!
//! The database row says which container serves an app; Docker labels say
//! which containers and images are this installation's (`portico.instance`
//! = `paas.instance`, `portico.app`, `portico.task`). [`Paas::watch`] keeps the
//! two in step: it follows a container to a new host port after Docker
//! restarted it, and removes containers and images that no app uses and
//! whose deploy task has ended (what a killed deploy leaves behind).

pub mod api;
pub mod context;
pub mod db;
pub mod engine;
pub mod source;
mod task;

pub use task::PaasKind;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use portico_config::PaasConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::queue::progress::Progress;
use crate::queue::{Claimed, Db, DbError};
use db::App;
use engine::{Engine, Limits, TASK_LABEL};
use source::{Kind, Repo};

/// Why a PaaS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PaasError {
    #[error("Docker engine not reachable at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("docker: {0}")]
    Docker(String),
    #[error("repository: {0}")]
    Repo(String),
    #[error("{0}")]
    Clone(String),
    #[error("{0}")]
    Detect(String),
    #[error("build context: {0}")]
    Context(String),
    #[error("image build failed:\n{0}")]
    Build(String),
    #[error("{0}")]
    Port(String),
    #[error(
        "the new container never became healthy at {path} within {secs} s ({last}); the previous version keeps serving. Last log lines:\n{logs}"
    )]
    Unhealthy {
        path: String,
        secs: u64,
        last: String,
        logs: String,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("the deploy lost its lease before switching; nothing was switched")]
    Fenced,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl PaasError {
    /// Worth another attempt: the engine, the network or the database
    /// may come back; a broken build or an unhealthy app will not.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PaasError::Unreachable { .. } | PaasError::Clone(_) | PaasError::Db(DbError::Unavailable(_))
        )
    }
}

/// How often [`Paas::watch`] looks for orphaned containers and images.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The PaaS engine of one jobs process.
pub struct Paas {
    pub cfg: PaasConfig,
    pub engine: Engine,
    work_dir: PathBuf,
    probe: reqwest::Client,
}

/// What a container is doing, as the API reports it.
pub fn state_of(app: &App, i: Option<&engine::Inspected>, max_restarts: u32) -> &'static str {
    match i {
        _ if app.container.is_none() => "not_deployed",
        None => "missing",
        Some(_) if app.desired == "stopped" => "stopped",
        Some(i) if i.running && !i.restarting => "running",
        Some(i) if i.restarting => "restarting",
        Some(i) if (i.exit_code != 0 || i.oom_killed) && i.restart_count >= i64::from(max_restarts) => {
            "failed"
        }
        Some(i) if i.exit_code != 0 => "crashed",
        Some(_) => "exited",
    }
}

/// Removes a directory when dropped (clones of finished deploys), on a
/// blocking thread: a clone can hold thousands of files.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.0);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || std::fs::remove_dir_all(dir));
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Runs blocking filesystem work off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, PaasError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PaasError::Context(e.to_string()))
}

impl Paas {
    pub fn new(cfg: &PaasConfig, data_dir: &std::path::Path) -> Paas {
        metrics::describe_histogram!(
            "portico_jobs_deploy_seconds",
            metrics::Unit::Seconds,
            "App deploys from claim to switch (or failure), by result."
        );
        metrics::describe_counter!(
            "portico_jobs_app_port_changes_total",
            "Times Docker published an app's container on a new host port (after a restart) and the route followed."
        );
        metrics::describe_counter!(
            "portico_jobs_orphans_removed_total",
            "App containers and images removed because no app used them and their task had ended, by kind."
        );
        Paas {
            cfg: cfg.clone(),
            engine: Engine::new(&cfg.docker, &cfg.instance),
            work_dir: cfg.work_dir.clone().unwrap_or_else(|| data_dir.join("paas")),
            probe: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(cfg.health.timeout_secs))
                .build()
                .expect("HTTP client"),
        }
    }

    fn limits(&self) -> Limits {
        let memory = (self.cfg.memory_mb << 20) as i64;
        Limits {
            memory_bytes: memory,
            nano_cpus: (self.cfg.cpus * 1e9).round() as i64,
            max_restarts: i64::from(self.cfg.max_restarts),
        }
    }

    /// Runs a deploy task for app `t.app`: build, start, health gate,
    /// switch. See the module docs.
    pub async fn deploy(&self, db: &Db, t: &Claimed, progress: &Progress) -> Result<Value, PaasError> {
        let started = Instant::now();
        let r = self.deploy_steps(db, t, progress).await;
        let result = match &r {
            Ok(_) => "ok",
            Err(PaasError::Cancelled) => "cancelled",
            Err(_) => "failed",
        };
        metrics::histogram!("portico_jobs_deploy_seconds", "result" => result)
            .record(started.elapsed().as_secs_f64());
        r
    }

    async fn deploy_steps(&self, db: &Db, t: &Claimed, progress: &Progress) -> Result<Value, PaasError> {
        let name = t
            .app
            .as_deref()
            .ok_or(PaasError::Docker("a deploy task names no app".into()))?;
        let app = db
            .app(name)
            .await?
            .ok_or_else(|| DbError::Missing(format!("app {name}")))?;
        let cancelled = || progress.meter.cancelled.load(Ordering::Acquire);
        let repo = Repo::parse(&app.repo, self.cfg.local_repos_root.as_deref()).map_err(PaasError::Repo)?;

        // An earlier attempt of this task (its worker died) may have left
        // a container: it is ours to remove, nobody else's.
        for c in self.engine.containers(Some(name)).await? {
            let mine = c.labels.as_ref().and_then(|l| l.get(TASK_LABEL)) == Some(&t.id.to_string());
            if let Some(id) = c.id.filter(|_| mine) {
                self.engine.remove_container(&id).await?;
            }
        }

        progress.step("clone");
        let dir = self.work_dir.join(format!("{name}-t{}-a{}", t.id, t.attempt));
        let (work, fresh) = (self.work_dir.clone(), dir.clone());
        blocking(move || {
            let _ = std::fs::remove_dir_all(&fresh);
            std::fs::create_dir_all(&work).map_err(|e| PaasError::Context(format!("{}: {e}", work.display())))
        })
        .await??;
        let _cleanup = RemoveOnDrop(dir.clone());
        let timeout = Duration::from_secs(self.cfg.clone_timeout_secs);
        let commit = source::clone(&repo, app.git_ref.as_deref(), &dir, timeout).await?;
        progress.line(&format!("cloned {} at {commit}", app.repo));

        progress.step("detect");
        let detect_dir = dir.clone();
        let kind = blocking(move || source::detect(&detect_dir)).await??;
        let generated = source::dockerfile(&kind, &self.cfg.images);
        progress.line(&format!(
            "type {}{}",
            kind.name(),
            if generated.is_some() {
                " (generated Dockerfile)"
            } else {
                ""
            }
        ));
        if cancelled() {
            return Err(PaasError::Cancelled);
        }

        progress.step("context");
        let max = self.cfg.max_context_bytes;
        let (ctx_dir, text) = (dir.clone(), generated.clone());
        let tar = tokio::task::spawn_blocking(move || context::tar(&ctx_dir, text.as_deref(), max))
            .await
            .map_err(|e| PaasError::Context(e.to_string()))??;
        progress.line(&format!("build context {} bytes", tar.len()));

        progress.step("build");
        let instance = self.engine.instance();
        let tag = format!("{instance}-app-{name}:t{}", t.id);
        let labels = self.engine.labels(name, t.id);
        let dockerfile = if generated.is_some() {
            context::GENERATED_DOCKERFILE
        } else {
            "Dockerfile"
        };
        // From here on the new image (and, once started, the new container)
        // are this attempt's: any failure removes them, in one place.
        let mut started: Option<String> = None;
        let outcome = async {
            let build = self
                .engine
                .build(tar, dockerfile, &tag, labels.clone(), |l| progress.line(l));
            match tokio::time::timeout(Duration::from_secs(self.cfg.build_timeout_secs), build).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(PaasError::Build(format!(
                        "timed out after {} s (paas.build_timeout_secs)",
                        self.cfg.build_timeout_secs
                    )));
                }
            }
            if cancelled() {
                return Err(PaasError::Cancelled);
            }
            let port = match app
                .port
                .map(|p| p as u16)
                .or_else(|| source::generated_port(&kind))
            {
                Some(p) => p,
                None => self.engine.exposed_port(&tag).await?.ok_or_else(|| {
                    PaasError::Port(
                        "the image does not EXPOSE exactly one TCP port: set the app's port".into(),
                    )
                })?,
            };

            progress.step("start");
            let cname = format!("{instance}-{name}-t{}-a{}", t.id, t.attempt);
            self.engine.remove_container(&cname).await?;
            let id = self.engine.run(&cname, &tag, port, labels, self.limits()).await?;
            started = Some(id.clone());

            progress.step("health");
            let host_port = match self.wait_healthy(&id, &app.health_path, &cancelled).await {
                Ok(p) => p,
                Err(PaasError::Unhealthy { path, secs, last, .. }) => {
                    let logs = self.engine.log_tail(&id, 20).await;
                    return Err(PaasError::Unhealthy {
                        path,
                        secs,
                        last,
                        logs: source::last_lines(&logs, 20).replace(" | ", "\n"),
                    });
                }
                Err(e) => return Err(e),
            };

            progress.step("switch");
            let old = db
                .switch_app(t, name, kind.name(), &id, &tag, host_port)
                .await?
                .ok_or(PaasError::Fenced)?;
            Ok((id, port, old))
        }
        .await;
        let (id, port, (old_container, old_image)) = match outcome {
            Ok(v) => v,
            Err(e) => {
                if let Some(id) = &started {
                    let _ = self.engine.remove_container(id).await;
                }
                let _ = self.engine.remove_image(&tag).await;
                return Err(e);
            }
        };
        // The gateways pick the new route up at their next poll; until
        // then (and for requests already in flight) the old container
        // keeps answering: wait two polls, then stop it gracefully. A
        // failure here leaves an orphan that `watch` removes.
        if let Some(old) = old_container.filter(|o| *o != id) {
            progress.step("drain");
            tokio::time::sleep(Duration::from_millis(2 * self.cfg.routes_poll_ms + 250)).await;
            let _ = self.engine.stop(&old).await;
            let _ = self.engine.remove_container(&old).await;
        }
        if let Some(old) = old_image.filter(|o| *o != tag) {
            let _ = self.engine.remove_image(&old).await;
        }
        let kind_name = match kind {
            Kind::Static(root) => format!("static ({root})"),
            k => k.name().to_string(),
        };
        Ok(json!({
            "app": name,
            "commit": commit,
            "type": kind_name,
            "image": tag,
            "container": &id[..id.len().min(12)],
            "container_port": port,
        }))
    }

    /// Probes the container every `health.interval_ms` until it answers
    /// 2xx/3xx on `path`; returns its host port. Re-reads the port on each
    /// round: Docker may publish another one after a restart.
    async fn wait_healthy(
        &self,
        id: &str,
        path: &str,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<u16, PaasError> {
        let h = &self.cfg.health;
        let deadline = Instant::now() + Duration::from_secs(h.deadline_secs);
        let mut last;
        loop {
            if cancelled() {
                return Err(PaasError::Cancelled);
            }
            match self.engine.inspect(id).await? {
                None => last = "the container disappeared".into(),
                Some(i)
                    if !i.running && !i.restarting && i.restart_count >= i64::from(self.cfg.max_restarts) =>
                {
                    last = format!(
                        "the container exited with code {} and is not restarted",
                        i.exit_code
                    );
                    break;
                }
                Some(i) => match i.host_port {
                    Some(port) if i.running => {
                        let url = format!("http://127.0.0.1:{port}{path}");
                        match self.probe.get(&url).send().await {
                            Ok(r) if r.status().is_success() || r.status().is_redirection() => {
                                return Ok(port);
                            }
                            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
                            Err(e) => last = error_chain(&e),
                        }
                    }
                    _ => last = format!("container {}", i.status),
                },
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(h.interval_ms)).await;
        }
        Err(PaasError::Unhealthy {
            path: path.to_string(),
            secs: h.deadline_secs,
            last,
            logs: String::new(),
        })
    }

    /// The app's container state and resource use, from Docker.
    pub async fn status(&self, app: &App) -> Result<Value, PaasError> {
        let Some(id) = app.container.as_deref() else {
            return Ok(json!({ "state": "not_deployed" }));
        };
        let i = self.engine.inspect(id).await?;
        let state = state_of(app, i.as_ref(), self.cfg.max_restarts);
        let stats = match &i {
            Some(i) if i.running => self.engine.stats(id).await?,
            _ => None,
        };
        Ok(json!({
            "state": state,
            "container": i.as_ref().map(|i| json!({
                "status": i.status,
                "exit_code": i.exit_code,
                "oom_killed": i.oom_killed,
                "restart_count": i.restart_count,
            })),
            "limits": i.as_ref().map(|i| json!({
                "memory_bytes": i.memory,
                "memory_swap_bytes": i.memory_swap,
                "nano_cpus": i.nano_cpus,
                "restart_policy": i.restart_policy.0,
                "max_restarts": i.restart_policy.1,
            })),
            "stats": stats,
        }))
    }

    /// Removes everything Docker holds for `app` (containers, images) and
    /// its leftover clones.
    pub async fn remove_all(&self, app: &str) -> Result<(), PaasError> {
        for c in self.engine.containers(Some(app)).await? {
            if let Some(id) = c.id {
                self.engine.remove_container(&id).await?;
            }
        }
        for (id, _, _) in self.engine.images(Some(app)).await? {
            self.engine.remove_image(&id).await?;
        }
        let (work, prefix) = (self.work_dir.clone(), format!("{app}-t"));
        blocking(move || {
            for e in std::fs::read_dir(&work).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        })
        .await
    }

    /// Keeps the database in step with Docker until `stop` (see the module
    /// docs): ports every `paas.routes_poll_ms`, orphans every 30 s.
    pub async fn watch(self: Arc<Self>, db: Db, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.routes_poll_ms.max(250)));
        // The first round sweeps: what a killed process left goes at start.
        let mut last_sweep: Option<Instant> = None;
        let mut warned = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sweep = last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            match self.reconcile(&db, sweep).await {
                Ok(()) => warned = false,
                Err(e) if !warned => {
                    tracing::warn!(error = %e, "cannot compare apps with Docker");
                    warned = true;
                }
                Err(_) => {}
            }
            if sweep {
                last_sweep = Some(Instant::now());
            }
        }
    }

    /// One round of [`Paas::watch`].
    pub async fn reconcile(&self, db: &Db, sweep: bool) -> Result<(), PaasError> {
        let apps = db.apps().await?;
        if apps.is_empty() && !sweep {
            return Ok(());
        }
        let containers = self.engine.containers(None).await?;
        for app in &apps {
            let Some(current) = &app.container else { continue };
            let Some(c) = containers.iter().find(|c| c.id.as_ref() == Some(current)) else {
                continue;
            };
            let port = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.ip.as_deref() == Some("127.0.0.1"))
                .and_then(|p| p.public_port);
            if db.set_app_port(&app.name, current, port).await? {
                metrics::counter!("portico_jobs_app_port_changes_total").increment(1);
                tracing::info!(app = app.name, port, "app container published on a new port");
            }
        }
        if !sweep {
            return Ok(());
        }
        for app in &apps {
            if let Some(current) = &app.container
                && let Ok(Some(i)) = self.engine.inspect(current).await
            {
                metrics::gauge!("portico_jobs_app_restarts", "app" => app.name.clone())
                    .set(i.restart_count as f64);
            }
        }
        // Listed before the task states are read: whatever a deploy
        // starts after this point is not in these lists.
        let image_list = self.engine.images(None).await?;
        let task_of = |labels: Option<&HashMap<String, String>>| -> Option<i64> {
            labels?.get(TASK_LABEL)?.parse().ok()
        };
        let ids: Vec<i64> = containers
            .iter()
            .filter_map(|c| task_of(c.labels.as_ref()))
            .chain(image_list.iter().filter_map(|(_, _, l)| task_of(Some(l))))
            .collect();
        let ended: HashSet<i64> = db.ended_tasks(&ids).await?.into_iter().collect();
        // An orphan was made by a task that has ended (so not by a deploy
        // in progress) and this database knows (a restored or foreign
        // database must not make us remove what serves). The builder adds
        // labels one step at a time, so its intermediate images may lack
        // the task label: those are left alone too.
        let orphan_task =
            |labels: Option<&HashMap<String, String>>| task_of(labels).is_some_and(|t| ended.contains(&t));
        let serving: HashSet<&str> = apps.iter().filter_map(|a| a.container.as_deref()).collect();
        for c in &containers {
            let Some(id) = c.id.as_deref() else { continue };
            if !serving.contains(id) && orphan_task(c.labels.as_ref()) {
                tracing::info!(container = id, "removing an orphaned app container");
                metrics::counter!("portico_jobs_orphans_removed_total", "kind" => "container").increment(1);
                self.engine.remove_container(id).await?;
            }
        }
        let images: HashSet<&str> = apps.iter().filter_map(|a| a.image.as_deref()).collect();
        for (id, tags, labels) in image_list {
            if !tags.iter().any(|t| images.contains(t.as_str())) && orphan_task(Some(&labels)) {
                tracing::info!(image = id, "removing an orphaned app image");
                metrics::counter!("portico_jobs_orphans_removed_total", "kind" => "image").increment(1);
                self.engine.remove_image(&id).await?;
            }
        }
        Ok(())
    }
}

/// An error and its sources, on one line (reqwest hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
