//! The mail migration tables: jobs (a customer's domain moving from a
//! source to its destination IMAP server, and the DNS gate), mailboxes
//! (logins; passwords only sealed, see [`super::vault`]), runs (each sync
//! or verification, with counts), per-folder state (UIDVALIDITY and the
//! last UID copied: what a delta starts from) and webhook deliveries seen.

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::error::SqlState;

use super::imap::Server;
use crate::queue::db::{Db, DbError, Schema, unavailable};

pub static SCHEMA: Schema = Schema {
    version_table: "jobs_mail_schema",
    migrations: &[r#"
CREATE TABLE mail_jobs (
    id           bigserial PRIMARY KEY,
    customer_id  text NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    domain       text NOT NULL UNIQUE,
    source_type  text NOT NULL CHECK (source_type IN ('imap', 'pst', 'tgz')),
    source       jsonb,
    destination  jsonb NOT NULL,
    options      jsonb NOT NULL DEFAULT '{}',
    gate         text NOT NULL DEFAULT 'blocked'
                 CHECK (gate IN ('blocked', 'warning', 'ready_for_dns', 'dns_applied')),
    gate_by      text,
    gate_reason  text,
    gate_at      timestamptz,
    verified     bigint NOT NULL DEFAULT 0,
    expected     bigint NOT NULL DEFAULT 0,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE mail_mailboxes (
    id            bigserial PRIMARY KEY,
    job_id        bigint NOT NULL REFERENCES mail_jobs(id) ON DELETE CASCADE,
    source_login  text NOT NULL,
    source_secret text,
    dest_login    text NOT NULL,
    dest_secret   text NOT NULL,
    folder_map    jsonb NOT NULL DEFAULT '{}',
    UNIQUE (job_id, source_login)
);
CREATE TABLE mail_runs (
    id          bigserial PRIMARY KEY,
    job_id      bigint NOT NULL REFERENCES mail_jobs(id) ON DELETE CASCADE,
    task_id     bigint NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('initial', 'delta', 'final', 'verify')),
    state       text NOT NULL,
    copied      bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    errors      int NOT NULL DEFAULT 0,
    counts      jsonb NOT NULL DEFAULT '{}',
    log         text NOT NULL DEFAULT '',
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE TABLE mail_folders (
    mailbox_id    bigint NOT NULL REFERENCES mail_mailboxes(id) ON DELETE CASCADE,
    source_folder text NOT NULL,
    dest_folder   text NOT NULL,
    uidvalidity   bigint NOT NULL DEFAULT 0,
    last_uid      bigint NOT NULL DEFAULT 0,
    source_count  bigint NOT NULL DEFAULT 0,
    dest_count    bigint NOT NULL DEFAULT 0,
    verified      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox_id, source_folder)
);
CREATE TABLE mail_webhooks (
    delivery_id text PRIMARY KEY,
    domain      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
"#],
};

#[derive(Debug, Clone, Serialize)]
pub struct MailJob {
    pub id: i64,
    pub customer: String,
    pub domain: String,
    pub source_type: String,
    pub source: Option<Value>,
    pub destination: Value,
    pub options: Value,
    pub gate: String,
    pub gate_by: Option<String>,
    pub gate_reason: Option<String>,
    pub verified: i64,
    pub expected: i64,
    pub created_by: String,
}

impl MailJob {
    pub fn ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.verified as f64 / self.expected as f64
        }
    }

    pub fn source_server(&self) -> Option<Server> {
        self.source.clone().and_then(|v| serde_json::from_value(v).ok())
    }

    pub fn dest_server(&self) -> Option<Server> {
        serde_json::from_value(self.destination.clone()).ok()
    }
}

