//! Customer routes: register (super_admin), list, show, and a customer's
//! tasks (list, show, cancel).

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::path::PathBuf;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use portico_common::api::ApiError;
use portico_config::is_hostname;
use serde::Deserialize;
use serde_json::json;

use super::Customer;
use crate::api::{Api, bad, json_body, not_found};
use crate::queue::Subject;
use crate::staff::auth::{Caller, Staff, SuperAdmin};

pub fn router(api: Arc<Api>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<SuperAdmin, _>(routes!(create_customer)))
        .routes(secured::<Staff, _>(routes!(list_customers)))
        .routes(secured::<Staff, _>(routes!(get_customer)))
        .routes(secured::<Staff, _>(routes!(list_tasks)))
        .routes(secured::<Staff, _>(routes!(get_task)))
        .routes(secured::<Staff, _>(routes!(cancel_task)))
        .with_state(api)
}

impl Api {
    pub(crate) async fn customer(&self, id: &str) -> Result<Customer, ApiError> {
        self.db()?
            .customer(id)
            .await?
            .ok_or_else(|| not_found(format!("customer {id}")))
    }
}

/// The registered customers.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Customers {
    customers: Vec<Customer>,
}

/// Tasks, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Tasks {
    pub tasks: Vec<crate::queue::TaskRecord>,
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// A customer to register; its files live under `customers_root/<domain>`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "shop", "domain": "shop.example.com", "process_manager": "pm2"}))]
struct NewCustomer {
    /// 1-63 of `a-z 0-9 -`, not starting with `-`.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    id: String,
    /// The shop's hostname.
    domain: String,
    /// The customer database, e.g. postgres://user:pw@host/db (a secret:
    /// never shown again).
    database_url: Option<String>,
    /// `pm2` (default), `supervisor`, `systemd` or `command`.
    process_manager: Option<String>,
    /// Who may follow the ops conversation (besides the creator).
    #[serde(default)]
    ops_members: Vec<String>,
}

#[utoipa::path(
    post, path = "/api/customers", tag = "customers",
    request_body = NewCustomer,
    responses((status = 201, description = "Registered", body = super::Customer), Errors),
)]
async fn create_customer(
    State(api): State<Arc<Api>>,
    who: Caller<SuperAdmin>,
    body: Result<Json<NewCustomer>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
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
    if !super::PROCESS_MANAGERS.contains(&pm.as_str()) {
        return Err(bad(
            "invalid_process_manager",
            format!(
                "process_manager must be one of {}",
                super::PROCESS_MANAGERS.join(", ")
            ),
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

#[utoipa::path(
    get, path = "/api/customers", tag = "customers",
    responses((status = 200, description = "OK", body = Customers), Errors),
)]
async fn list_customers(
    State(api): State<Arc<Api>>,
    _who: Caller<Staff>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(Customers {
        customers: api.db()?.customers().await?,
    }))
}

#[utoipa::path(
    get, path = "/api/customers/{id}", tag = "customers",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 200, description = "OK", body = super::Customer), Errors),
)]
async fn get_customer(
    State(api): State<Arc<Api>>,
    _who: Caller<Staff>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(api.customer(&id).await?))
}

#[utoipa::path(
    get, path = "/api/customers/{id}/tasks", tag = "customers",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 200, description = "The newest 100 tasks", body = Tasks), Errors),
)]
async fn list_tasks(
    State(api): State<Arc<Api>>,
    _who: Caller<Staff>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(Tasks {
        tasks: api.db()?.tasks(Subject::Customer(&id), 100).await?,
    }))
}

#[utoipa::path(
    get, path = "/api/customers/{id}/tasks/{task}", tag = "customers",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("task", description = "Task id")),
    responses((status = 200, description = "OK", body = crate::queue::TaskRecord), Errors),
)]
async fn get_task(
    State(api): State<Arc<Api>>,
    _who: Caller<Staff>,
    Path((id, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(api.task_of(Subject::Customer(&id), task).await?))
}

#[utoipa::path(
    post, path = "/api/customers/{id}/tasks/{task}/cancel", tag = "customers",
    params(("id", description = "Customer id", pattern = "^[a-z0-9][a-z0-9-]{0,62}$"), ("task", description = "Task id")),
    responses(
        (status = 202, description = "Cancelled: the task stops at its next step"),
        Errors,
    ),
)]
async fn cancel_task(
    State(api): State<Arc<Api>>,
    who: Caller<Staff>,
    Path((id, task)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    api.cancel(&who, Subject::Customer(&id), task).await
}
