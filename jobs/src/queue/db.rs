//! The jobs database (PostgreSQL, deadpool-postgres): the pool, the core
//! schema, the task queue and the audit log. It knows no task kind: each
//! kind adds its own queries in an `impl Db` block of its folder and its
//! own tables as a [`Schema`] with a version table of its own.
//!
//! The queue is a table, not a crate (the queue crates bring a second
//! driver). A worker claims a task with `FOR UPDATE SKIP LOCKED` and holds
//! a lease (`lease_until`) it renews while the task runs. Every update a
//! worker makes names the attempt it claimed, so a worker whose lease was
//! taken away (it stalled, the reaper re-queued the task, another worker
//! claimed it) changes nothing: the attempt number is the fencing token.
//! One active task per customer is the partial unique index
//! `one_active_task_per_customer`, so two requests cannot both get in.

use std::time::Duration;

use deadpool_postgres::Pool;
use portico_common::pg;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::error::SqlState;

/// Longest any query may take, pool wait included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Serializes migrations between jobs processes.
const MIGRATION_LOCK: i64 = 0x706f_7274_6963_6f02;

/// A kind's tables: migrations applied in order, counted in `version_table`.
pub struct Schema {
    pub version_table: &'static str,
    pub migrations: &'static [&'static str],
}

/// The core schema. Its first migrations also created the tables of the
/// first kinds (backups, apps), from before kinds had schemas of their
/// own; they stay here so that existing databases keep their history.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE customers (
    id              text PRIMARY KEY,
    domain          text NOT NULL UNIQUE,
    root            text NOT NULL,
    db_url          text,
    process_manager text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE tasks (
    id               bigserial PRIMARY KEY,
    customer_id      text NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    kind             text NOT NULL,
    params           jsonb NOT NULL,
    state            text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt          int NOT NULL DEFAULT 0,
    max_attempts     int NOT NULL,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress         jsonb NOT NULL DEFAULT '{}',
    result           jsonb,
    error            text,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE UNIQUE INDEX one_active_task_per_customer ON tasks (customer_id)
    WHERE state IN ('queued', 'running');
CREATE INDEX tasks_ready ON tasks (run_after) WHERE state = 'queued';
CREATE INDEX tasks_leased ON tasks (lease_until) WHERE state = 'running';
CREATE TABLE backups (
    customer_id text NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    id          text NOT NULL,
    task_id     bigint NOT NULL,
    kind        text NOT NULL,
    size_bytes  bigint NOT NULL,
    duration_ms bigint NOT NULL,
    manifest    jsonb NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, id)
);
CREATE TABLE audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    customer_id text,
    target      text,
    result      text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_by_customer ON audit (customer_id, id);
"#,
    r#"
CREATE TABLE apps (
    name        text PRIMARY KEY,
    repo        text NOT NULL,
    git_ref     text,
    port        int CHECK (port BETWEEN 1 AND 65535),
    health_path text NOT NULL,
    desired     text NOT NULL DEFAULT 'running' CHECK (desired IN ('running', 'stopped')),
    kind        text,
    container   text,
    image       text,
    host_port   int,
    deployed_at timestamptz,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tasks ALTER COLUMN customer_id DROP NOT NULL;
ALTER TABLE tasks ADD COLUMN app text REFERENCES apps(name) ON DELETE CASCADE;
ALTER TABLE tasks ADD CONSTRAINT task_subject CHECK ((customer_id IS NULL) <> (app IS NULL));
CREATE UNIQUE INDEX one_active_task_per_app ON tasks (app) WHERE state IN ('queued', 'running');
"#,
    // A task records at most one backup: a re-run after a crash finds it.
    r#"
CREATE UNIQUE INDEX backups_one_per_task ON backups (task_id);
"#,
];

/// Why a database call failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The customer or app already has a queued or running task.
    #[error("{subject} already has an active task {task}")]
    Busy { subject: String, task: i64 },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} does not exist")]
    Missing(String),
    #[error("{0}")]
    Full(String),
    /// A value the database cannot hold as given (PostgreSQL's data
    /// exceptions, class 22: a NUL byte in text, a number out of range…).
    /// Values come from requests: this is the caller's error, not an outage.
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Whose task: the queue allows one active task per customer and per app.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Customer(&'a str),
    App(&'a str),
}

impl<'a> Subject<'a> {
    /// The (customer_id, app) column values.
    fn columns(self) -> (Option<&'a str>, Option<&'a str>) {
        match self {
            Subject::Customer(c) => (Some(c), None),
            Subject::App(a) => (None, Some(a)),
        }
    }
}

impl std::fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Customer(c) => write!(f, "customer {c}"),
            Subject::App(a) => write!(f, "app {a}"),
        }
    }
}