/// A mailbox with its sealed secrets (never serialized).
#[derive(Debug, Clone, Serialize)]
pub struct Mailbox {
    pub id: i64,
    pub job: i64,
    pub source_login: String,
    pub dest_login: String,
    pub folder_map: Value,
    #[serde(skip)]
    pub source_secret: Option<String>,
    #[serde(skip)]
    pub dest_secret: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FolderState {
    pub source_folder: String,
    pub dest_folder: String,
    pub uidvalidity: i64,
    pub last_uid: i64,
    pub source_count: i64,
    pub dest_count: i64,
    pub verified: i64,
}

const JOB_COLUMNS: &str = "id, customer_id, domain, source_type, source, destination, options, gate, gate_by, gate_reason, verified, expected, created_by";

fn job_from(r: &tokio_postgres::Row) -> MailJob {
    MailJob {
        id: r.get(0),
        customer: r.get(1),
        domain: r.get(2),
        source_type: r.get(3),
        source: r.get(4),
        destination: r.get(5),
        options: r.get(6),
        gate: r.get(7),
        gate_by: r.get(8),
        gate_reason: r.get(9),
        verified: r.get(10),
        expected: r.get(11),
        created_by: r.get(12),
    }
}

fn mailbox_from(r: &tokio_postgres::Row) -> Mailbox {
    Mailbox {
        id: r.get(0),
        job: r.get(1),
        source_login: r.get(2),
        dest_login: r.get(3),
        folder_map: r.get(4),
        source_secret: r.get(5),
        dest_secret: r.get(6),
    }
}

impl Db {
    #[allow(clippy::too_many_arguments)]
    pub async fn add_mail_job(
        &self,
        customer: &str,
        domain: &str,
        source_type: &str,
        source: Option<&Value>,
        destination: &Value,
        options: &Value,
        by: &str,
    ) -> Result<i64, DbError> {
        let r = self
            .client()
            .await?
            .query_one(
                "INSERT INTO mail_jobs (customer_id, domain, source_type, source, destination, options, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[&customer, &domain, &source_type, &source, destination, options, &by],
            )
            .await;
        match r {
            Ok(row) => Ok(row.get(0)),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(DbError::Exists(format!("a migration job for {domain}")))
            }
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                Err(DbError::Missing(format!("customer {customer}")))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    pub async fn mail_job(&self, id: i64) -> Result<Option<MailJob>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM mail_jobs WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(job_from))
    }

