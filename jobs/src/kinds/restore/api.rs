//! The restore route: queue a restore (or a dry run) of a backup.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use portico_common::api::ApiError;
use serde::Deserialize;
use serde_json::json;

use crate::api::{Api, bad, json_body};
use crate::kinds::backup::api::backup_id;
use crate::queue::Subject;
use crate::staff::auth::{Caller, Leads};

pub fn router(api: Arc<Api>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Leads, _>(routes!(restore)))
        .with_state(api)
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    #[serde(default)]
    dry_run: bool,
    target_db: Option<String>,
}

#[utoipa::path(
    post, path = "/api/customers/{id}/backups/{backup}/restore", operation_id = "start_restore", tag = "backups",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("backup", description = "Backup id (YYYYMMDD-HHMMSS)", pattern = "^[0-9]{8}-[0-9]{6}$")),
    request_body = RestoreRequest,
    responses(
        (status = 202, description = "Queued: follow the task", body = crate::api::Queued),
        Errors,
    ),
)]
async fn restore(
    State(api): State<Arc<Api>>,
    who: Caller<Leads>,
    Path((id, backup)): Path<(String, String)>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
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
    Ok((StatusCode::ACCEPTED, crate::api::Queued::new(r?)))
}
