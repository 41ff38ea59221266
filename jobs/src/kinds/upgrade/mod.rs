//! Blue/green upgrades of a customer's shop (seed 001 §3.2, §8, §9), and
//! the two tasks built from the same steps: `rollback` (back to the
//! previous release) and `serve` (start the installed release, e.g. the
//! first time a shop is put behind the gateway).
//!
//! `upgrade` to release X: a `pre-upgrade` backup (no backup, no upgrade)
//! → the old layout moved into `releases/` ([`layout::migrate`]) → X
//! unpacked into `releases/X` (checksums first) → `.env` merged (new keys
//! added, values kept; optionally approved by a person) → install,
//! migrate, build (timeouts, last lines in progress) → X started as a
//! second instance ("green") on free loopback ports through the customer's
//! process manager ([`pm`]) → health checks on green → **switch**: the
//! route (a fenced `shop_sites` update the gateways poll), then `current`
//! (one rename) → the gateways given two polls to follow, the old instance
//! ("blue") the drain time for requests it already has → the checks again,
//! through the gateway → blue stopped.
//!
//! A failure before the switch stops green: blue never stopped serving. A
//! failure after it switches back (route and `current`) while blue still
//! runs, and checks blue. Killed anywhere, a retry runs the same steps
//! again, each of which sees what is done: the backup is the task's own,
//! the unpacked release carries the task's marker, a switch already made
//! by this task is found in `shop_sites`.

pub mod api;
pub mod catalog;
pub mod db;
pub mod layout;
pub mod pm;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portico_config::JobsConfig;
use semver::Version;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::customers::Customer;
use crate::kinds::backup::{BackupKind, Include};
use crate::queue::progress::Progress;
use crate::queue::{Claimed, Db, Failure, Kind};
use catalog::{Catalog, Release, SERVICES};
use db::{Instance, Instances, Site};

/// Which task of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Upgrade,
    Rollback,
    Serve,
}

impl Mode {
    pub fn kind(self) -> &'static str {
        match self {
            Mode::Upgrade => "upgrade",
            Mode::Rollback => "rollback",
            Mode::Serve => "serve",
        }
    }
}

/// What the upgrade routes and tasks share: config, and the count of
/// route-table fetches by the gateways (a switch waits for two).
pub struct Shared {
    pub cfg: JobsConfig,
    polls: AtomicU64,
    polled: tokio::sync::Notify,
}

impl Shared {
    pub fn new(cfg: &JobsConfig) -> Shared {
        metrics::describe_histogram!(
            "portico_jobs_upgrade_seconds",
            metrics::Unit::Seconds,
            "Upgrades, rollbacks and serves of shops, by kind and result (ok, failed, rolled_back)."
        );
        Shared {
            cfg: cfg.clone(),
            polls: AtomicU64::new(0),
            polled: tokio::sync::Notify::new(),
        }
    }

    pub fn catalog(&self) -> Result<Catalog, catalog::CatalogError> {
        Catalog::load(&self.cfg.upgrade.releases)
    }

    /// A gateway fetched the route table.
    pub fn note_poll(&self) {
        self.polls.fetch_add(1, Ordering::AcqRel);
        self.polled.notify_waiters();
    }

