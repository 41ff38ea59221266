//! Mail migrations (seed 004): a customer's mailboxes copied from their old
//! provider's IMAP server into the customer's mail server, verified per
//! folder, behind a DNS gate that keeps the domain's MX from moving before
//! the mail is there.
//!
//! A job (one per domain) has mailboxes; each `sync` task (kind `mail`,
//! one active task per customer) is a run: `initial`, `delta`, `final` or
//! `verify` ([`sync`]). Credentials are sealed at rest ([`vault`]); folders
//! are automapped ([`folders`]); the IMAP side is [`imap`]. Every run ends
//! with a verification that moves the gate: `blocked` → `warning` (some
//! verified) → `ready_for_dns` (an approver, at `jobs.mail.gate_min_ratio`)
//! → `dns_applied` (the webhook); a super_admin may override with a reason.
//!
//! Sources: IMAP servers, and files uploaded per mailbox: Outlook PSTs
//! ([`pst`], through readpst) and Zimbra/Carbonio TGZ exports ([`tgz`]).

pub mod api;
pub mod db;
pub mod folders;
pub mod imap;
pub mod pst;
pub mod sync;
pub mod tgz;
pub mod vault;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use portico_config::MailConfig;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::queue::progress::Progress;
use crate::queue::{Claimed, Db, Failure, Kind};
use db::Mailbox;
use imap::Session;
use sync::{Limits, MailboxReport, RunKind, SyncError};
use vault::Vault;

/// Associated data of a mailbox's sealed secret.
pub fn aad(mailbox: i64, side: &str) -> String {
    format!("portico-mail:{mailbox}:{side}")
}

/// What the mail routes and the task share.
pub struct Shared {
    pub cfg: MailConfig,
    pub vault: Vault,
    /// Uploaded PSTs, their extracted messages, quarantine mboxes (700).
    pub dir: std::path::PathBuf,
}

impl Shared {
    pub fn new(cfg: &MailConfig, data_dir: &std::path::Path) -> Shared {
        Shared {
            cfg: cfg.clone(),
            vault: Vault::new(cfg),
            dir: data_dir.join("mail"),
        }
    }

    /// Where a mailbox's uploaded PST or TGZ export is kept.
    pub fn upload_path(&self, job: &db::MailJob, mailbox: i64) -> std::path::PathBuf {
        self.dir
            .join(format!("job-{}", job.id))
            .join(format!("mailbox-{mailbox}.{}", job.source_type))
    }

    /// A session on the destination of a mailbox.
    pub async fn dest_session(&self, job: &db::MailJob, mb: &Mailbox) -> Result<Session, Failure> {
        let pw = self
            .vault
            .open(&mb.dest_secret, &aad(mb.id, "destination"))
            .map_err(|e| Failure::fatal(e.to_string()))?;
        let dst = job
            .dest_server()
            .ok_or_else(|| Failure::fatal("the job has no destination"))?;
        Session::open(&dst, &mb.dest_login, &pw, self.cfg.allow_plain_imap)
            .await
            .map_err(|e| {
                if e.retryable() {
                    Failure::retry(e.to_string())
                } else {
                    Failure::fatal(e.to_string())
                }
            })
    }

    /// Opens both sessions of a mailbox.
    pub async fn sessions(&self, job: &db::MailJob, mb: &Mailbox) -> Result<(Session, Session), Failure> {
        let fatal = |e: vault::VaultError| Failure::fatal(e.to_string());
        let src_pw = self
            .vault
            .open(
                mb.source_secret.as_deref().unwrap_or_default(),
                &aad(mb.id, "source"),
            )
            .map_err(fatal)?;
        let dst_pw = self
            .vault
            .open(&mb.dest_secret, &aad(mb.id, "destination"))
            .map_err(fatal)?;
        let (src, dst) = match (job.source_server(), job.dest_server()) {
            (Some(s), Some(d)) => (s, d),
            _ => return Err(Failure::fatal("the job has no IMAP source or destination")),
        };
        let plain = self.cfg.allow_plain_imap;
        let open_err = |e: imap::ImapError| {
            if e.retryable() {
                Failure::retry(e.to_string())
            } else {
                Failure::fatal(e.to_string())
            }
        };
        let s = Session::open(&src, &mb.source_login, &src_pw, plain)
            .await
            .map_err(open_err)?;
        let d = Session::open(&dst, &mb.dest_login, &dst_pw, plain)
            .await
            .map_err(open_err)?;
        Ok((s, d))
    }
}

