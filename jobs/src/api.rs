//! The REST API (axum): customers, backups (create, list, signed download
//! links, delete, restore), tasks and the audit log; the apps API lives in
//! [`crate::paas::api`] and is merged here. Callers carry a
//! bearer token with a role: `super_admin`, `ops_lead` or `technician`.
//! Every body is parsed strictly (unknown fields refused) and validated;
//! errors are JSON `{ "error": code, "message": … }` with a 4xx status.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use portico_common::api::ApiError;
use portico_common::auth::{Claims, Tokens, bearer_token, now_secs};
use portico_config::{JobsConfig, is_hostname};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::backup::{self, Include};
use crate::db::{Customer, Db, DbError, Subject, TaskRecord};
use crate::links::Signer;
use crate::progress::Events;

pub const SUPER_ADMIN: &str = "super_admin";
pub const OPS_LEAD: &str = "ops_lead";
pub const TECHNICIAN: &str = "technician";
pub(crate) const STAFF: &[&str] = &[SUPER_ADMIN, OPS_LEAD, TECHNICIAN];

pub struct Api {
    pub db: Option<Db>,
    pub cfg: JobsConfig,
    pub tokens: Tokens,
    pub signer: Signer,
    pub events: Events,
    pub paas: Arc<crate::paas::Paas>,
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Busy { ref subject, task } => ApiError(
                StatusCode::CONFLICT,
                if subject.starts_with("app ") {
                    "app_busy"
                } else {
                    "customer_busy"
                },
                format!("{e} (task {task})"),
            ),
            DbError::Missing(_) => ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            DbError::Full(_) => ApiError(StatusCode::CONFLICT, "full", e.to_string()),
            DbError::Exists(_) => ApiError(StatusCode::CONFLICT, "exists", e.to_string()),
            DbError::Unavailable(_) => {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
            }
        }
    }
}

pub(crate) fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, code, msg.into())
}

pub(crate) fn not_found(what: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", what.into())
}

pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| bad("invalid_body", e.body_text()))
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route(
            "/api/jobs",
            get(|| async { Json(json!({ "service": "portico-jobs", "api": 1 })) }),
        )
        .route("/api/customers", post(create_customer).get(list_customers))
        .route("/api/customers/{id}", get(get_customer))
        .route(
            "/api/customers/{id}/backups",
            post(create_backup).get(list_backups),
        )
        .route(
            "/api/customers/{id}/backups/{backup}",
            axum::routing::delete(delete_backup),
        )
        .route("/api/customers/{id}/backups/{backup}/links", post(links))
        .route("/api/customers/{id}/backups/{backup}/download", get(download))
        .route("/api/customers/{id}/backups/{backup}/restore", post(restore))
        .route("/api/customers/{id}/tasks", get(list_tasks))
        .route("/api/customers/{id}/tasks/{task}", get(get_task))
        .route("/api/customers/{id}/tasks/{task}/cancel", post(cancel_task))
        .route("/api/audit", get(audit))
        .with_state(api.clone())
        .merge(crate::paas::api::router(api))
}

