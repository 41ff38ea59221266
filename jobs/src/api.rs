//! The core of the REST API (axum): the [`Api`] state every route shares
//! (database, config, tokens, events), errors, task helpers. The audit
//! log route is in [`crate::audit`]; customer routes are in
//! [`crate::customers::api`], each kind's in its folder; [`crate::kinds`]
//! merges them. Every route learns its caller from one extractor,
//! [`crate::staff::auth::Caller`] (a bearer token or a console session),
//! with a role: `super_admin`, `ops_lead` or
//! `technician` (and `service` for other Portico services).
//! Every body is parsed strictly (unknown fields refused) and validated;
//! errors are JSON `{ "error": code, "message": … }` with a 4xx status.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::routing::get;
use portico_common::api::ApiError;
use portico_common::auth::{Claims, Tokens};
use portico_config::JobsConfig;
use serde_json::{Value, json};

use crate::queue::progress::Events;
use crate::queue::{Db, DbError, Subject, TaskRecord};

pub const SUPER_ADMIN: &str = "super_admin";
pub const OPS_LEAD: &str = "ops_lead";
pub const TECHNICIAN: &str = "technician";
pub(crate) const STAFF: &[&str] = &[SUPER_ADMIN, OPS_LEAD, TECHNICIAN];
/// The role of other Portico services (the gateway reads route tables).
pub(crate) const SERVICE: &str = "service";

/// A kind's route state: the shared [`Api`] (reached through `Deref`) and
/// what the kind adds to it (its signer, its Docker side, its config).
pub struct KindApi<S> {
    pub api: Arc<Api>,
    pub kind: S,
}

impl<S> std::ops::Deref for KindApi<S> {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// What every route shares.
pub struct Api {
    /// None without `jobs.postgres_url`: queue-backed routes answer 503.
    pub db: Option<Db>,
    pub cfg: JobsConfig,
    pub tokens: Tokens,
    pub events: Events,
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

/// The core route: the service's identity.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route(
            "/api/jobs",
            get(|| async { Json(json!({ "service": "portico-jobs", "api": 1 })) }),
        )
        .with_state(api)
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
