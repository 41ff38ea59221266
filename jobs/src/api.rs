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

use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use portico_common::api::{ApiError, ErrorBody};
use portico_common::auth::{Claims, Tokens};
use portico_config::JobsConfig;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::{OpenApi, ToSchema};

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
            DbError::Invalid(_) => ApiError(StatusCode::BAD_REQUEST, "invalid_value", e.to_string()),
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

/// The core route: the service's identity, on the description's head.
pub fn router(api: Arc<Api>) -> OpenApiRouter {
    OpenApiRouter::with_openapi(JobsApi::openapi())
        .routes(routes!(service))
        .with_state(api)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Portico API",
        description = "The jobs (ops) API: customers, backups, restores, upgrades, apps, mail \
            migrations, staff and the audit log; and the chat API of the chat shards. Errors \
            are JSON `{\"error\": code, \"message\": …}` (ErrorBody). Each operation's \
            security lists the roles that may call it: a bearer token carrying one of them, \
            or a console session of a staff user with one (state-changing requests of a \
            session also send its CSRF token in `X-CSRF-Token`)."
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "jobs", description = "The service"),
        (name = "staff", description = "Console sessions and staff accounts"),
        (name = "customers", description = "Customers and their tasks"),
        (name = "backups", description = "Backups, download links and restores"),
        (name = "upgrades", description = "Releases, blue/green upgrades and rollbacks of a shop"),
        (name = "apps", description = "PaaS apps: Docker deploys behind the gateway"),
        (name = "mail", description = "Mail migrations (IMAP, PST) and the cut-over gate"),
        (name = "audit", description = "Who did what"),
        (name = "edge", description = "The route table the gateways poll"),
        (name = "chat", description = "Conversations, members and history (chat shards)"),
    )
)]
struct JobsApi;

/// The answer of every request that queues a task: follow it at the
/// subject's `tasks/{task}` route, or live on its ops conversation.
#[derive(Serialize, ToSchema)]
pub struct Queued {
    /// The task id.
    pub task: i64,
    /// Always `queued`.
    #[schema(example = "queued")]
    pub state: &'static str,
}

impl Queued {
    pub fn new(task: i64) -> Json<Queued> {
        Json(Queued {
            task,
            state: "queued",
        })
    }
}

/// What the service is.
#[derive(Serialize, ToSchema)]
struct Service {
    #[schema(example = "portico-jobs")]
    service: &'static str,
    /// The API's major version.
    api: u32,
}

/// The service's identity (no authentication).
#[utoipa::path(
    get, path = "/api/jobs", operation_id = "get_service", tag = "jobs",
    responses((status = 200, body = Service), Errors),
)]
async fn service() -> Json<Service> {
    Json(Service {
        service: "portico-jobs",
        api: 1,
    })
}

/// The chat API's description as the chat crate wrote it (checked to be
/// current by its test `openapi_file_is_current`).
const CHAT_OPENAPI: &str = include_str!("../../chat/openapi.json");

/// The published description: the jobs routes `doc` describes (from the
/// routers that mount them), the chat shards' API, the security schemes.
pub fn describe(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let chat: utoipa::openapi::OpenApi =
        serde_json::from_str(CHAT_OPENAPI).expect("chat/openapi.json is an OpenAPI document");
    doc.paths.paths.extend(chat.paths.paths);
    if let (Some(ours), Some(theirs)) = (doc.components.as_mut(), chat.components) {
        for (name, schema) in theirs.schemas {
            ours.schemas.entry(name).or_insert(schema);
        }
    }
    portico_common::api::add_security(&mut doc, true);
    doc
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