impl Api {
    pub(crate) fn db(&self) -> Result<&Db, ApiError> {
        self.db.as_ref().ok_or_else(|| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_database",
                "the task queue needs PostgreSQL: set jobs.postgres_url (PORTICO_JOBS__POSTGRES_URL)".into(),
            )
        })
    }

    /// The caller, if its token verifies and it has one of `roles`.
    pub(crate) fn caller(&self, headers: &HeaderMap, roles: &[&str]) -> Result<Claims, ApiError> {
        let token = bearer_token(headers).ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a bearer token is required".into(),
            )
        })?;
        let claims = self
            .tokens
            .verify(token)
            .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))?;
        if roles.iter().any(|r| claims.has_role(r)) {
            Ok(claims)
        } else {
            Err(ApiError(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs one of the roles {}", roles.join(", ")),
            ))
        }
    }

    async fn customer(&self, id: &str) -> Result<Customer, ApiError> {
        self.db()?
            .customer(id)
            .await?
            .ok_or_else(|| not_found(format!("customer {id}")))
    }

    /// Writes an audit entry (failures are logged, never fatal).
    pub(crate) async fn audit(
        &self,
        who: &Claims,
        action: &str,
        subject: Subject<'_>,
        target: Option<&str>,
        result: &str,
        detail: Value,
    ) {
        if let Ok(db) = self.db()
            && let Err(e) = db.audit(&who.sub, action, subject, target, result, &detail).await
        {
            tracing::error!(error = %e, action, "audit log write failed");
        }
    }

    /// A task of `subject`, or 404.
    pub(crate) async fn task_of(&self, subject: Subject<'_>, task: i64) -> Result<TaskRecord, ApiError> {
        self.db()?
            .task(subject, task)
            .await?
            .ok_or_else(|| not_found(format!("task {task}")))
    }

    /// Cancels a task of `subject` (audited); 409 when it is not active.
    pub(crate) async fn cancel(
        &self,
        who: &Claims,
        subject: Subject<'_>,
        task: i64,
    ) -> Result<StatusCode, ApiError> {
        let ok = self.db()?.cancel(subject, task).await?;
        let result = if ok { "ok" } else { "not_active" };
        self.audit(
            who,
            "task.cancel",
            subject,
            Some(&task.to_string()),
            result,
            json!({}),
        )
        .await;
        if ok {
            Ok(StatusCode::ACCEPTED)
        } else {
            Err(ApiError(
                StatusCode::CONFLICT,
                "not_active",
                format!("task {task} of {subject} is not queued or running"),
            ))
        }
    }
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCustomer {
    id: String,
    domain: String,
    /// The customer database, e.g. postgres://user:pw@host/db.
    database_url: Option<String>,
    process_manager: Option<String>,
    /// Who may follow the ops conversation (besides the creator).
    #[serde(default)]
    ops_members: Vec<String>,
}

async fn create_customer(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Json<NewCustomer>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = api.caller(&headers, &[SUPER_ADMIN])?;
    let req = json_body(body)?;
    if !is_slug(&req.id) {
        return Err(bad(
            "invalid_id",
            "id must be 1-63 of a-z 0-9 - (not starting with -)",
        ));
    }
    if !is_hostname(&req.domain) {
        return Err(bad(
            "invalid_domain",
            format!("`{}` is not a valid domain", req.domain),
        ));
    }
    if let Some(url) = &req.database_url
        && url.parse::<tokio_postgres::Config>().is_err()
    {
        return Err(bad(
            "invalid_database_url",
            "database_url is not a valid PostgreSQL URL",
        ));
    }
    let pm = req.process_manager.unwrap_or_else(|| "pm2".into());
    if !["pm2", "systemd"].contains(&pm.as_str()) {
        return Err(bad(
            "invalid_process_manager",
            "process_manager must be pm2 or systemd",
        ));
    }
    if req.ops_members.len() > 100 || req.ops_members.iter().any(|m| m.is_empty() || m.len() > 128) {
        return Err(bad(
            "invalid_ops_members",
            "ops_members: at most 100 user ids of 1-128 bytes",
        ));
    }
    let root: PathBuf = api.cfg.customers_root.join(req.domain.to_ascii_lowercase());
    let c = Customer {
        id: req.id.clone(),
        domain: req.domain.to_ascii_lowercase(),
        root: root.display().to_string(),
        has_database: req.database_url.is_some(),
        db_url: req.database_url,
        process_manager: pm,
    };
    let r = api.db()?.add_customer(&c).await;
    api.audit(
        &who,
        "customer.create",
        Subject::Customer(&c.id),
        None,
        if r.is_ok() { "ok" } else { "refused" },
        json!({ "domain": c.domain }),
    )
    .await;
    r?;
    let mut members = req.ops_members;
    members.push(who.sub.clone());
    api.events.open_channel(Subject::Customer(&c.id), &members).await;
    Ok((StatusCode::CREATED, Json(c)))
}

