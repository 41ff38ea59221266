//! Upgrade routes: the release catalog, an upgrade plan (what would
//! happen, or why it cannot), queueing an upgrade, a rollback or a serve,
//! approving `.env` changes, and what serves a shop now.
//!
//! An upgrade is refused before anything changes when the target is
//! unknown (404), does not upgrade from the installed version or its
//! engines are not met (409), or an archive does not match its checksum
//! (422): the plan is computed and checked first, then the task queued.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use portico_common::api::ApiError;
use semver::Version;
use serde::Deserialize;
use serde_json::{Value, json};

use super::catalog::SERVICES;
use super::{Mode, Shared, layout};
use crate::api::{KindApi, bad, json_body, not_found};
use crate::customers::Customer;
use crate::queue::Subject;
use crate::staff::auth::{Caller, Leads, Staff};

/// The upgrade routes' state: the shared API and the upgrade config.
pub type UpgradeApi = KindApi<Arc<Shared>>;

pub fn router(api: Arc<UpgradeApi>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Staff, _>(routes!(releases)))
        .routes(secured::<Staff, _>(routes!(plan)))
        .routes(secured::<Leads, _>(routes!(upgrade)))
        .routes(secured::<Leads, _>(routes!(rollback)))
        .routes(secured::<Leads, _>(routes!(serve)))
        .routes(secured::<Staff, _>(routes!(site)))
        .routes(secured::<Leads, _>(routes!(approve)))
        .with_state(api)
}