pub struct MailKind {
    pub db: Db,
    pub shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl Kind for MailKind {
    fn name(&self) -> &'static str {
        "mail"
    }

    /// Publishes every job's gate and ratio every 30 s.
    async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        crate::queue::every(std::time::Duration::from_secs(30), stop, || async {
            for j in self.db.mail_jobs().await.unwrap_or_default() {
                for state in ["blocked", "warning", "ready_for_dns", "dns_applied"] {
                    metrics::gauge!("portico_jobs_mail_gate", "domain" => j.domain.clone(), "state" => state)
                        .set(if j.gate == state { 1.0 } else { 0.0 });
                }
                metrics::gauge!("portico_jobs_mail_gate_ratio", "domain" => j.domain.clone()).set(j.ratio());
            }
        })
        .await
    }

    async fn perform(&self, t: &Claimed, progress: &Arc<Progress>) -> Result<Value, Failure> {
        let retry = |e: crate::queue::DbError| Failure::retry(e.to_string());
        let job_id = t.params["job"].as_i64().unwrap_or_default();
        let run_kind = t.params["run"].as_str().unwrap_or("delta").to_string();
        let kind = match run_kind.as_str() {
            "initial" | "final" => RunKind::Full,
            "verify" => RunKind::Verify,
            _ => RunKind::Delta,
        };
        let job = self
            .db
            .mail_job(job_id)
            .await
            .map_err(retry)?
            .ok_or_else(|| Failure::fatal(format!("migration job {job_id} is gone")))?;
        self.shared
            .vault
            .ready()
            .map_err(|e| Failure::fatal(e.to_string()))?;
        let run = self.db.start_run(job.id, t.id, &run_kind).await.map_err(retry)?;
        let mailboxes = self.db.mailboxes(job.id).await.map_err(retry)?;
        progress.step(&format!("{run_kind} sync of {} mailboxes", mailboxes.len()));
        let started = Instant::now();
        let limits = Arc::new(Limits {
            max_message_bytes: self.shared.cfg.max_message_bytes,
            errors_max: self.shared.cfg.errors_max,
            bytes_per_sec: self.shared.cfg.max_bytes_per_sec,
            errors: AtomicU32::new(0),
            bytes: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            started,
        });
        let permits = Arc::new(tokio::sync::Semaphore::new(
            self.shared.cfg.max_concurrent_mailboxes,
        ));
        let job = Arc::new(job);
        let mut set = JoinSet::new();
        for mb in mailboxes {
            let (db, shared, limits, progress, job, permits) = (
                self.db.clone(),
                self.shared.clone(),
                limits.clone(),
                progress.clone(),
                job.clone(),
                permits.clone(),
            );
            set.spawn(async move {
                let _permit = permits
                    .acquire_owned()
                    .await
                    .map_err(|e| Failure::retry(e.to_string()))?;
                let local = if job.source_type == "imap" {
                    None
                } else {
                    let file = shared.upload_path(&job, mb.id);
                    if !file.is_file() {
                        return Err(Failure::fatal(format!(
                            "no {} uploaded for mailbox {}",
                            job.source_type, mb.source_login
                        )));
                    }
                    progress.line(&format!("{}: reading the {}", mb.source_login, job.source_type));
                    let out = shared
                        .dir
                        .join(format!("job-{}", job.id))
                        .join(format!("mailbox-{}.extract", mb.id));
                    let folders = if job.source_type == "pst" {
                        pst::extract(&file, &out).await
                    } else {
                        tokio::task::spawn_blocking(move || tgz::extract(&file, &out))
                            .await
                            .map_err(|e| Failure::retry(e.to_string()))?
                    };
                    Some(folders.map_err(Failure::fatal)?)
                };
                let quarantine = shared
                    .dir
                    .join(format!("job-{}", job.id))
                    .join(format!("quarantine-run-{run}.mbox"));
                // A dropped connection costs a reconnect, not the run: the
                // saved state and the key counts make the next pass carry on
                // without copying anything twice.
                let mut reconnects = 0;
                let r = loop {
                    let r = match &local {
                        Some(folders) => {
                            let mut dst = shared.dest_session(&job, &mb).await?;
                            let r = sync::import_local(
                                &db,
                                &mb,
                                folders,
                                &mut dst,
                                &limits,
                                &progress,
                                &quarantine,
                            )
                            .await;
                            dst.logout().await;
                            r
                        }
                        None => {
                            let (mut src, mut dst) = shared.sessions(&job, &mb).await?;
                            let r =
                                sync::mailbox(&db, &mb, &mut src, &mut dst, kind, &limits, &progress).await;
                            src.logout().await;
                            dst.logout().await;
                            r
                        }
                    };
                    match r {
                        Err(SyncError::Imap(ref e)) if e.retryable() && reconnects < 3 => {
                            reconnects += 1;
                            progress.line(&format!("{}: {e}; reconnecting", mb.source_login));
                            tokio::time::sleep(std::time::Duration::from_millis(500 * reconnects)).await;
                        }
                        r => break r,
                    }
                };
                r.map_err(|e| match e {
                    SyncError::Cancelled => Failure::cancelled("cancelled on request"),
                    SyncError::TooManyErrors(..) => Failure::fatal(e.to_string()),
                    SyncError::Imap(ref i) if !i.retryable() => Failure::fatal(e.to_string()),
                    e => Failure::retry(e.to_string()),
                })
            });
        }
        let mut reports: Vec<MailboxReport> = Vec::new();
        let mut failure: Option<Failure> = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(rep)) => reports.push(rep),
                Ok(Err(f)) => {
                    failure.get_or_insert(f);
                }
                Err(e) => {
                    failure.get_or_insert(Failure::retry(e.to_string()));
                }
            }
        }
        // Counted as they happen: a reconnected pass reports only its own.
        let (copied, bytes) = (
            limits.copied.load(Ordering::Acquire),
            limits.bytes.load(Ordering::Acquire),
        );
        let errors = limits.errors.load(Ordering::Acquire);
        let counts = json!(reports);
        if let Some(f) = failure {
            let _ = self
                .db
                .end_run(
                    run,
                    "failed",
                    copied as i64,
                    bytes as i64,
                    errors as i32,
                    &counts,
                    &f.message,
                )
                .await;
            return Err(f);
        }
        let (verified, expected) = reports
            .iter()
            .fold((0, 0), |(v, e), r| (v + r.verified(), e + r.expected()));
        self.db
            .set_verified(job.id, verified as i64, expected as i64)
            .await
            .map_err(retry)?;
        self.db
            .end_run(
                run,
                "succeeded",
                copied as i64,
                bytes as i64,
                errors as i32,
                &counts,
                "",
            )
            .await
            .map_err(retry)?;
        let ratio = if expected == 0 {
            0.0
        } else {
            verified as f64 / expected as f64
        };
        Ok(json!({
            "job": job.id,
            "run": run,
            "kind": run_kind,
            "copied": copied,
            "bytes": bytes,
            "errors": errors,
            "verified": verified,
            "expected": expected,
            "ratio": ratio,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }
}
