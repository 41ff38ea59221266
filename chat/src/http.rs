//! The shard's HTTP surface: the WebSocket handshake at `/ws`, the REST API
//! under `/api/`, the demo page and token endpoint, and the operational
//! endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use portico_common::admin::{self, Readiness};
use portico_common::api::ApiError;
use portico_common::api::{ErrorBody, Errors};
use portico_common::auth::{AuthError, Claims, bearer_token, handshake_token};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::protocol::Message;
use crate::protocol::{self, ConvId, Event, EventKind, MAX_HISTORY_PAGE};
use crate::shard::{Budget, PublishError, Shard};
use crate::store::{ConvSummary, NewMessage, Page, StoreError};

/// The demo conversation every demo user joins.
pub const DEMO_LOBBY: &str = "lobby";
/// Largest REST request body.
const MAX_BODY: usize = 64 * 1024;

pub fn router(shard: Arc<Shard>) -> Router {
    let hub = shard.hub.clone();
    let ready = Readiness::new(move || {
        let hub = hub.clone();
        async move {
            hub.store().ping().await.map_err(|e| e.to_string())?;
            hub.bus().ready().await.map_err(|e| e.to_string())
        }
    });
    let (api, _) = api_router().split_for_parts();
    let mut app = Router::new().route("/ws", get(ws_handshake)).merge(api);
    if shard.cfg.demo {
        app = app
            .route("/", get(|| async { Html(include_str!("demo.html")) }))
            .route(
                "/demo.js",
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "text/javascript")],
                        include_str!("demo.js"),
                    )
                }),
            )
            .route(
                "/demo.css",
                get(|| async { ([(header::CONTENT_TYPE, "text/css")], include_str!("demo.css")) }),
            );
    }
    app.layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shard)
        .merge(admin::router(ready))
        .layer(axum::middleware::from_fn(portico_common::api::json_errors))
}

/// The REST API, each route mounted from the attribute that describes it.
fn api_router() -> OpenApiRouter<Arc<Shard>> {
    OpenApiRouter::with_openapi(ChatApi::openapi())
        .routes(routes!(create_conversation, list_conversations))
        .routes(routes!(list_messages, post_message))
        .routes(routes!(add_member))
        .routes(routes!(remove_member))
        .routes(routes!(demo_token))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Portico chat API",
        description = "Conversations, members and history of the chat shards (the live \
            protocol is the WebSocket at /ws: see ARCHITECTURE.md). Every shard serves the \
            same API; the gateway routes a request to any."
    ),
    components(schemas(ErrorBody)),
    tags((name = "chat", description = "Conversations, members, messages"))
)]
struct ChatApi;

/// The description of the chat REST API (OpenAPI 3.1), from the routes
/// [`router`] mounts.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_router().into_openapi();
    portico_common::api::add_security(&mut doc, false);
    doc
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSuchConversation(_) => ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            StoreError::Exists(_) => ApiError(StatusCode::CONFLICT, "exists", e.to_string()),
            StoreError::NotMember(_) => ApiError(StatusCode::FORBIDDEN, "not_member", e.to_string()),
            StoreError::Full(_) => ApiError(StatusCode::INSUFFICIENT_STORAGE, "full", e.to_string()),
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "storage unavailable".into(),
                )
            }
        }
    }
}

fn unauthorized(e: AuthError) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
}

/// The bearer token of a REST request.
fn bearer(shard: &Shard, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let token = bearer_token(headers).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token".into(),
        )
    })?;
    shard.tokens.verify(token).map_err(unauthorized)
}