async fn list_customers(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    api.caller(&headers, STAFF)?;
    Ok(Json(json!({ "customers": api.db()?.customers().await? })))
}

async fn get_customer(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.caller(&headers, STAFF)?;
    Ok(Json(api.customer(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackup {
    #[serde(rename = "type")]
    kind: String,
    include: Option<Include>,
}

async fn create_backup(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<NewBackup>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = api.caller(&headers, STAFF)?;
    let req = json_body(body)?;
    let include = match (req.kind.as_str(), req.include) {
        ("fast", None) => Include::FAST,
        ("fast", Some(_)) => return Err(bad("invalid_include", "a fast backup takes no include flags")),
        ("custom", Some(inc)) => inc,
        ("custom", None) => return Err(bad("invalid_include", "a custom backup needs include flags")),
        _ => return Err(bad("invalid_type", "type must be \"fast\" or \"custom\"")),
    };
    let c = api.customer(&id).await?;
    // Refuse now what cannot work: no space, no tree, no database. The
    // task checks again when it runs: things change while it is queued.
    if let Err(e) = backup::precheck(&c, &include, &(&api.cfg).into()).await {
        let status = match e {
            backup::BackupError::Disk { .. } => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        api.audit(
            &who,
            "backup.create",
            Subject::Customer(&id),
            None,
            "refused",
            json!({ "error": e.to_string() }),
        )
        .await;
        return Err(ApiError(status, "precheck_failed", e.to_string()));
    }
    let params = json!({ "type": req.kind, "include": include });
    let r = api
        .db()?
        .enqueue(
            Subject::Customer(&id),
            "backup",
            &params,
            &who.sub,
            api.cfg.max_attempts,
        )
        .await;
    let (result, detail) = match &r {
        Ok(task) => ("queued", json!({ "task": task, "type": req.kind })),
        Err(e) => ("refused", json!({ "error": e.to_string() })),
    };
    api.audit(
        &who,
        "backup.create",
        Subject::Customer(&id),
        None,
        result,
        detail,
    )
    .await;
    let task = r?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "task": task, "state": "queued" })),
    ))
}

async fn list_backups(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.caller(&headers, STAFF)?;
    api.customer(&id).await?;
    Ok(Json(json!({ "backups": api.db()?.backups(&id).await? })))
}

fn backup_id(id: &str) -> Result<&str, ApiError> {
    if backup::is_backup_id(id) {
        Ok(id)
    } else {
        Err(bad("invalid_backup_id", "backup ids look like YYYYMMDD-HHMMSS"))
    }
}

