//! The apps REST API: create, list, get (with container state, memory
//! and CPU), delete, deploy/redeploy (a queued task), stop, start, logs
//! (tail and follow) and an app's tasks (with cancel). The route table the
//! gateway polls is [`crate::kinds::edge`].
//!
//! Every handler checks the caller, then that Docker answers (503
//! `docker_unreachable` naming the engine address), then the database.
//! Names are DNS labels; repositories and refs are validated
//! ([`super::source`]); nothing from a request reaches a shell.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use portico_common::api::ApiError;
use portico_config::is_http_path;
use serde::Deserialize;
use serde_json::json;

use super::db::App;
use super::source::{Repo, is_git_ref};
use super::{Paas, PaasError};
use crate::api::{KindApi, bad, json_body, not_found};
use crate::queue::Subject;
use crate::staff::auth::{Caller, Leads, Staff};

/// The apps routes' state: the shared API and the Docker side.
pub type PaasApi = KindApi<Arc<Paas>>;

impl From<PaasError> for ApiError {
    fn from(e: PaasError) -> Self {
        match e {
            PaasError::Unreachable { .. } => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "docker_unreachable",
                e.to_string(),
            ),
            PaasError::Db(e) => e.into(),
            e => ApiError(StatusCode::BAD_GATEWAY, "docker", e.to_string()),
        }
    }
}

pub fn router(api: Arc<PaasApi>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Leads, _>(routes!(create)))
        .routes(secured::<Staff, _>(routes!(list)))
        .routes(secured::<Staff, _>(routes!(show)))
        .routes(secured::<Leads, _>(routes!(delete)))
        .routes(secured::<Staff, _>(routes!(deploy)))
        .routes(secured::<Staff, _>(routes!(stop)))
        .routes(secured::<Staff, _>(routes!(start)))
        .routes(secured::<Staff, _>(routes!(logs)))
        .routes(secured::<Staff, _>(routes!(tasks)))
        .routes(secured::<Staff, _>(routes!(task)))
        .routes(secured::<Staff, _>(routes!(cancel)))
        .with_state(api)
}

/// An app name: one DNS label (it becomes `<name>.<paas.domain>`).
pub fn is_app_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The container serving `app`, or 409 when it was never deployed.
fn deployed(app: &App) -> Result<&str, ApiError> {
    app.container.as_deref().ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            "not_deployed",
            format!("app {} is not deployed", app.name),
        )
    })
}

fn name_ok(name: &str) -> Result<(), ApiError> {
    if is_app_name(name) {
        Ok(())
    } else {
        Err(bad(
            "invalid_name",
            "app names are DNS labels: 1-63 of a-z 0-9 - (not starting or ending with -)",
        ))
    }
}

impl PaasApi {
    /// Docker answers (checked before anything else an app call needs).
    async fn docker(&self) -> Result<(), ApiError> {
        self.kind.engine.ping().await.map_err(ApiError::from)
    }

    async fn app(&self, name: &str) -> Result<App, ApiError> {
        name_ok(name)?;
        self.db()?
            .app(name)
            .await?
            .ok_or_else(|| not_found(format!("app {name}")))
    }

    /// For stop and start: Docker reachable, the app deployed and
    /// without an active task; its container.
    async fn idle_deployed(&self, name: &str) -> Result<String, ApiError> {
        self.docker().await?;
        let app = self.app(name).await?;
        self.idle(name).await?;
        Ok(deployed(&app)?.to_string())
    }

