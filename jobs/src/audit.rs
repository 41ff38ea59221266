//! The audit log route (`GET /api/audit`, super admins and ops leads) and
//! its filters, which the console's audit page takes too.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use portico_common::api::ApiError;
use serde::Deserialize;
use serde_json::json;

use crate::api::{Api, bad};
use crate::queue::db::AuditFilter;
use crate::staff::auth::{Caller, Leads};

pub fn router(api: Arc<Api>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Leads, _>(routes!(audit)))
        .with_state(api)
}

/// The audit log's filters, as the API and the console take them.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
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

/// Audit entries, newest first, by the filters.
#[utoipa::path(
    get, path = "/api/audit", operation_id = "list_audit", tag = "audit",
    params(AuditQuery),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
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
        assert_eq!(e.0, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.2.contains("since") && e.2.contains("yesterday"), "{}", e.2);
    }
}
