//! The core of the REST API (axum): the [`Api`] state every route shares
//! (database, config, tokens, events), the caller check, errors, task
//! helpers and the audit log route. Customer routes are in
//! [`crate::customers::api`], each kind's in its folder; [`crate::kinds`]
//! merges them. Every route learns its caller from one extractor,
//! [`Caller`] (a bearer token or a console session; see
//! [`crate::staff::auth`]), with a role: `super_admin`, `ops_lead` or
//! `technician` (and `service` for other Portico services).
//! Every body is parsed strictly (unknown fields refused) and validated;
//! errors are JSON `{ "error": code, "message": … }` with a 4xx status.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use portico_common::api::ApiError;
use portico_common::auth::{Claims, Tokens};
use portico_config::JobsConfig;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::queue::db::AuditFilter;
use crate::queue::progress::Events;
use crate::queue::{Db, DbError, Subject, TaskRecord};
pub use crate::staff::auth::{Caller, Leads, Services, Staff, StaffOrServices, SuperAdmin};

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

/// The core routes: the service's identity and the audit log.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route(
            "/api/jobs",
            get(|| async { Json(json!({ "service": "portico-jobs", "api": 1 })) }),
        )
        .route("/api/audit", get(audit))
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

/// The audit log's filters, as the API and the console take them.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub customer: Option<String>,
    /// Who did it (a user id).
    pub actor: Option<String>,
    /// An action (`backup.create`) or its family (`backup`).
    pub action: Option<String>,
    /// From this time on: RFC 3339 or a date (YYYY-MM-DD, UTC).
    pub since: Option<String>,
    /// Before this time: RFC 3339 or a date (YYYY-MM-DD, UTC).
    pub until: Option<String>,
    pub limit: Option<i64>,
}

impl AuditQuery {
    /// The database filter; empty fields mean "any".
    pub fn filter(&self) -> Result<AuditFilter, ApiError> {
        let text = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let time = |name: &str, v: &Option<String>| -> Result<Option<std::time::SystemTime>, ApiError> {
            let Some(v) = text(v) else { return Ok(None) };
            let parsed = chrono::DateTime::parse_from_rfc3339(&v)
                .map(|t| t.to_utc())
                .or_else(|_| {
                    chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d")
                        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
                })
                .map_err(|_| {
                    bad(
                        "invalid_query",
                        format!("{name} must be RFC 3339 or YYYY-MM-DD, not `{v}`"),
                    )
                })?;
            Ok(Some(parsed.into()))
        };
        Ok(AuditFilter {
            customer: text(&self.customer),
            actor: text(&self.actor),
            action: text(&self.action),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            limit: self.limit.unwrap_or(100).clamp(1, 1000),
        })
    }
}

async fn audit(
    State(api): State<Arc<Api>>,
    _who: Caller<Leads>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    Ok(Json(
        json!({ "entries": api.db()?.audit_log(&q.filter()?).await? }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_filters_take_dates_and_times_and_refuse_the_rest() {
        let q = AuditQuery {
            actor: Some(" alice ".into()),
            action: Some(String::new()),
            since: Some("2026-12-01".into()),
            until: Some("2026-12-02T10:00:00+02:00".into()),
            ..Default::default()
        };
        let f = q.filter().unwrap();
        assert_eq!(f.actor.as_deref(), Some("alice"));
        assert_eq!(f.action, None, "an empty field means any");
        let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(f.since.unwrap()), 1_796_083_200, "midnight UTC");
        assert_eq!(
            secs(f.until.unwrap()),
            1_796_198_400,
            "10:00 at +02:00 is 08:00 UTC"
        );
        assert_eq!(f.limit, 100);
        let bad = AuditQuery {
            since: Some("yesterday".into()),
            ..Default::default()
        };
        let e = bad.filter().unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.2.contains("since") && e.2.contains("yesterday"), "{}", e.2);
    }
}