/// The WebSocket handshake: origin check, token, connection limit, then 101.
async fn ws_handshake(State(shard): State<Arc<Shard>>, mut req: Request) -> Response {
    let h = req.headers();
    let refuse = |status: StatusCode, why: &str| (status, format!("{why}\n")).into_response();
    let is_upgrade = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return refuse(StatusCode::BAD_REQUEST, "not a WebSocket handshake");
    };
    if !is_upgrade || h.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return refuse(StatusCode::BAD_REQUEST, "not a WebSocket version 13 handshake");
    }
    // Cross-site WebSocket hijacking: a browser always sends Origin.
    if let Some(origin) = h.get(header::ORIGIN) {
        let ok = origin.to_str().is_ok_and(|o| {
            shard
                .cfg
                .allowed_origins
                .iter()
                .any(|a| a.eq_ignore_ascii_case(o))
        });
        if !ok {
            return refuse(StatusCode::FORBIDDEN, "origin not allowed");
        }
    }
    let (token, offered_protocol) = match handshake_token(h, req.uri().query(), protocol::SUBPROTOCOL) {
        Some(t) => t,
        None => return refuse(StatusCode::UNAUTHORIZED, "missing token"),
    };
    let claims = match shard.tokens.verify(&token) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    let Some(guard) = shard.hub.admit() else {
        metrics::counter!("portico_chat_connections_refused_total").increment(1);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shard full");
    };
    if shard.shutdown.is_cancelled() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shard draining");
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    let cfg = ws_config(shard.cfg.max_message_bytes);
    // The socket under the connection (see `socket`): room for a last
    // close frame when the client is evicted as a slow consumer.
    let socket = req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::socket::ConnSocket>>()
        .map(|c| c.0.0.clone());
    let upgrade = async move { on_upgrade.await.map(TokioIo::new) };
    let conn = crate::conn::serve(shard.clone(), upgrade, cfg, socket, claims, guard);
    shard.tracker.spawn(conn);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let rh = resp.headers_mut();
    rh.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    rh.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let accept = derive_accept_key(key.as_bytes());
    rh.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        accept.parse().expect("base64 is a valid header value"),
    );
    if offered_protocol {
        rh.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol::SUBPROTOCOL),
        );
    }
    resp
}

/// Frames sent in one write at most, when that many are ready.
const WRITE_BATCH: usize = 16 * 1024;

/// Small buffers: most of a shard's memory is per-connection buffers. Chat
/// frames are a few hundred bytes; a 1 KiB read buffer took an idle
/// connection from 12.6 to 10.5 KiB (bench `idle`) with dm p99 still < 25 ms.
/// Frames are written into a buffer of up to [`WRITE_BATCH`] and sent when
/// it fills or when the writer has emptied its queue and flushes
/// (`conn.rs`): one syscall for all the frames that are ready.
fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(WRITE_BATCH)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateConversation {
    /// Optional; a random id is chosen when absent. 1-64 of `A-Z a-z 0-9 _ -`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", example = "team-42")]
    id: Option<String>,
    /// Other members (user ids, 1-128 bytes); the caller is always a member.
    #[schema(example = json!(["alice", "bob"]))]
    members: Vec<String>,
}

/// A conversation as created.
#[derive(Serialize, ToSchema)]
struct Conversation {
    #[schema(value_type = String)]
    id: ConvId,
    members: Vec<String>,
}

/// Creates a conversation; the caller (unless a service) is a member.
#[utoipa::path(post, path = "/api/conversations", tag = "chat",
    request_body = CreateConversation,
    responses((status = 201, body = Conversation), Errors),
    security(("bearer" = [])))]
async fn create_conversation(
    State(shard): State<Arc<Shard>>,
    headers: HeaderMap,
    body: Result<Json<CreateConversation>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let claims = bearer(&shard, &headers)?;
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let id = match req.id {
        Some(id) => ConvId::parse(&id).map_err(|c| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_conversation",
                c.message().into(),
            )
        })?,
        None => ConvId::parse(&format!("c-{:016x}", rand::random::<u64>())).expect("generated ids are valid"),
    };
    let mut members = req.members;
    if members.iter().any(|m| !portico_common::auth::is_subject(m)) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_member",
            "member ids are 1-128 bytes without control characters".into(),
        ));
    }
    if !claims.has_role(SERVICE_ROLE) {
        members.push(claims.sub);
    }
    members.sort();
    members.dedup();
    shard.hub.store().create_conversation(&id, &members).await?;
    Ok((StatusCode::CREATED, Json(Conversation { id, members })))
}

/// The role of other Portico services (e.g. jobs publishing progress):
/// they may create conversations and publish without being members.
pub const SERVICE_ROLE: &str = "service";

fn parse_conv(id: &str) -> Result<ConvId, ApiError> {
    ConvId::parse(id).map_err(|c| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_conversation",
            c.message().into(),
        )
    })
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
}