impl Claimed {
    pub fn subject(&self) -> Subject<'_> {
        match (&self.customer_id, &self.app) {
            (Some(c), _) => Subject::Customer(c),
            (None, Some(a)) => Subject::App(a),
            // The `task_subject` constraint makes this impossible.
            (None, None) => Subject::Customer(""),
        }
    }
}

/// A failed call, with the server's own words when it gave some
/// (tokio-postgres' `Display` says only "db error").
pub(crate) fn unavailable(e: impl std::fmt::Display + 'static) -> DbError {
    let any: &dyn std::any::Any = &e;
    if let Some(pg) = any.downcast_ref::<tokio_postgres::Error>()
        && let Some(db) = pg.as_db_error()
    {
        if db.code().code().starts_with("22") {
            return DbError::Invalid(db.message().to_string());
        }
        return DbError::Unavailable(format!("{}: {}", db.code().code(), db.message()));
    }
    DbError::Unavailable(e.to_string())
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskRecord {
    pub id: i64,
    pub customer: Option<String>,
    pub app: Option<String>,
    pub kind: String,
    pub params: Value,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[schema(example = "succeeded")]
    pub state: String,
    pub attempt: i32,
    pub progress: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// A task whose lease ran out, and what the reaper made of it.
#[derive(Debug, Clone)]
pub struct Reaped {
    pub id: i64,
    pub customer_id: Option<String>,
    pub app: Option<String>,
    pub kind: String,
    /// `queued` (another attempt follows) or `failed`.
    pub state: String,
}

impl Reaped {
    pub fn subject(&self) -> Subject<'_> {
        match (&self.customer_id, &self.app) {
            (Some(c), _) => Subject::Customer(c),
            (None, Some(a)) => Subject::App(a),
            (None, None) => Subject::Customer(""),
        }
    }
}

/// A claimed task: what a worker needs to run it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    /// Exactly one of `customer_id` and `app` is set: whose task it is.
    pub customer_id: Option<String>,
    pub app: Option<String>,
    pub kind: String,
    pub params: Value,
    pub attempt: i32,
    pub created_by: String,
}

#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

const TASK_COLUMNS: &str = "id, customer_id, app, kind, params, state, attempt, progress, result, error, created_by, \
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
     to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

fn task_from(r: &tokio_postgres::Row) -> TaskRecord {
    TaskRecord {
        id: r.get(0),
        customer: r.get(1),
        app: r.get(2),
        kind: r.get(3),
        params: r.get(4),
        state: r.get(5),
        attempt: r.get(6),
        progress: r.get(7),
        result: r.get(8),
        error: r.get(9),
        created_by: r.get(10),
        created_at: r.get(11),
        finished_at: r.get(12),
    }
}

impl Db {
    /// Connects and applies pending migrations: the core's, then each of
    /// `kinds`' schemas.
    pub async fn connect(url: &str, pool_size: usize, kinds: &[&Schema]) -> Result<Db, DbError> {
        let pool = pg::pool(url, pool_size, QUERY_TIMEOUT).map_err(|e| match e {
            pg::PgError::Url(e) => unavailable(format!("jobs.postgres_url: {e}")),
            e => unavailable(e),
        })?;
        pg::migrate(&pool, "jobs_schema", MIGRATION_LOCK, MIGRATIONS)
            .await
            .map_err(unavailable)?;
        for k in kinds {
            pg::migrate(&pool, k.version_table, MIGRATION_LOCK, k.migrations)
                .await
                .map_err(unavailable)?;
        }
        Ok(Db { pool })
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool
            .get()
            .await
            .map_err(|e| DbError::Unavailable(pg::describe(&e)))
    }

