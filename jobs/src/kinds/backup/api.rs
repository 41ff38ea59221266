//! Backup routes: create (fast or custom, pre-checked), list, delete,
//! signed download links and the download itself.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use portico_common::api::ApiError;
use portico_common::auth::now_secs;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower::ServiceExt;

use super::links::Signer;
use super::{self as backup, Include};
use crate::api::{KindApi, OPS_LEAD, STAFF, SUPER_ADMIN, bad, json_body, not_found};
use crate::queue::Subject;
use crate::staff::auth::{Caller, Staff};

/// The backup routes' state: the shared API and the download-link signer.
pub type BackupApi = KindApi<Signer>;

pub fn router(api: Arc<BackupApi>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Staff, _>(routes!(create_backup)))
        .routes(secured::<Staff, _>(routes!(list_backups)))
        .routes(secured::<Staff, _>(routes!(delete_backup)))
        .routes(secured::<Staff, _>(routes!(links)))
        .routes(routes!(download))
        .with_state(api)
}

/// A backup to take: `fast` (database, uploads, .env and PM2 files) or
/// `custom` with its include flags.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"type": "custom", "include": {"db": false, "uploads": true, "envPm2": true, "logs": false, "artifacts": false}}))]
struct NewBackup {
    /// `fast` or `custom`.
    #[serde(rename = "type")]
    #[schema(example = "fast")]
    kind: String,
    /// Only with `custom`.
    include: Option<Include>,
}

#[utoipa::path(
    post, path = "/api/customers/{id}/backups", tag = "backups",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = NewBackup,
    responses(
        (status = 202, description = "Queued: follow the task", body = crate::api::Queued),
        Errors,
    ),
)]
async fn create_backup(
    State(api): State<Arc<BackupApi>>,
    who: Caller<Staff>,
    Path(id): Path<String>,
    body: Result<Json<NewBackup>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
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
    Ok((StatusCode::ACCEPTED, crate::api::Queued::new(task)))
}

#[utoipa::path(
    get, path = "/api/customers/{id}/backups", tag = "backups",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 200, description = "OK", body = Backups), Errors),
)]
async fn list_backups(
    State(api): State<Arc<BackupApi>>,
    _who: Caller<Staff>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.customer(&id).await?;
    Ok(Json(Backups {
        backups: api.db()?.backups(&id).await?,
    }))
}

/// A customer's backups, newest first.
#[derive(Serialize, utoipa::ToSchema)]
struct Backups {
    backups: Vec<super::db::BackupRow>,
}

/// Signed download links of a backup's files.
#[derive(Serialize, utoipa::ToSchema)]
struct Links {
    /// Seconds since the epoch.
    expires: u64,
    links: Vec<Link>,
}

/// One file's signed link (no token needed to follow it).
#[derive(Serialize, utoipa::ToSchema)]
struct Link {
    #[schema(example = "manifest.json")]
    file: String,
    /// Relative to the API's origin.
    url: String,
}

pub(crate) fn backup_id(id: &str) -> Result<&str, ApiError> {
    if backup::is_backup_id(id) {
        Ok(id)
    } else {
        Err(bad("invalid_backup_id", "backup ids look like YYYYMMDD-HHMMSS"))
    }
}

/// Deletes a backup (its row and files). Technicians may only where
/// `jobs.technician_can_delete` is set.
#[utoipa::path(
    delete, path = "/api/customers/{id}/backups/{backup}", tag = "backups",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("backup", description = "Backup id (YYYYMMDD-HHMMSS)", pattern = "^[0-9]{8}-[0-9]{6}$")),
    responses((status = 204, description = "Done"), Errors),
)]
async fn delete_backup(
    State(api): State<Arc<BackupApi>>,
    who: Caller<Staff>,
    Path((id, backup)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let roles: &[&str] = if api.cfg.technician_can_delete {
        STAFF
    } else {
        &[SUPER_ADMIN, OPS_LEAD]
    };
    who.require(roles)?;
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
#[utoipa::path(
    post, path = "/api/customers/{id}/backups/{backup}/links", operation_id = "backup_links", tag = "backups",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("backup", description = "Backup id (YYYYMMDD-HHMMSS)", pattern = "^[0-9]{8}-[0-9]{6}$")),
    responses(
        (status = 200, description = "Signed links, valid until `expires`", body = Links),
        Errors,
    ),
)]
async fn links(
    State(api): State<Arc<BackupApi>>,
    who: Caller<Staff>,
    Path((id, backup)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
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
    let links: Vec<Link> = files
        .into_iter()
        .map(|file| {
            let sig = api.kind.sign(&id, backup, &file, expires);
            let url = format!(
                "/api/customers/{id}/backups/{backup}/download?file={file}&expires={expires}&sig={sig}"
            );
            Link { file, url }
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
    Ok(Json(Links { expires, links }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Signed {
    file: String,
    expires: u64,
    sig: String,
}

/// Streams a file of a backup to whoever holds a valid signed link
/// (Content-Length, Range, and no bearer token needed).
#[utoipa::path(
    get, path = "/api/customers/{id}/backups/{backup}/download", operation_id = "download_backup_file", tag = "backups",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("backup", description = "Backup id (YYYYMMDD-HHMMSS)", pattern = "^[0-9]{8}-[0-9]{6}$"), Signed),
    responses(
        (status = 200, description = "The file (Range requests are answered with 206)", body = Vec<u8>, content_type = "*/*"),
        (status = 206, description = "The requested range", body = Vec<u8>, content_type = "*/*"),
        Errors,
    ),
)]
async fn download(
    State(api): State<Arc<BackupApi>>,
    Path((id, backup)): Path<(String, String)>,
    query: Result<Query<Signed>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let forbidden = |m: String| ApiError(StatusCode::FORBIDDEN, "forbidden", m);
    let Query(q) = query.map_err(|_| forbidden("a signed link is required (file, expires, sig)".into()))?;
    api.kind
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