fn catalog_error(e: super::catalog::CatalogError) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "catalog_invalid", e.to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// An upgrade plan, and the status to refuse it with when it cannot run.
struct Plan {
    body: Value,
    refusal: Option<(StatusCode, &'static str, String)>,
}

async fn engine_version(c: &Customer, engine: &str) -> Result<Version, String> {
    let text = match engine {
        "postgresql" => {
            let url = c.db_url.as_deref().ok_or("the customer has no database")?;
            let client = portico_common::pg::connect(url)
                .await
                .map_err(|e| format!("customer database: {e}"))?;
            let row = client
                .query_one("SHOW server_version", &[])
                .await
                .map_err(|e| format!("customer database: {e}"))?;
            row.get::<_, String>(0)
        }
        _ => {
            let out = tokio::process::Command::new(engine)
                .arg("--version")
                .output()
                .await
                .map_err(|e| format!("`{engine} --version`: {e}"))?;
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    // "16.4 (Debian 16.4-1)", "v20.11.1": the leading numbers.
    let nums: Vec<u64> = text
        .trim()
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .take(3)
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [a] => Ok(Version::new(*a, 0, 0)),
        [a, b] => Ok(Version::new(*a, *b, 0)),
        [a, b, c, ..] => Ok(Version::new(*a, *b, *c)),
        [] => Err(format!("cannot read a version from `{}`", text.trim())),
    }
}

impl UpgradeApi {
    async fn plan(&self, c: &Customer, to: &str) -> Result<Plan, ApiError> {
        let to = Version::parse(to).map_err(|e| {
            bad(
                "invalid_version",
                format!("`{to}` is not a semantic version: {e}"),
            )
        })?;
        let catalog = self.kind.catalog().map_err(catalog_error)?;
        let release = catalog
            .get(&to)
            .cloned()
            .ok_or_else(|| not_found(format!("release {to} (known: {})", known(&catalog))))?;
        let root = std::path::PathBuf::from(&c.root);
        let r2 = root.clone();
        let (installed, old_layout) =
            blocking(move || (layout::installed_version(&r2), layout::is_old_layout(&r2))).await?;
        let mut reasons: Vec<String> = Vec::new();
        let mut refusal = None;
        match &installed {
            None => reasons.push(
                "the installed version is unknown (no current release, no backend/package.json version)"
                    .into(),
            ),
            Some(from) if from == &to => reasons.push(format!("{to} is already installed")),
            Some(from) if !release.accepts(from) => reasons.push(format!(
                "{to} does not upgrade from {from} (upgradable_from: {})",
                release
                    .upgradable_from
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
            _ => {}
        }
        let mut engines = serde_json::Map::new();
        for (name, req) in &release.engines {
            match engine_version(c, name).await {
                Ok(v) if req.matches(&v) => {
                    engines.insert(
                        name.clone(),
                        json!({ "found": v.to_string(), "required": req.to_string(), "ok": true }),
                    );
                }
                Ok(v) => {
                    reasons.push(format!("{name} {v} does not meet {req}"));
                    engines.insert(
                        name.clone(),
                        json!({ "found": v.to_string(), "required": req.to_string(), "ok": false }),
                    );
                }
                Err(e) => {
                    reasons.push(format!("{name}: {e}"));
                    engines.insert(
                        name.clone(),
                        json!({ "error": e, "required": req.to_string(), "ok": false }),
                    );
                }
            }
        }
        if !reasons.is_empty() {
            refusal = Some((StatusCode::CONFLICT, "incompatible", reasons.join("; ")));
        }
        // Checksums, and each service's `.env` change from the archives.
        let rel = release.clone();
        let inst = installed.clone();
        let (sums, env) = blocking(move || {
            let mut bad = Vec::new();
            let mut env = serde_json::Map::new();
            for s in SERVICES {
                let svc = rel.service(s);
                if let Err(e) = layout::verify(&svc.archive, &svc.sha256) {
                    bad.push(e.to_string());
                    continue;
                }
                let example = layout::archive_member(&svc.archive, ".env.example")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let current = inst
                    .as_ref()
                    .and_then(|v| std::fs::read_to_string(layout::service_dir(&root, v, s).join(".env")).ok())
                    .unwrap_or_default();
                env.insert(
                    s.to_string(),
                    serde_json::to_value(layout::env_diff(&current, &example)).unwrap_or_default(),
                );
            }
            (bad, env)
        })
        .await?;
        if !sums.is_empty() && refusal.is_none() {
            refusal = Some((
                StatusCode::UNPROCESSABLE_ENTITY,
                "checksum_mismatch",
                sums.join("; "),
            ));
        }
        reasons.extend(sums);
        let mut steps = vec!["pre-upgrade backup"];
        if old_layout {
            steps.push("move to the release layout (uploads to shared/uploads)");
        }
        steps.extend([
            "unpack",
            "merge .env",
            "install, migrate, build",
            "start green",
            "health checks",
            "switch route and current",
            "drain and checks through the gateway",
            "stop the old release",
        ]);
        if self.kind.cfg.upgrade.require_env_approval {
            steps.insert(3, ".env changes wait for approval");
        }
        Ok(Plan {
            body: json!({
                "customer": c.id,
                "from": installed.map(|v| v.to_string()),
                "to": to.to_string(),
                "compatible": reasons.is_empty(),
                "reasons": reasons,
                "engines": engines,
                "env": env,
                "steps": steps,
            }),
            refusal,
        })
    }

    async fn enqueue(
        &self,
        who: &portico_common::auth::Claims,
        id: &str,
        mode: Mode,
        params: Value,
    ) -> Result<i64, ApiError> {
        let r = self
            .db()?
            .enqueue(
                Subject::Customer(id),
                mode.kind(),
                &params,
                &who.sub,
                self.cfg.max_attempts,
            )
            .await;
        let (result, detail) = match &r {
            Ok(task) => ("queued", json!({ "task": task, "params": params })),
            Err(e) => ("refused", json!({ "error": e.to_string(), "params": params })),
        };
        self.audit(
            who,
            &format!("{}.request", mode.kind()),
            Subject::Customer(id),
            None,
            result,
            detail,
        )
        .await;
        Ok(r?)
    }
}

fn known(c: &super::catalog::Catalog) -> String {
    let v: Vec<String> = c.releases.iter().map(|r| r.version.to_string()).collect();
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

#[utoipa::path(
    get, path = "/api/releases", operation_id = "list_releases", tag = "upgrades",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn releases(
    State(api): State<Arc<UpgradeApi>>,
    _who: Caller<Staff>,
) -> Result<impl IntoResponse, ApiError> {
    let catalog = api.kind.catalog().map_err(catalog_error)?;
    Ok(Json(json!({ "releases": catalog.releases })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PlanQuery {
    to: String,
}

#[utoipa::path(
    get, path = "/api/customers/{id}/upgrade-plan", operation_id = "upgrade_plan", tag = "upgrades",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), PlanQuery),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn plan(
    State(api): State<Arc<UpgradeApi>>,
    _who: Caller<Staff>,
    Path(id): Path<String>,
    query: Result<Query<PlanQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    let c = api.customer(&id).await?;
    Ok(Json(api.plan(&c, &q.to).await?.body))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UpgradeRequest {
    to: String,
    /// Heap for the build (Node's --max-old-space-size), 256-65536 MB.
    #[serde(rename = "heapMB")]
    heap_mb: Option<u64>,
    #[serde(rename = "skipTypeCheck", default)]
    skip_type_check: bool,
}

#[utoipa::path(
    post, path = "/api/customers/{id}/upgrade", operation_id = "start_upgrade", tag = "upgrades",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = UpgradeRequest,
    responses(
        (status = 202, description = "Accepted: follow the task", body = Object),
        Errors,
    ),
)]
async fn upgrade(
    State(api): State<Arc<UpgradeApi>>,
    who: Caller<Leads>,
    Path(id): Path<String>,
    body: Result<Json<UpgradeRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    if req.heap_mb.is_some_and(|m| !(256..=65536).contains(&m)) {
        return Err(bad("invalid_heap", "heapMB must be 256-65536"));
    }
    let c = api.customer(&id).await?;
    let plan = api.plan(&c, &req.to).await?;
    if let Some((status, code, message)) = plan.refusal {
        api.audit(
            &who,
            "upgrade.request",
            Subject::Customer(&id),
            None,
            "refused",
            json!({ "to": req.to, "error": message }),
        )
        .await;
        return Err(ApiError(status, code, message));
    }
    let params =
        json!({ "to": plan.body["to"], "heap_mb": req.heap_mb, "skip_type_check": req.skip_type_check });
    let task = api.enqueue(&who, &id, Mode::Upgrade, params).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "task": task, "state": "queued", "plan": plan.body })),
    ))
}