    /// 409 while the app has a queued or running task.
    async fn idle(&self, name: &str) -> Result<(), ApiError> {
        match self.db()?.active_task(Subject::App(name)).await? {
            Some(task) => Err(ApiError(
                StatusCode::CONFLICT,
                "app_busy",
                format!("app {name} has an active task {task}"),
            )),
            None => Ok(()),
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewApp {
    /// The app's name and host label: 1-63 of `a-z 0-9 -`, not starting or ending with `-`.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    name: String,
    /// An absolute path or `file://` URL under `paas.local_repos_root`, or
    /// an `https://` URL.
    repo: String,
    /// Branch or tag; default: the repository's default branch.
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    /// The port the app listens on in its container (for a repository's
    /// own Dockerfile that does not EXPOSE exactly one).
    port: Option<u16>,
    /// Health-check path; default `paas.health.path`.
    health_path: Option<String>,
    /// Queue the first deploy at once (default true).
    deploy: Option<bool>,
}

#[utoipa::path(
    post, path = "/api/apps", operation_id = "create_app", tag = "apps",
    request_body = NewApp,
    responses((status = 201, description = "Created", body = Object), Errors),
)]
async fn create(
    State(api): State<Arc<PaasApi>>,
    who: Caller<Leads>,
    body: Result<Json<NewApp>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    name_ok(&req.name)?;
    let repo = Repo::parse(&req.repo, api.kind.cfg.local_repos_root.as_deref())
        .map_err(|e| bad("invalid_repo", e))?;
    if let Some(r) = &req.git_ref
        && !is_git_ref(r)
    {
        return Err(bad("invalid_ref", format!("`{r}` is not a branch or tag name")));
    }
    if req.port == Some(0) {
        return Err(bad("invalid_port", "port must be between 1 and 65535"));
    }
    let health_path = req
        .health_path
        .unwrap_or_else(|| api.kind.cfg.health.path.clone());
    if !is_http_path(&health_path) {
        return Err(bad(
            "invalid_health_path",
            "health_path must be an absolute path of at most 256 printable characters",
        ));
    }
    api.docker().await?;
    let app = App {
        name: req.name.clone(),
        repo: match repo {
            Repo::Local(p) => p.display().to_string(),
            Repo::Https(u) => u,
        },
        git_ref: req.git_ref,
        port: req.port.map(i32::from),
        health_path,
        desired: "running".into(),
        kind: None,
        container: None,
        image: None,
        host_port: None,
        deployed_at: None,
        created_by: who.sub.clone(),
        created_at: String::new(),
    };
    let db = api.db()?;
    let r = db.add_app(&app, api.kind.cfg.max_apps).await;
    api.audit(
        &who,
        "app.create",
        Subject::App(&app.name),
        None,
        if r.is_ok() { "ok" } else { "refused" },
        json!({ "repo": app.repo }),
    )
    .await;
    r?;
    api.events
        .open_channel(Subject::App(&app.name), std::slice::from_ref(&who.sub))
        .await;
    let task = if req.deploy.unwrap_or(true) {
        Some(
            db.enqueue(
                Subject::App(&app.name),
                "deploy",
                &json!({}),
                &who.sub,
                api.cfg.max_attempts,
            )
            .await?,
        )
    } else {
        None
    };
    let app = db
        .app(&app.name)
        .await?
        .ok_or_else(|| not_found("app vanished"))?;
    Ok((StatusCode::CREATED, Json(json!({ "app": app, "task": task }))))
}

#[utoipa::path(
    get, path = "/api/apps", operation_id = "list_apps", tag = "apps",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn list(State(api): State<Arc<PaasApi>>, _who: Caller<Staff>) -> Result<impl IntoResponse, ApiError> {
    api.docker().await?;
    Ok(Json(json!({ "apps": api.db()?.apps().await? })))
}

#[utoipa::path(
    get, path = "/api/apps/{name}", operation_id = "get_app", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn show(
    State(api): State<Arc<PaasApi>>,
    _who: Caller<Staff>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.docker().await?;
    let app = api.app(&name).await?;
    let status = api.kind.status(&app).await?;
    let active = api.db()?.active_task(Subject::App(&name)).await?;
    Ok(Json(json!({
        "app": app,
        "status": status,
        "active_task": active,
        "url": format!("https://{name}.{}/", api.kind.cfg.domain),
        "path": format!("/paas/{name}/"),
    })))
}

#[utoipa::path(
    delete, path = "/api/apps/{name}", operation_id = "delete_app", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 204, description = "Done"), Errors),
)]
async fn delete(
    State(api): State<Arc<PaasApi>>,
    who: Caller<Leads>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.docker().await?;
    api.app(&name).await?;
    api.idle(&name).await?;
    // The route says stopped first (the gateway answers 503, not a
    // connection error), then Docker's containers and images go, and the
    // app's row last: a failure half way leaves the app listed, and
    // DELETE can simply be repeated.
    let db = api.db()?;
    db.set_app_desired(&name, "stopped").await?;
    let removed = api.kind.remove_all(&name).await;
    if removed.is_ok() {
        db.delete_app(&name).await?;
    }
    api.audit(
        &who,
        "app.delete",
        Subject::App(&name),
        None,
        if removed.is_ok() { "ok" } else { "partial" },
        json!({}),
    )
    .await;
    removed?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/api/apps/{name}/deploy", operation_id = "deploy_app", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses(
        (status = 202, description = "Queued: follow the task", body = crate::api::Queued),
        Errors,
    ),
)]
async fn deploy(
    State(api): State<Arc<PaasApi>>,
    who: Caller<Staff>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.docker().await?;
    api.app(&name).await?;
    let r = api
        .db()?
        .enqueue(
            Subject::App(&name),
            "deploy",
            &json!({}),
            &who.sub,
            api.cfg.max_attempts,
        )
        .await;
    api.audit(
        &who,
        "app.deploy",
        Subject::App(&name),
        None,
        if r.is_ok() { "queued" } else { "refused" },
        json!({}),
    )
    .await;
    Ok((StatusCode::ACCEPTED, crate::api::Queued::new(r?)))
}