    /// Waits until the gateways fetched the table twice since now (so the
    /// first fetch's answer is installed), or `max`. False: timed out.
    async fn two_polls(&self, max: Duration) -> bool {
        let start = self.polls.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + max;
        while self.polls.load(Ordering::Acquire) < start + 2 {
            let notified = self.polled.notified();
            if self.polls.load(Ordering::Acquire) >= start + 2 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// The hostnames a shop is served on, by service.
pub fn hosts(domain: &str) -> [(&'static str, String); 3] {
    [
        ("store", domain.to_string()),
        ("admin", format!("admin.{domain}")),
        ("backend", format!("api.{domain}")),
    ]
}

pub struct UpgradeKind {
    db: Db,
    shared: Arc<Shared>,
    backup: Arc<BackupKind>,
    mode: Mode,
}

impl UpgradeKind {
    pub fn new(db: Db, shared: Arc<Shared>, backup: Arc<BackupKind>, mode: Mode) -> UpgradeKind {
        UpgradeKind {
            db,
            shared,
            backup,
            mode,
        }
    }
}

fn fatal(e: impl std::fmt::Display) -> Failure {
    Failure::fatal(e.to_string())
}

fn retry(e: impl std::fmt::Display) -> Failure {
    Failure::retry(e.to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.map_err(retry)
}

/// A free port on 127.0.0.1 (bound and released; the instance binds it
/// moments later).
fn free_port() -> Result<u16, Failure> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(retry)
}

/// Everything one attempt works with.
struct Run<'a> {
    t: &'a Claimed,
    c: Customer,
    root: PathBuf,
    progress: &'a Arc<Progress>,
    pm: pm::Manager,
    site: Option<Site>,
    started: Instant,
}

impl Run<'_> {
    fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    fn cancelled(&self) -> Result<(), Failure> {
        if self.progress.meter.cancelled.load(Ordering::Acquire) {
            return Err(Failure::cancelled("cancelled on request"));
        }
        Ok(())
    }

    fn instance_name(&self, v: &Version, service: &str) -> String {
        let v = v.to_string().replace(['.', '+'], "_");
        format!("shop-{}-{v}-t{}-{service}", self.c.id, self.t.id)
    }

    /// The environment of a service's commands and instance: its `.env`,
    /// the customer's database when the `.env` names none, and ours.
    fn env(&self, dir: &Path, v: &Version, port: Option<u16>) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(dir.join(".env")).unwrap_or_default();
        let mut env: BTreeMap<String, String> = layout::env_keys(&text)
            .into_iter()
            .map(|(k, v)| (k, v.trim_matches('"').trim_matches('\'').to_string()))
            .collect();
        if let Some(url) = &self.c.db_url {
            env.entry("DATABASE_URL".into()).or_insert_with(|| url.clone());
        }
        env.insert("PORTICO_RELEASE".into(), v.to_string());
        env.insert("HOST".into(), "127.0.0.1".into());
        if let Some(p) = port {
            env.insert("PORT".into(), p.to_string());
        }
        env
    }
}

#[async_trait::async_trait]
impl Kind for UpgradeKind {
    fn name(&self) -> &'static str {
        self.mode.kind()
    }

    async fn perform(&self, t: &Claimed, progress: &Arc<Progress>) -> Result<Value, Failure> {
        let c = crate::customers::of_task(&self.db, t).await?;
        let pm = pm::Manager::new(&c.process_manager, &self.shared.cfg.upgrade).map_err(fatal)?;
        let site = self.db.site(&c.id).await.map_err(retry)?;
        let mut run = Run {
            t,
            root: PathBuf::from(&c.root),
            c,
            progress,
            pm,
            site,
            started: Instant::now(),
        };
        let result = self.go(&mut run).await;
        let label = match &result {
            Ok(v) if v["rolled_back"] == json!(true) => "rolled_back",
            Ok(_) => "ok",
            Err(_) => "failed",
        };
        metrics::histogram!("portico_jobs_upgrade_seconds", "kind" => self.mode.kind(), "result" => label)
            .record(run.started.elapsed().as_secs_f64());
        result
    }
}