async fn delete_backup(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, backup)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let roles: &[&str] = if api.cfg.technician_can_delete {
        STAFF
    } else {
        &[SUPER_ADMIN, OPS_LEAD]
    };
    let who = api.caller(&headers, roles)?;
    let backup = backup_id(&backup)?;
    let c = api.customer(&id).await?;
    if !api.db()?.delete_backup(&id, backup).await? {
        return Err(not_found(format!("backup {backup}")));
    }
    let dir = backup::backups_dir(std::path::Path::new(&c.root)).join(backup);
    let removed = tokio::fs::remove_dir_all(&dir).await;
    api.audit(
        &who,
        "backup.delete",
        Subject::Customer(&id),
        Some(backup),
        if removed.is_ok() { "ok" } else { "partial" },
        json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Signed links for every file of a backup (and its manifest).
async fn links(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, backup)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let who = api.caller(&headers, STAFF)?;
    let backup = backup_id(&backup)?;
    api.customer(&id).await?;
    let row = api
        .db()?
        .backups(&id)
        .await?
        .into_iter()
        .find(|b| b.id == backup)
        .ok_or_else(|| not_found(format!("backup {backup}")))?;
    let expires = now_secs() + api.cfg.link_ttl_secs;
    let mut files: Vec<String> = row.manifest["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["file"].as_str().map(str::to_string))
        .collect();
    files.push(backup::MANIFEST.into());
    let links: Vec<Value> = files
        .iter()
        .map(|f| {
            let sig = api.signer.sign(&id, backup, f, expires);
            json!({ "file": f, "url": format!("/api/customers/{id}/backups/{backup}/download?file={f}&expires={expires}&sig={sig}") })
        })
        .collect();
    api.audit(
        &who,
        "backup.links",
        Subject::Customer(&id),
        Some(backup),
        "ok",
        json!({ "expires": expires }),
    )
    .await;
    Ok(Json(json!({ "expires": expires, "links": links })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed {
    file: String,
    expires: u64,
    sig: String,
}

/// Streams a file of a backup to whoever holds a valid signed link
/// (Content-Length, Range, and no bearer token needed).
async fn download(
    State(api): State<Arc<Api>>,
    Path((id, backup)): Path<(String, String)>,
    query: Result<Query<Signed>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let forbidden = |m: String| ApiError(StatusCode::FORBIDDEN, "forbidden", m);
    let Query(q) = query.map_err(|_| forbidden("a signed link is required (file, expires, sig)".into()))?;
    api.signer
        .verify(&id, &backup, &q.file, q.expires, &q.sig, now_secs())
        .map_err(|e| forbidden(e.to_string()))?;
    // A valid signature names our own files, but check shape anyway.
    let plain = |s: &str| !s.is_empty() && !s.contains('/') && !s.starts_with('.') && s != "..";
    if !backup::is_backup_id(&backup) || !plain(&q.file) {
        return Err(forbidden("not a backup file".into()));
    }
    let c = api.customer(&id).await?;
    let path = backup::backups_dir(std::path::Path::new(&c.root))
        .join(&backup)
        .join(&q.file);
    if !path.is_file() {
        return Err(not_found(format!("{backup}/{}", q.file)));
    }
    let resp = tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    Ok(resp.map(axum::body::Body::new))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    #[serde(default)]
    dry_run: bool,
    target_db: Option<String>,
}

async fn restore(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, backup)): Path<(String, String)>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = api.caller(&headers, &[SUPER_ADMIN, OPS_LEAD])?;
    let backup = backup_id(&backup)?.to_string();
    let req = json_body(body)?;
    if let Some(url) = &req.target_db
        && url.parse::<tokio_postgres::Config>().is_err()
    {
        return Err(bad(
            "invalid_target_db",
            "target_db is not a valid PostgreSQL URL",
        ));
    }
    api.customer(&id).await?;
    let params = json!({ "backup": backup, "dry_run": req.dry_run, "target_db": req.target_db });
    let r = api
        .db()?
        .enqueue(Subject::Customer(&id), "restore", &params, &who.sub, 1)
        .await;
    api.audit(
        &who,
        "backup.restore",
        Subject::Customer(&id),
        Some(&backup),
        if r.is_ok() { "queued" } else { "refused" },
        json!({ "dry_run": req.dry_run }),
    )
    .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "task": r?, "state": "queued" })),
    ))
}

async fn list_tasks(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.caller(&headers, STAFF)?;
    Ok(Json(
        json!({ "tasks": api.db()?.tasks(Subject::Customer(&id), 100).await? }),
    ))
}

async fn get_task(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    api.caller(&headers, STAFF)?;
    Ok(Json(api.task_of(Subject::Customer(&id), task).await?))
}

async fn cancel_task(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((id, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    let who = api.caller(&headers, STAFF)?;
    api.cancel(&who, Subject::Customer(&id), task).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    customer: Option<String>,
    limit: Option<i64>,
}

async fn audit(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    api.caller(&headers, &[SUPER_ADMIN, OPS_LEAD])?;
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(
        json!({ "entries": api.db()?.audit_log(q.customer.as_deref(), limit).await? }),
    ))
}