    pub async fn mail_job_by_domain(&self, domain: &str) -> Result<Option<MailJob>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM mail_jobs WHERE domain = $1"),
                &[&domain],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(job_from))
    }

    pub async fn mail_jobs(&self) -> Result<Vec<MailJob>, DbError> {
        let rows = self
            .client()
            .await?
            .query(&format!("SELECT {JOB_COLUMNS} FROM mail_jobs ORDER BY id"), &[])
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(job_from).collect())
    }

    pub async fn add_mailbox(
        &self,
        job: i64,
        source_login: &str,
        dest_login: &str,
        folder_map: &Value,
    ) -> Result<i64, DbError> {
        let r = self
            .client()
            .await?
            .query_one(
                "INSERT INTO mail_mailboxes (job_id, source_login, dest_login, dest_secret, folder_map)
                 VALUES ($1, $2, $3, '', $4) RETURNING id",
                &[&job, &source_login, &dest_login, folder_map],
            )
            .await;
        match r {
            Ok(row) => Ok(row.get(0)),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(DbError::Exists(format!("mailbox {source_login}")))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Stores the sealed secrets of a mailbox (sealed with its id in the
    /// associated data, so they are written after the row exists).
    pub async fn set_mailbox_secrets(
        &self,
        id: i64,
        source: Option<&str>,
        dest: &str,
    ) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "UPDATE mail_mailboxes SET source_secret = $2, dest_secret = $3 WHERE id = $1",
                &[&id, &source, &dest],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn delete_mailbox(&self, id: i64) -> Result<(), DbError> {
        self.client()
            .await?
            .execute("DELETE FROM mail_mailboxes WHERE id = $1", &[&id])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn mailboxes(&self, job: i64) -> Result<Vec<Mailbox>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, job_id, source_login, dest_login, folder_map, source_secret, dest_secret
                 FROM mail_mailboxes WHERE job_id = $1 ORDER BY id",
                &[&job],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(mailbox_from).collect())
    }

    pub async fn folder_states(&self, mailbox: i64) -> Result<Vec<FolderState>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT source_folder, dest_folder, uidvalidity, last_uid, source_count, dest_count, verified
                 FROM mail_folders WHERE mailbox_id = $1 ORDER BY source_folder",
                &[&mailbox],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| FolderState {
                source_folder: r.get(0),
                dest_folder: r.get(1),
                uidvalidity: r.get(2),
                last_uid: r.get(3),
                source_count: r.get(4),
                dest_count: r.get(5),
                verified: r.get(6),
            })
            .collect())
    }

    /// Records where a folder's copy stands (after each batch).
    pub async fn save_folder(&self, mailbox: i64, f: &FolderState) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO mail_folders (mailbox_id, source_folder, dest_folder, uidvalidity, last_uid, source_count, dest_count, verified)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (mailbox_id, source_folder) DO UPDATE SET dest_folder = $3, uidvalidity = $4,
                    last_uid = $5, source_count = $6, dest_count = $7, verified = $8",
                &[
                    &mailbox,
                    &f.source_folder,
                    &f.dest_folder,
                    &f.uidvalidity,
                    &f.last_uid,
                    &f.source_count,
                    &f.dest_count,
                    &f.verified,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The run of task `task` (one per task: an attempt after a crash
    /// carries on with it).
    pub async fn start_run(&self, job: i64, task: i64, kind: &str) -> Result<i64, DbError> {
        let c = self.client().await?;
        if let Some(r) = c
            .query_opt(
                "UPDATE mail_runs SET state = 'running', finished_at = NULL WHERE task_id = $1 RETURNING id",
                &[&task],
            )
            .await
            .map_err(unavailable)?
        {
            return Ok(r.get(0));
        }
        Ok(c
            .query_one(
                "INSERT INTO mail_runs (job_id, task_id, kind, state) VALUES ($1, $2, $3, 'running') RETURNING id",
                &[&job, &task, &kind],
            )
            .await
            .map_err(unavailable)?
            .get(0))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn end_run(
        &self,
        run: i64,
        state: &str,
        copied: i64,
        bytes: i64,
        errors: i32,
        counts: &Value,
        log: &str,
    ) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "UPDATE mail_runs SET state = $2, copied = $3, bytes = $4, errors = $5, counts = $6, log = $7, finished_at = now()
                 WHERE id = $1",
                &[&run, &state, &copied, &bytes, &errors, counts, &log],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn mail_runs(&self, job: i64) -> Result<Vec<Value>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT json_build_object('id', id, 'task', task_id, 'kind', kind, 'state', state, 'copied', copied,
                        'bytes', bytes, 'errors', errors, 'counts', counts,
                        'duration_ms', (extract(epoch FROM (coalesce(finished_at, now()) - started_at)) * 1000)::bigint,
                        'started_at', to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))::jsonb
                 FROM mail_runs WHERE job_id = $1 ORDER BY id DESC LIMIT 50",
                &[&job],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records a verification; the gate follows: `blocked` while nothing
    /// is verified, `warning` after (until an approver opens it). A gate an
    /// approver already opened stays open.
    pub async fn set_verified(&self, job: i64, verified: i64, expected: i64) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "UPDATE mail_jobs SET verified = $2, expected = $3,
                    gate = CASE WHEN gate IN ('ready_for_dns', 'dns_applied') THEN gate
                                WHEN $2::bigint > 0 THEN 'warning' ELSE 'blocked' END
                 WHERE id = $1",
                &[&job, &verified, &expected],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn set_gate(
        &self,
        job: i64,
        gate: &str,
        by: &str,
        reason: Option<&str>,
    ) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "UPDATE mail_jobs SET gate = $2, gate_by = $3, gate_reason = $4, gate_at = now() WHERE id = $1",
                &[&job, &gate, &by, &reason],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Records a webhook delivery; false if it was seen before.
    pub async fn webhook_once(&self, delivery: &str, domain: &str) -> Result<bool, DbError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO mail_webhooks (delivery_id, domain) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&delivery, &domain],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }
}