impl UpgradeKind {
    async fn go(&self, r: &mut Run<'_>) -> Result<Value, Failure> {
        let t = r.t;
        let installed = {
            let root = r.root.clone();
            blocking(move || layout::installed_version(&root)).await?
        };
        // Read once per attempt: the start commands and the checks of every
        // release this attempt touches come from the same catalog.
        let catalog = self.shared.catalog();
        // A retry after this task already switched: finish from there.
        if let Some(site) = r.site.clone().filter(|s| s.task == t.id) {
            let v = Version::parse(&site.version).map_err(fatal)?;
            r.progress.line(&format!("resuming after the switch to {v}"));
            let blue = site.previous_instances.clone();
            let prev = site.previous_version.clone();
            return self
                .after_switch(
                    r,
                    catalog.as_ref().ok(),
                    &v,
                    &site.instances,
                    prev.as_deref(),
                    blue,
                )
                .await;
        }
        let catalog = catalog.map_err(fatal)?;
        let (target, from) = match self.mode {
            Mode::Upgrade => {
                let to = t.params["to"].as_str().unwrap_or_default();
                let to = Version::parse(to).map_err(|e| fatal(format!("`{to}`: {e}")))?;
                let from = installed.clone().ok_or_else(|| {
                    fatal("the installed version is unknown (no current release, no backend/package.json)")
                })?;
                (to, Some(from))
            }
            Mode::Rollback => {
                let site = r
                    .site
                    .clone()
                    .ok_or_else(|| fatal("the shop is not served: nothing to roll back"))?;
                let prev = site
                    .previous_version
                    .as_deref()
                    .ok_or_else(|| fatal("no previous release to roll back to"))?;
                let prev = Version::parse(prev).map_err(fatal)?;
                let (root, p) = (r.root.clone(), prev.clone());
                if !blocking(move || layout::is_complete(&root, &p)).await? {
                    return Err(fatal(format!("release {prev} is no longer on disk")));
                }
                (prev, Version::parse(&site.version).ok())
            }
            Mode::Serve => {
                let v = installed
                    .clone()
                    .ok_or_else(|| fatal("no installed release found"))?;
                (v, r.site.as_ref().and_then(|s| Version::parse(&s.version).ok()))
            }
        };
        // Every mode starts the target from its catalog entry: a release no
        // longer in the catalog cannot be started again.
        let release = catalog.get(&target).cloned().ok_or_else(|| match self.mode {
            Mode::Upgrade => fatal(format!("release {target} is not in the catalog")),
            _ => fatal(format!(
                "release {target} is not in the catalog: its start command is unknown"
            )),
        })?;
        if self.mode == Mode::Upgrade
            && let Some(from) = &from
            && !release.accepts(from)
        {
            return Err(fatal(format!("release {target} does not upgrade from {from}")));
        }
        let mut report = json!({ "from": from.as_ref().map(|v| v.to_string()), "to": target.to_string() });

        if self.mode == Mode::Upgrade {
            self.prepare(r, &release, installed.as_ref(), &mut report).await?;
        }

        // Green: the target started beside whatever serves now.
        r.progress.step("green");
        r.cancelled()?;
        let mut green = Instances::new();
        for s in SERVICES {
            let name = r.instance_name(&target, s);
            let port = free_port()?;
            let dir = {
                let (root, v) = (r.root.clone(), target.clone());
                blocking(move || layout::service_dir(&root, &v, s)).await?
            };
            let spec = pm::Spec {
                env: r.env(&dir, &target, Some(port)),
                dir,
                command: release.service(s).start.clone(),
            };
            let _ = r.pm.stop(&r.run_dir(), &name).await;
            green.insert(
                s.to_string(),
                Instance {
                    name: name.clone(),
                    port,
                },
            );
            if let Err(e) = r.pm.start(&r.run_dir(), &name, &spec).await {
                self.stop_all(r, &green).await;
                return Err(fatal(format!("starting {name}: {e}")));
            }
            r.progress.line(&format!("{s}: {name} on 127.0.0.1:{port}"));
        }

        r.progress.step("health");
        if let Err(e) = self.check_direct(&target, Some(&release), &green).await {
            self.stop_all(r, &green).await;
            return Err(fatal(format!(
                "health check of {target} failed before the switch: {e}"
            )));
        }
        if let Err(cancelled) = r.cancelled() {
            self.stop_all(r, &green).await;
            return Err(cancelled);
        }

        r.progress.step("switch");
        let blue = r.site.as_ref().map(|s| s.instances.clone());
        let blue_version = r.site.as_ref().map(|s| s.version.clone());
        match self
            .db
            .switch_site(t, &r.c.id, &target.to_string(), &green, false)
            .await
        {
            Ok(Some(())) => {}
            Ok(None) => {
                self.stop_all(r, &green).await;
                return Err(fatal("the task was taken over by another attempt"));
            }
            Err(e) => {
                self.stop_all(r, &green).await;
                return Err(retry(e));
            }
        }
        let after = self
            .after_switch(r, Some(&catalog), &target, &green, blue_version.as_deref(), blue)
            .await?;
        let mut out = report;
        if let (Some(o), Some(a)) = (out.as_object_mut(), after.as_object()) {
            o.extend(a.clone());
        }
        Ok(out)
    }