    /// Runs a read-only query (for views that join several parts).
    pub(crate) async fn read(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, DbError> {
        self.client().await?.query(sql, params).await.map_err(unavailable)
    }

    pub async fn ping(&self) -> bool {
        match self.client().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    // ---- the queue -------------------------------------------------------

    /// Queues a task; `Busy` when its customer or app has an active one.
    pub async fn enqueue(
        &self,
        subject: Subject<'_>,
        kind: &str,
        params: &Value,
        by: &str,
        max_attempts: u32,
    ) -> Result<i64, DbError> {
        let (customer, app) = subject.columns();
        let c = self.client().await?;
        let r = c
            .query_one(
                "INSERT INTO tasks (customer_id, app, kind, params, state, max_attempts, created_by)
                 VALUES ($1, $2, $3, $4, 'queued', $5, $6) RETURNING id",
                &[&customer, &app, &kind, params, &(max_attempts as i32), &by],
            )
            .await;
        match r {
            Ok(row) => Ok(row.get(0)),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let task = c
                    .query_opt(
                        "SELECT id FROM tasks WHERE (customer_id = $1 OR app = $2) AND state IN ('queued', 'running')",
                        &[&customer, &app],
                    )
                    .await
                    .map_err(unavailable)?
                    .map_or(0, |r| r.get(0));
                Err(DbError::Busy {
                    subject: subject.to_string(),
                    task,
                })
            }
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                Err(DbError::Missing(subject.to_string()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The id of the subject's queued or running task, if any.
    pub async fn active_task(&self, subject: Subject<'_>) -> Result<Option<i64>, DbError> {
        let (customer, app) = subject.columns();
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id FROM tasks WHERE (customer_id = $1 OR app = $2) AND state IN ('queued', 'running')",
                &[&customer, &app],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Claims the oldest ready task for `lease`, or none.
    pub async fn claim(&self, lease: Duration) -> Result<Option<Claimed>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "UPDATE tasks SET state = 'running', attempt = attempt + 1,
                        lease_until = now() + make_interval(secs => $1),
                        started_at = coalesce(started_at, now())
                 WHERE id = (SELECT id FROM tasks WHERE state = 'queued' AND run_after <= now()
                             ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)
                 RETURNING id, customer_id, app, kind, params, attempt, created_by",
                &[&lease.as_secs_f64()],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Claimed {
            id: r.get(0),
            customer_id: r.get(1),
            app: r.get(2),
            kind: r.get(3),
            params: r.get(4),
            attempt: r.get(5),
            created_by: r.get(6),
        }))
    }

    /// Renews the lease and stores progress. `Ok(None)`: the lease is lost
    /// (this attempt must stop); `Ok(Some(cancel))`: renewed.
    pub async fn heartbeat(
        &self,
        t: &Claimed,
        lease: Duration,
        progress: &Value,
    ) -> Result<Option<bool>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "UPDATE tasks SET lease_until = now() + make_interval(secs => $3), progress = $4
                 WHERE id = $1 AND attempt = $2 AND state = 'running' RETURNING cancel_requested",
                &[&t.id, &t.attempt, &lease.as_secs_f64(), progress],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Ends an attempt: `succeeded`, `failed`, `cancelled`, or back to
    /// `queued` after `retry_in` when attempts remain. False: fenced off.
    pub async fn finish(&self, t: &Claimed, outcome: Outcome<'_>, progress: &Value) -> Result<bool, DbError> {
        let c = self.client().await?;
        let n = match outcome {
            Outcome::Succeeded(result) => {
                c.execute(
                    "UPDATE tasks SET state = 'succeeded', result = $3, progress = $4, error = NULL,
                            lease_until = NULL, finished_at = now()
                     WHERE id = $1 AND attempt = $2 AND state = 'running'",
                    &[&t.id, &t.attempt, result, progress],
                )
                .await
            }
            Outcome::Retry { error, retry_in } => {
                c.execute(
                    "UPDATE tasks SET
                        state = CASE WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END,
                        run_after = now() + make_interval(secs => $4),
                        finished_at = CASE WHEN attempt < max_attempts THEN NULL ELSE now() END,
                        error = $3, progress = $5, lease_until = NULL
                     WHERE id = $1 AND attempt = $2 AND state = 'running'",
                    &[&t.id, &t.attempt, &error, &retry_in.as_secs_f64(), progress],
                )
                .await
            }
            Outcome::Failed(ref error) | Outcome::Cancelled(ref error) => {
                let state = if matches!(outcome, Outcome::Cancelled(_)) {
                    "cancelled"
                } else {
                    "failed"
                };
                c.execute(
                    "UPDATE tasks SET state = $3, error = $4, progress = $5, lease_until = NULL, finished_at = now()
                     WHERE id = $1 AND attempt = $2 AND state = 'running'",
                    &[&t.id, &t.attempt, &state, &error, progress],
                )
                .await
            }
        }
        .map_err(unavailable)?;
        Ok(n == 1)
    }

    /// Re-queues (or fails, when out of attempts) tasks whose lease ran
    /// out: their worker died or stalled.
    pub async fn reap(&self) -> Result<Vec<Reaped>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "UPDATE tasks SET
                    state = CASE WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END,
                    finished_at = CASE WHEN attempt < max_attempts THEN NULL ELSE now() END,
                    error = 'attempt ' || attempt || ': lease expired (worker lost)',
                    lease_until = NULL
                 WHERE state = 'running' AND lease_until < now()
                 RETURNING id, customer_id, app, kind, state",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| Reaped {
                id: r.get(0),
                customer_id: r.get(1),
                app: r.get(2),
                kind: r.get(3),
                state: r.get(4),
            })
            .collect())
    }

    /// Asks a task to stop: a queued one is cancelled at once, a running
    /// one at its next heartbeat. False when it is not active.
    pub async fn cancel(&self, subject: Subject<'_>, id: i64) -> Result<bool, DbError> {
        let (customer, app) = subject.columns();
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE tasks SET
                    cancel_requested = true,
                    state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
                    finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END
                 WHERE id = $1 AND (customer_id = $2 OR app = $3) AND state IN ('queued', 'running')",
                &[&id, &customer, &app],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    /// Queued and running tasks, by (kind, state).
    pub async fn active_counts(&self) -> Result<Vec<(String, String, i64)>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT kind, state, count(*) FROM tasks WHERE state IN ('queued', 'running') GROUP BY 1, 2",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// Deletes finished tasks older than `days`.
    pub async fn prune(&self, days: u32) -> Result<u64, DbError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM tasks WHERE state IN ('succeeded', 'failed', 'cancelled')
                 AND finished_at < now() - make_interval(days => $1)",
                &[&(days as i32)],
            )
            .await
            .map_err(unavailable)
    }

    /// A task of `subject`.
    pub async fn task(&self, subject: Subject<'_>, id: i64) -> Result<Option<TaskRecord>, DbError> {
        let (customer, app) = subject.columns();
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND (customer_id = $2 OR app = $3)"),
                &[&id, &customer, &app],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(task_from))
    }

    /// The subject's latest tasks, newest first.
    pub async fn tasks(&self, subject: Subject<'_>, limit: i64) -> Result<Vec<TaskRecord>, DbError> {
        let (customer, app) = subject.columns();
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE (customer_id = $1 OR app = $2) ORDER BY id DESC LIMIT $3"
                ),
                &[&customer, &app, &limit],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(task_from).collect())
    }

    /// Of `ids`, the tasks that have ended (succeeded, failed, cancelled).
    /// Ids this database does not know are in neither answer: their
    /// containers and images are never treated as orphans.
    pub async fn ended_tasks(&self, ids: &[i64]) -> Result<Vec<i64>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id FROM tasks WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'cancelled')",
                &[&ids],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    // ---- audit -----------------------------------------------------------

    /// Records `action` on `subject` (and `target` within it). App entries
    /// have no customer: the target names the app, `app:<name>[#target]`.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        subject: Subject<'_>,
        target: Option<&str>,
        result: &str,
        detail: &Value,
    ) -> Result<(), DbError> {
        let (customer, target) = match subject {
            Subject::Customer(c) => (Some(c), target.map(str::to_string)),
            Subject::App(a) => (
                None,
                Some(target.map_or_else(|| format!("app:{a}"), |t| format!("app:{a}#{t}"))),
            ),
        };
        self.audit_row(actor, action, customer, target.as_deref(), result, detail)
            .await
    }

    /// Writes an audit entry about anything (`customer` when it concerns one).
    pub async fn audit_row(
        &self,
        actor: &str,
        action: &str,
        customer: Option<&str>,
        target: Option<&str>,
        result: &str,
        detail: &Value,
    ) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO audit (actor, action, customer_id, target, result, detail) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&actor, &action, &customer, &target, &result, detail],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The newest audit entries that match `f`, newest first.
    pub async fn audit_log(&self, f: &AuditFilter) -> Result<Vec<Value>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT json_build_object('id', id, 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        'actor', actor, 'action', action, 'customer', customer_id, 'target', target,
                        'result', result, 'detail', detail)::jsonb
                 FROM audit
                 WHERE ($1::text IS NULL OR customer_id = $1) AND ($2::text IS NULL OR actor = $2)
                   AND ($3::text IS NULL OR action = $3 OR action LIKE $3 || '.%')
                   AND ($4::timestamptz IS NULL OR at >= $4) AND ($5::timestamptz IS NULL OR at < $5)
                 ORDER BY id DESC LIMIT $6",
                &[&f.customer, &f.actor, &f.action, &f.since, &f.until, &f.limit],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// Which audit entries to show (every field optional).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub customer: Option<String>,
    pub actor: Option<String>,
    /// An action (`backup.create`) or a family of them (`backup`).
    pub action: Option<String>,
    pub since: Option<std::time::SystemTime>,
    pub until: Option<std::time::SystemTime>,
    pub limit: i64,
}

/// How an attempt ended.
pub enum Outcome<'a> {
    Succeeded(&'a Value),
    /// Retryable: queued again after `retry_in` while attempts remain.
    Retry {
        error: String,
        retry_in: Duration,
    },
    Failed(String),
    Cancelled(String),
}