/// Members (and services) may manage a conversation.
async fn require_member(shard: &Shard, conv: &ConvId, claims: &Claims) -> Result<(), ApiError> {
    if claims.has_role(SERVICE_ROLE) || shard.hub.store().is_member(conv, &claims.sub).await? {
        Ok(())
    } else {
        Err(StoreError::NotMember(conv.clone()).into())
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// How many (1-200, default 50).
    limit: Option<u32>,
}

/// The caller's conversations.
#[derive(Serialize, ToSchema)]
struct Conversations {
    conversations: Vec<ConvSummary>,
}

/// The caller's conversations with their last message and unread count.
#[utoipa::path(get, path = "/api/conversations", tag = "chat",
    params(ListQuery),
    responses((status = 200, body = Conversations), Errors),
    security(("bearer" = [])))]
async fn list_conversations(
    State(shard): State<Arc<Shard>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let claims = bearer(&shard, &headers)?;
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let list = shard.hub.store().conversations_of(&claims.sub, limit).await?;
    Ok(Json(Conversations { conversations: list }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    /// The client's idempotency key: the same key again is a duplicate, not a new message.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", example = "m-0001")]
    id: String,
    /// 1 to 4096 bytes.
    #[schema(min_length = 1, example = "hello")]
    body: String,
}

/// A published message's place.
#[derive(Serialize, ToSchema)]
struct Published {
    #[schema(value_type = String)]
    conv: ConvId,
    offset: u64,
    /// The key was published before: nothing new was stored.
    duplicate: bool,
}

/// Publishes over HTTP (services, e.g. jobs progress events, or members).
#[utoipa::path(post, path = "/api/conversations/{id}/messages", tag = "chat",
    params(("id" = String, Path, description = "Conversation id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = PostMessage,
    responses(
        (status = 201, body = Published, description = "Stored and delivered"),
        (status = 200, body = Published, description = "A duplicate of an earlier publish"),
        Errors),
    security(("bearer" = [])))]
async fn post_message(
    State(shard): State<Arc<Shard>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<PostMessage>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let claims = bearer(&shard, &headers)?;
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let conv = parse_conv(&id)?;
    if !protocol::is_id(&req.id) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_message_id",
            "id must be 1-64 of A-Z a-z 0-9 _ -".into(),
        ));
    }
    if !protocol::is_body(&req.body) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "body must be 1 to 4096 bytes, without NUL".into(),
        ));
    }
    let service = claims.has_role(SERVICE_ROLE);
    let msg = NewMessage {
        client_id: req.id,
        from: claims.sub.clone(),
        body: req.body,
        members_only: !service,
    };
    let budget = if service { Budget::Service } else { Budget::User };
    let a = match shard.publish(&conv, msg, budget).await {
        Ok(a) => a,
        Err(PublishError::Store(e)) => return Err(e.into()),
        // The WebSocket path's code and wait, as an HTTP 429.
        Err(PublishError::RateLimited(wait)) => {
            let ms = wait.as_millis() as u64 + 1;
            let body = json!({
                "error": "rate_limited",
                "message": "publishing too fast",
                "retry_after_ms": ms,
            });
            let headers = [(axum::http::header::RETRY_AFTER, ms.div_ceil(1000).to_string())];
            return Ok((StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response());
        }
    };
    let status = if a.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(Published {
            conv,
            offset: a.message.offset,
            duplicate: a.duplicate,
        }),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddMember {
    /// A user id, 1-128 bytes.
    #[schema(example = "carol", min_length = 1, max_length = 128)]
    user: String,
}

/// Adds a member (members and services may).
#[utoipa::path(post, path = "/api/conversations/{id}/members", tag = "chat",
    params(("id" = String, Path, description = "Conversation id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = AddMember,
    responses((status = 204, description = "Added"), Errors),
    security(("bearer" = [])))]
async fn add_member(
    State(shard): State<Arc<Shard>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<AddMember>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let claims = bearer(&shard, &headers)?;
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let conv = parse_conv(&id)?;
    if !portico_common::auth::is_subject(&req.user) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_member",
            "member ids are 1-128 bytes without control characters".into(),
        ));
    }
    require_member(&shard, &conv, &claims).await?;
    shard.hub.store().add_member(&conv, &req.user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a member (a member may remove anyone, or leave); their live
/// subscriptions end with `unsubscribed` (`reason: removed`).
#[utoipa::path(delete, path = "/api/conversations/{id}/members/{user}", tag = "chat",
    params(("id" = String, Path, description = "Conversation id", pattern = "^[A-Za-z0-9_-]{1,64}$"), ("user" = String, Path, description = "User id")),
    responses((status = 204, description = "Removed"), Errors),
    security(("bearer" = [])))]