#[utoipa::path(
    post, path = "/api/customers/{id}/rollback", operation_id = "start_rollback", tag = "upgrades",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 202, description = "Accepted: follow the task", body = Object),
        Errors,
    ),
)]
async fn rollback(
    State(api): State<Arc<UpgradeApi>>,
    who: Caller<Leads>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.customer(&id).await?;
    let site = api.db()?.site(&id).await?;
    let Some(prev) = site.and_then(|s| s.previous_version) else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "no_previous",
            format!("customer {id} has no previous release to roll back to"),
        ));
    };
    let task = api
        .enqueue(&who, &id, Mode::Rollback, json!({ "to": prev }))
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "task": task, "state": "queued", "to": prev })),
    ))
}

#[utoipa::path(
    post, path = "/api/customers/{id}/serve", operation_id = "serve_release", tag = "upgrades",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 202, description = "Accepted: follow the task", body = Object),
        Errors,
    ),
)]
async fn serve(
    State(api): State<Arc<UpgradeApi>>,
    who: Caller<Leads>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let c = api.customer(&id).await?;
    let root = std::path::PathBuf::from(&c.root);
    let Some(v) = blocking(move || layout::installed_version(&root)).await? else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "not_installed",
            format!("customer {id} has no installed release"),
        ));
    };
    let task = api
        .enqueue(&who, &id, Mode::Serve, json!({ "version": v.to_string() }))
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "task": task, "state": "queued", "version": v.to_string() })),
    ))
}

#[utoipa::path(
    get, path = "/api/customers/{id}/site", operation_id = "get_site", tag = "upgrades",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn site(
    State(api): State<Arc<UpgradeApi>>,
    _who: Caller<Staff>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    api.customer(&id).await?;
    let site = api
        .db()?
        .site(&id)
        .await?
        .ok_or_else(|| not_found(format!("customer {id} is not served")))?;
    Ok(Json(site))
}

#[utoipa::path(
    post, path = "/api/customers/{id}/tasks/{task}/approve-env", operation_id = "approve_env", tag = "upgrades",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("task", description = "Task id")),
    responses((status = 204, description = "Done"), Errors),
)]
async fn approve(
    State(api): State<Arc<UpgradeApi>>,
    who: Caller<Leads>,
    Path((id, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    let t = api.task_of(Subject::Customer(&id), task).await?;
    if t.kind != "upgrade" || !matches!(t.state.as_str(), "queued" | "running") {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "not_waiting",
            format!("task {task} is not an active upgrade"),
        ));
    }
    api.db()?.approve(task, &who.sub).await?;
    api.audit(
        &who,
        "upgrade.approve_env",
        Subject::Customer(&id),
        Some(&task.to_string()),
        "ok",
        json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
