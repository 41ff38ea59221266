//! Backup routes: create (fast or custom, pre-checked), list, delete,
//! signed download links and the download itself.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use portico_common::api::ApiError;
use portico_common::auth::now_secs;
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::links::Signer;
use super::{self as backup, Include};
use crate::api::{KindApi, OPS_LEAD, STAFF, SUPER_ADMIN, bad, json_body, not_found};
use crate::queue::Subject;
use crate::staff::auth::{Caller, Staff};

/// The backup routes' state: the shared API and the download-link signer.
pub type BackupApi = KindApi<Signer>;

pub fn router(api: Arc<BackupApi>) -> Router {
    Router::new()
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
        .with_state(api)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackup {
    #[serde(rename = "type")]
    kind: String,
    include: Option<Include>,
}

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
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "task": task, "state": "queued" })),
    ))
}

async fn list_backups(
    State(api): State<Arc<BackupApi>>,
    _who: Caller<Staff>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.customer(&id).await?;
    Ok(Json(json!({ "backups": api.db()?.backups(&id).await? })))
}

pub(crate) fn backup_id(id: &str) -> Result<&str, ApiError> {
    if backup::is_backup_id(id) {
        Ok(id)
    } else {
        Err(bad("invalid_backup_id", "backup ids look like YYYYMMDD-HHMMSS"))
    }
}

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
    let links: Vec<Value> = files
        .iter()
        .map(|f| {
            let sig = api.kind.sign(&id, backup, f, expires);
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