async fn remove_member(
    State(shard): State<Arc<Shard>>,
    headers: HeaderMap,
    Path((id, user)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let claims = bearer(&shard, &headers)?;
    let conv = parse_conv(&id)?;
    if !portico_common::auth::is_subject(&user) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_member",
            "member ids are 1-128 bytes without control characters".into(),
        ));
    }
    require_member(&shard, &conv, &claims).await?;
    if !shard.hub.store().remove_member(&conv, &user).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{user} is not a member"),
        ));
    }
    let ev = Event {
        conv,
        user,
        event: EventKind::Removed,
    };
    if let Err(e) = shard.hub.bus().publish_event(&ev).await {
        tracing::warn!(error = %e, "removal event not sent; subscriptions end on reconnect");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// Messages before this offset (default: the newest).
    before: Option<u64>,
    /// How many (default 50, at most 100).
    limit: Option<u32>,
}

/// A page of history, newest last.
#[derive(Serialize, ToSchema)]
struct History {
    #[schema(value_type = String)]
    conv: ConvId,
    messages: Vec<Message>,
}

/// A page of a conversation's history (members only).
#[utoipa::path(get, path = "/api/conversations/{id}/messages", tag = "chat",
    params(("id" = String, Path, description = "Conversation id", pattern = "^[A-Za-z0-9_-]{1,64}$"), HistoryQuery),
    responses((status = 200, body = History), Errors),
    security(("bearer" = [])))]
async fn list_messages(
    State(shard): State<Arc<Shard>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let claims = bearer(&shard, &headers)?;
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let conv = ConvId::parse(&id).map_err(|c| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_conversation",
            c.message().into(),
        )
    })?;
    let store = shard.hub.store();
    if !store.is_member(&conv, &claims.sub).await? {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "not_member",
            "not a member of this conversation".into(),
        ));
    }
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE);
    let messages = store
        .page(&conv, Page::Before(q.before.unwrap_or(u64::MAX)), limit)
        .await?;
    Ok(Json(History { conv, messages }))
}

/// Creates the demo lobby (idempotent; several shards may share a store).
pub async fn ensure_demo_lobby(shard: &Shard) {
    let lobby = ConvId::parse(DEMO_LOBBY).expect("valid id");
    match shard.hub.store().create_conversation(&lobby, &[]).await {
        Ok(()) | Err(StoreError::Exists(_)) => {}
        Err(e) => tracing::warn!(error = %e, "cannot create demo lobby"),
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DemoQuery {
    /// 1-32 of `A-Z a-z 0-9 _ -`.
    user: String,
}

/// A demo user's token.
#[derive(Serialize, ToSchema)]
struct DemoToken {
    token: String,
    user: String,
    conv: String,
}

/// Development only (`chat.demo = true`, else 404): a token for any user
/// name, who joins the lobby.
#[utoipa::path(get, path = "/demo/token", tag = "chat",
    params(DemoQuery),
    responses((status = 200, body = DemoToken), Errors))]
async fn demo_token(
    State(shard): State<Arc<Shard>>,
    query: Result<Query<DemoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    if !shard.cfg.demo {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_found",
            "the demo is off".into(),
        ));
    }
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    if !protocol::is_id(&q.user) || q.user.len() > 32 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_user",
            "user must be 1-32 of A-Z a-z 0-9 _ -".into(),
        ));
    }
    let lobby = ConvId::parse(DEMO_LOBBY).expect("valid id");
    shard.hub.store().add_member(&lobby, &q.user).await?;
    let token = shard.tokens.issue(&q.user, &[], Duration::from_secs(12 * 3600));
    Ok(Json(DemoToken {
        token,
        user: q.user,
        conv: DEMO_LOBBY.into(),
    }))
}

#[cfg(test)]
mod tests {
    /// `chat/openapi.json` is what jobs serves of the chat API (jobs does
    /// not link the chat crate): it must be the description the routes
    /// give. `PORTICO_UPDATE_OPENAPI=1 cargo test -p portico-chat openapi`
    /// rewrites it after a change of the API.
    #[test]
    fn openapi_file_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let now = super::openapi().to_pretty_json().expect("serialises") + "\n";
        if std::env::var_os("PORTICO_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &now).expect("write openapi.json");
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == now,
            "chat/openapi.json is not the chat API's description: run \
             PORTICO_UPDATE_OPENAPI=1 cargo test -p portico-chat openapi"
        );
    }
}