#[utoipa::path(
    post, path = "/api/apps/{name}/stop", operation_id = "stop_app", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn stop(
    State(api): State<Arc<PaasApi>>,
    who: Caller<Staff>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = api.idle_deployed(&name).await?;
    // The route says stopped first, so the gateway answers 503 instead
    // of trying a container on its way down.
    api.db()?.set_app_desired(&name, "stopped").await?;
    api.kind.engine.stop(&id).await?;
    api.audit(&who, "app.stop", Subject::App(&name), None, "ok", json!({}))
        .await;
    Ok(Json(json!({ "app": name, "state": "stopped" })))
}

#[utoipa::path(
    post, path = "/api/apps/{name}/start", operation_id = "start_app", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn start(
    State(api): State<Arc<PaasApi>>,
    who: Caller<Staff>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = api.idle_deployed(&name).await?;
    api.kind.engine.start(&id).await?;
    // Docker publishes a started container on a fresh port.
    let port = api.kind.engine.inspect(&id).await?.and_then(|i| i.host_port);
    let db = api.db()?;
    db.set_app_port(&name, &id, port).await?;
    db.set_app_desired(&name, "running").await?;
    api.audit(&who, "app.start", Subject::App(&name), None, "ok", json!({}))
        .await;
    Ok(Json(json!({ "app": name, "state": "running" })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    tail: Option<usize>,
    follow: Option<bool>,
}

/// The container's output as text: the last `tail` lines (default 100,
/// at most 10,000), then, with `follow=true`, new lines as they come.
#[utoipa::path(
    get, path = "/api/apps/{name}/logs", operation_id = "app_logs", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), LogQuery),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn logs(
    State(api): State<Arc<PaasApi>>,
    _who: Caller<Staff>,
    Path(name): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    let tail = q.tail.unwrap_or(100);
    if tail > 10_000 {
        return Err(bad("invalid_tail", "tail must be at most 10000"));
    }
    api.docker().await?;
    let app = api.app(&name).await?;
    let id = deployed(&app)?.to_string();
    let stream = api.kind.engine.logs(&id, tail, q.follow.unwrap_or(false)).await?;
    let body = Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other)));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

#[utoipa::path(
    get, path = "/api/apps/{name}/tasks", operation_id = "list_app_tasks", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn tasks(
    State(api): State<Arc<PaasApi>>,
    _who: Caller<Staff>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    name_ok(&name)?;
    Ok(Json(
        json!({ "tasks": api.db()?.tasks(Subject::App(&name), 100).await? }),
    ))
}

#[utoipa::path(
    get, path = "/api/apps/{name}/tasks/{task}", operation_id = "get_app_task", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("task", description = "Task id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn task(
    State(api): State<Arc<PaasApi>>,
    _who: Caller<Staff>,
    Path((name, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    name_ok(&name)?;
    Ok(Json(api.task_of(Subject::App(&name), task).await?))
}

/// Cancels a queued deploy at once, a running one at its next step (its
/// new container and image are removed; the old one keeps serving).
#[utoipa::path(
    post, path = "/api/apps/{name}/tasks/{task}/cancel", operation_id = "cancel_app_task", tag = "apps",
    params(("name", description = "App name", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("task", description = "Task id")),
    responses(
        (status = 202, description = "Cancelled: the task stops at its next step"),
        Errors,
    ),
)]
async fn cancel(
    State(api): State<Arc<PaasApi>>,
    who: Caller<Staff>,
    Path((name, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    name_ok(&name)?;
    api.cancel(&who, Subject::App(&name), task).await
}