    /// Backup, layout, unpack, `.env`, install/migrate/build.
    async fn prepare(
        &self,
        r: &mut Run<'_>,
        release: &Release,
        installed: Option<&Version>,
        report: &mut Value,
    ) -> Result<(), Failure> {
        let t = r.t;
        r.progress.step("backup");
        let made = self
            .backup
            .make(t, "pre-upgrade", Include::FAST, r.progress)
            .await?;
        r.progress.line(&format!("pre-upgrade backup {}", made.id));
        report["backup"] = json!(made.id);
        r.cancelled()?;

        if let Some(from) = installed {
            r.progress.step("layout");
            let (root, v) = (r.root.clone(), from.clone());
            let moved = blocking(move || layout::migrate(&root, &v, None))
                .await?
                .map_err(fatal)?;
            if moved.linked_current {
                r.progress
                    .line("moved to the release layout (uploads in shared/uploads)");
            }
            report["layout"] = serde_json::to_value(&moved).unwrap_or_default();
        }

        r.progress.step("unpack");
        r.cancelled()?;
        let (root, rel, id) = (r.root.clone(), release.clone(), t.id);
        blocking(move || layout::unpack(&root, &rel, id))
            .await?
            .map_err(fatal)?;

        r.progress.step("env");
        let target = release.version.clone();
        let mut diffs = serde_json::Map::new();
        for s in SERVICES {
            let current = installed.map(|v| layout::service_dir(&r.root, v, s));
            let new = layout::release_dir(&r.root, &target).join(s);
            let diff = blocking(move || layout::merge_env(current.as_deref(), &new))
                .await?
                .map_err(fatal)?;
            diffs.insert(s.to_string(), serde_json::to_value(&diff).unwrap_or_default());
        }
        let changed = diffs
            .values()
            .any(|d| d["added"].as_array().is_some_and(|a| !a.is_empty()));
        report["env"] = Value::Object(diffs);
        if changed && self.shared.cfg.upgrade.require_env_approval {
            r.progress.step("waiting for .env approval");
            r.progress
                .line("new .env keys: waiting for a super_admin or ops_lead to approve");
            while !self.db.approved(t.id).await.map_err(retry)? {
                r.cancelled()?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }

        for step in ["install", "migrate", "build"] {
            r.progress.step(step);
            for s in SERVICES {
                r.cancelled()?;
                let svc = release.service(s);
                let cmd = match step {
                    "install" => &svc.install,
                    "migrate" => &svc.migrate,
                    _ => &svc.build,
                };
                let Some(cmd) = cmd else { continue };
                let dir = layout::release_dir(&r.root, &target).join(s);
                let mut env = r.env(&dir, &target, None);
                if let Some(mb) = t.params["heap_mb"].as_u64() {
                    env.insert("NODE_OPTIONS".into(), format!("--max-old-space-size={mb}"));
                }
                if t.params["skip_type_check"].as_bool() == Some(true) {
                    env.insert("SKIP_TYPECHECK".into(), "1".into());
                }
                env.insert("CI".into(), "1".into());
                let timeout = Duration::from_secs(self.shared.cfg.upgrade.step_timeout_secs);
                if let Err(last) = run_command(cmd, &dir, &env, timeout, r.progress).await {
                    return Err(fatal(format!(
                        "{step} of {s} failed; release {target} left in {} for inspection; last lines:\n{last}",
                        layout::release_dir(&r.root, &target).display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// After the route points at `green`: `current` flipped, the gateways
    /// and blue's open requests given time, the checks through the edge,
    /// then blue stopped — or, if the checks fail, everything back to blue.
    async fn after_switch(
        &self,
        r: &mut Run<'_>,
        catalog: Option<&Catalog>,
        target: &Version,
        green: &Instances,
        blue_version: Option<&str>,
        blue: Option<Instances>,
    ) -> Result<Value, Failure> {
        let up = &self.shared.cfg.upgrade;
        if layout::is_complete(&r.root, target) {
            let (root, v) = (r.root.clone(), target.clone());
            blocking(move || layout::switch_current(&root, &v))
                .await?
                .map_err(fatal)?;
        }
        r.progress.line(&format!("switched to {target}"));
        r.progress.step("drain");
        if !self
            .shared
            .two_polls(Duration::from_secs(up.switch_wait_secs))
            .await
        {
            r.progress
                .line("no gateway fetched the routes in time; going on after switch_wait_secs");
        }
        tokio::time::sleep(Duration::from_secs(up.drain_secs)).await;

        r.progress.step("verify");
        let release = catalog.and_then(|c| c.get(target));
        let check = match &up.gateway_url {
            Some(url) => self.check_gateway(url, &r.c.domain, target, release).await,
            None => self.check_direct(target, release, green).await,
        };
        if let Err(e) = check {
            let (Some(bv), Some(blue)) = (blue_version, blue.clone()) else {
                return Err(fatal(format!(
                    "checks after the switch failed and nothing served before: {e}"
                )));
            };
            r.progress.step("switch back");
            r.progress
                .line(&format!("checks failed after the switch ({e}); back to {bv}"));
            match self.db.switch_site(r.t, &r.c.id, bv, &blue, true).await {
                Ok(Some(())) => {}
                Ok(None) => return Err(fatal("the task was taken over by another attempt")),
                Err(e) => return Err(retry(e)),
            }
            if let Ok(v) = Version::parse(bv) {
                let root = r.root.clone();
                let _ = blocking(move || layout::switch_current(&root, &v)).await;
            }
            self.shared
                .two_polls(Duration::from_secs(up.switch_wait_secs))
                .await;
            self.stop_all(r, green).await;
            let blue_ok = match Version::parse(bv) {
                Ok(v) => {
                    self.check_direct(&v, catalog.and_then(|c| c.get(&v)), &blue)
                        .await
                }
                Err(e) => Err(e.to_string()),
            };
            return Err(fatal(format!(
                "checks of {target} failed after the switch: {e}; switched back to {bv} ({})",
                match blue_ok {
                    Ok(()) => "healthy".to_string(),
                    Err(b) => format!("which is NOT healthy either: {b}"),
                }
            )));
        }

        if let Some(blue) = &blue {
            r.progress.step("stop old");
            for i in blue
                .values()
                .filter(|i| !green.values().any(|g| g.name == i.name))
            {
                if let Err(e) = r.pm.stop(&r.run_dir(), &i.name).await {
                    r.progress.line(&format!("stopping {}: {e}", i.name));
                }
            }
        }
        let (root, keep) = (r.root.clone(), up.keep_releases);
        let prev = blue_version.and_then(|v| Version::parse(v).ok());
        let deleted = blocking(move || layout::retain(&root, keep, prev.as_ref())).await?;
        Ok(json!({
            "serving": target.to_string(),
            "previous": blue_version,
            "ports": green.iter().map(|(s, i)| (s.clone(), json!(i.port))).collect::<serde_json::Map<_, _>>(),
            "releases_deleted": deleted,
        }))
    }

    async fn stop_all(&self, r: &Run<'_>, instances: &Instances) {
        for i in instances.values() {
            if let Err(e) = r.pm.stop(&r.run_dir(), &i.name).await {
                tracing::warn!(instance = i.name, error = %e, "cannot stop an instance");
            }
        }
    }

    /// Every check path of every service, straight to the instances.
    async fn check_direct(
        &self,
        v: &Version,
        release: Option<&Release>,
        at: &Instances,
    ) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(self.shared.cfg.upgrade.health_deadline_secs);
        for s in SERVICES {
            let Some(i) = at.get(s) else { continue };
            for path in health_paths(release, s) {
                let url = format!("http://127.0.0.1:{}{path}", i.port);
                wait_200(&client, &url, deadline)
                    .await
                    .map_err(|e| format!("{s} of {v}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The checks through the gateway, by the shop's hostnames.
    async fn check_gateway(
        &self,
        gateway: &str,
        domain: &str,
        v: &Version,
        release: Option<&Release>,
    ) -> Result<(), String> {
        let up = &self.shared.cfg.upgrade;
        let url: reqwest::Url = gateway
            .parse()
            .map_err(|e| format!("jobs.upgrade.gateway_url: {e}"))?;
        let addr = url
            .socket_addrs(|| Some(443))
            .ok()
            .and_then(|a| a.into_iter().next())
            .ok_or("jobs.upgrade.gateway_url has no address")?;
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &up.gateway_ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        for (_, host) in hosts(domain) {
            b = b.resolve(&host, addr);
        }
        let client = b.build().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(up.health_deadline_secs.min(15));
        for (s, host) in hosts(domain) {
            for path in health_paths(release, s) {
                let url = format!("https://{host}:{}{path}", addr.port());
                wait_200(&client, &url, deadline)
                    .await
                    .map_err(|e| format!("{s} of {v} through the gateway: {e}"))?;
            }
        }
        Ok(())
    }
}

fn health_paths(release: Option<&Release>, service: &str) -> Vec<String> {
    release.map_or_else(|| vec!["/".to_string()], |r| r.service(service).health.clone())
}

/// Polls `url` until it answers 200 or `deadline`.
async fn wait_200(client: &reqwest::Client, url: &str, deadline: Instant) -> Result<(), String> {
    loop {
        let last = match client.get(url).send().await {
            Ok(resp) if resp.status() == reqwest::StatusCode::OK => return Ok(()),
            Ok(resp) => format!("{url} answered {}", resp.status()),
            Err(e) => format!("{url}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Kills a process group when dropped.
struct KillGroup(rustix::process::Pid);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process_group(self.0, rustix::process::Signal::KILL);
    }
}

/// Runs a release command with `sh -c` in `dir`, its output lines into
/// progress; on failure, its last lines.
async fn run_command(
    cmd: &str,
    dir: &Path,
    env: &BTreeMap<String, String>,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
    // Whatever the command started (a build's workers, a stray daemon)
    // ends with it: the whole process group, on success, failure, timeout
    // or when this task is dropped.
    let _group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        .map(KillGroup);
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let last = std::sync::Mutex::new(VecDeque::with_capacity(20));
    let note = |line: String| {
        progress.line(&line);
        let mut l = last.lock().expect("lines lock");
        if l.len() == 20 {
            l.pop_front();
        }
        l.push_back(line);
    };
    let read = async {
        let mut a = out.map(|o| BufReader::new(o).lines());
        let mut b = err.map(|e| BufReader::new(e).lines());
        loop {
            tokio::select! {
                Some(Ok(Some(l))) = async { match a.as_mut() { Some(x) => Some(x.next_line().await), None => None } } => note(l),
                Some(Ok(Some(l))) = async { match b.as_mut() { Some(x) => Some(x.next_line().await), None => None } } => note(l),
                else => break,
            }
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("`{cmd}`: {e}")),
        Err(_) => {
            let lines: Vec<String> = last.lock().expect("lines lock").iter().cloned().collect();
            return Err(format!(
                "timed out after {} s\n{}",
                timeout.as_secs(),
                lines.join("\n")
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    let lines: Vec<String> = last.lock().expect("lines lock").iter().cloned().collect();
    Err(format!("exit {status}\n{}", lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    /// A command that outlives its timeout takes its children with it.
    #[tokio::test]
    async fn a_timed_out_command_leaves_no_process_behind() {
        let d = tempfile::tempdir().unwrap();
        let progress = crate::queue::progress::Progress::new(Arc::new(crate::archive::Meter::default()));
        let cmd = "sleep 30 & echo $! > child.pid; echo started; wait";
        let r = super::run_command(cmd, d.path(), &BTreeMap::new(), Duration::from_secs(1), &progress).await;
        assert!(r.unwrap_err().contains("timed out after 1 s"));
        let pid: i32 = std::fs::read_to_string(d.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Gone (or a zombie of init's, which /proc shows as Z).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "the background child survived: {stat}"
        );
    }
}
