//! Login, refresh, logout and staff management routes.
//!
//! - `POST /api/auth/login` `{account, password}`: sets the access cookie
//!   (15 min) and the refresh cookie (7 days); answers the user and the
//!   session's CSRF token. Throttled per account and per address; every
//!   failure is audited.
//! - `POST /api/auth/refresh`: rotates both tokens; a refresh token used
//!   twice revokes its session.
//! - `POST /api/auth/logout`, `GET /api/auth/me`.
//! - `GET /api/auth/chat-token?customer=…|app=…`: a short chat token for
//!   the live progress of one customer or app (the caller joins its ops
//!   conversation).
//! - `/api/staff/users…` (super admins): list, add, set password,
//!   disable, enable.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use std::time::Duration;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Response};
use portico_common::api::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::auth::{
    ACCESS_COOKIE, Caller, REFRESH_COOKIE, Staff, SuperAdmin, client_ip, cookie, unauthorized,
};
use super::db::Refreshed;
use super::{Role, User};
use crate::api::{Api, bad, json_body, not_found};
use crate::queue::Subject;

/// How long an access token lives.
pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a session lives without a login (each refresh rotates within it).
pub const REFRESH_TTL: Duration = Duration::from_secs(7 * 86400);
/// The window the login throttle counts failures in.
const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures of one account before each further attempt waits.
const FREE_FAILURES: i64 = 5;
/// Failures from one address in the window before it is refused.
const IP_FAILURES: i64 = 20;
/// Password hashes computed at once (each takes 19 MiB and a core for a
/// few tens of ms): a login flood queues instead of taking the machine.
static HASHING: Semaphore = Semaphore::const_new(2);

pub fn router(api: Arc<Api>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(secured::<Staff, _>(routes!(logout)))
        .routes(secured::<Staff, _>(routes!(me)))
        .routes(secured::<Staff, _>(routes!(chat_token)))
        .routes(secured::<SuperAdmin, _>(routes!(list_users)))
        .routes(secured::<SuperAdmin, _>(routes!(add_user)))
        .routes(secured::<SuperAdmin, _>(routes!(set_password)))
        .routes(secured::<SuperAdmin, _>(routes!(disable)))
        .routes(secured::<SuperAdmin, _>(routes!(enable)))
        .with_state(api)
}

/// The two cookies of a session (or, with `None`, ones that clear them);
/// appended, as two `Set-Cookie` headers.
fn session_cookies(tokens: Option<(&str, &str)>) -> AppendHeaders<[(header::HeaderName, HeaderValue); 2]> {
    let (access, refresh, a_age, r_age) = match tokens {
        Some((a, r)) => (a, r, ACCESS_TTL.as_secs(), REFRESH_TTL.as_secs()),
        None => ("", "", 0, 0),
    };
    let c = |v: String| {
        (
            header::SET_COOKIE,
            HeaderValue::from_str(&v).expect("token is URL-safe base64"),
        )
    };
    AppendHeaders([
        c(format!(
            "{ACCESS_COOKIE}={access}; Path=/; Max-Age={a_age}; HttpOnly; Secure; SameSite=Strict"
        )),
        c(format!(
            "{REFRESH_COOKIE}={refresh}; Path=/api/auth; Max-Age={r_age}; HttpOnly; Secure; SameSite=Strict"
        )),
    ])
}

fn user_json(u: &User, csrf: &str) -> Value {
    json!({ "user": u, "csrf": csrf })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    /// User id or e-mail.
    #[schema(min_length = 1)]
    account: String,
    #[schema(min_length = 1)]
    password: String,
}

impl Api {
    async fn audit_staff(&self, actor: &str, action: &str, target: &str, result: &str, detail: Value) {
        if let Ok(db) = self.db()
            && let Err(e) = db
                .audit_row(actor, action, None, Some(target), result, &detail)
                .await
        {
            tracing::error!(error = %e, action, "audit log write failed");
        }
    }
}

#[utoipa::path(
    post, path = "/api/auth/login", tag = "staff",
    request_body = Login,
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn login(State(api): State<Arc<Api>>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let ip = client_ip(&parts);
    let body = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map_err(|_| bad("invalid_body", "the login body is larger than 16 KiB"))?;
    let Login { account, password } = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "invalid_body",
            format!("expected {{\"account\", \"password\"}}: {e}"),
        )
    })?;
    // Accounts are looked up case-insensitively by e-mail: count them so.
    let account: String = account.trim().to_lowercase().chars().take(254).collect();
    if account.is_empty() || password.is_empty() || password.len() > 1024 {
        return Err(bad("invalid_body", "account and password are required"));
    }
    let db = api.db()?;
    let f = db.login_failures(&account, &ip, THROTTLE_WINDOW).await?;
    let wait = if f.ip >= IP_FAILURES {
        Some(THROTTLE_WINDOW.as_secs())
    } else if f.account >= FREE_FAILURES {
        // 30 s after the fifth failure, doubling, at most the window.
        let backoff = (30u64 << (f.account - FREE_FAILURES).min(5) as u32).min(THROTTLE_WINDOW.as_secs());
        (f.account_last_secs < backoff).then(|| backoff - f.account_last_secs)
    } else {
        None
    };
    if let Some(wait) = wait {
        api.audit_staff(
            &account,
            "auth.login",
            &format!("staff:{account}"),
            "throttled",
            json!({ "ip": ip, "failures": f.account, "ip_failures": f.ip, "retry_after": wait }),
        )
        .await;
        let mut resp = ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            format!("too many failed logins: try again in {wait} s"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return Ok(resp);
    }
    let found = db.user_login(&account).await?;
    let ok = {
        let _permit = HASHING.acquire().await.expect("never closed");
        let hash = found.as_ref().map(|(_, h)| h.clone());
        tokio::task::spawn_blocking(move || super::verify_password(&password, hash.as_deref()))
            .await
            .unwrap_or(false)
    };
    let user = match found {
        Some((u, _)) if ok && !u.disabled => u,
        found => {
            db.login_attempt(&account, &ip, false).await?;
            let why = match found {
                Some((u, _)) if ok && u.disabled => "disabled",
                Some(_) => "wrong_password",
                None => "unknown_account",
            };
            api.audit_staff(
                &account,
                "auth.login",
                &format!("staff:{account}"),
                "failed",
                json!({ "ip": ip, "why": why, "failures": f.account + 1 }),
            )
            .await;
            // One answer for all three: the client learns nothing about
            // which accounts exist.
            return Err(unauthorized("login_failed", "wrong account or password"));
        }
    };
    db.login_attempt(&account, &ip, true).await?;
    let (access, refresh, csrf) = (super::new_token(), super::new_token(), super::new_token());
    let session = db
        .open_session(
            &user.id,
            &super::token_hash(&access),
            ACCESS_TTL,
            &csrf,
            &super::token_hash(&refresh),
            REFRESH_TTL,
            &ip,
        )
        .await?;
    api.audit_staff(
        &user.id,
        "auth.login",
        &format!("staff:{}", user.id),
        "ok",
        json!({ "ip": ip, "session": session }),
    )
    .await;
    Ok((
        session_cookies(Some((&access, &refresh))),
        Json(user_json(&user, &csrf)),
    )
        .into_response())
}

#[utoipa::path(
    post, path = "/api/auth/refresh", tag = "staff",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn refresh(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let Some(old) = cookie(&headers, REFRESH_COOKIE).filter(|t| !t.is_empty() && t.len() <= 128) else {
        return Err(unauthorized("unauthorized", "no refresh cookie: log in"));
    };
    let (access, refresh, csrf) = (super::new_token(), super::new_token(), super::new_token());
    let db = api.db()?;
    let r = db
        .refresh(
            &super::token_hash(old),
            &super::token_hash(&access),
            ACCESS_TTL,
            &super::token_hash(&refresh),
            &csrf,
        )
        .await?;
    match r {
        Refreshed::Rotated { user, .. } => Ok((
            session_cookies(Some((&access, &refresh))),
            Json(user_json(&user, &csrf)),
        )
            .into_response()),
        Refreshed::Invalid => Ok((
            session_cookies(None),
            unauthorized("session_expired", "the session has ended: log in again"),
        )
            .into_response()),
        Refreshed::Reused { session, user_id } => {
            api.audit_staff(
                &user_id,
                "auth.refresh_reuse",
                &format!("staff:{user_id}"),
                "revoked",
                json!({ "session": session }),
            )
            .await;
            Ok((
                session_cookies(None),
                unauthorized(
                    "session_revoked",
                    "this refresh token was used before: the session is revoked, log in again",
                ),
            )
                .into_response())
        }
    }
}

#[utoipa::path(
    post, path = "/api/auth/logout", tag = "staff",
    responses(
        (status = 204, description = "Logged out: the session ends and its cookies are cleared"),
        Errors,
    ),
)]
async fn logout(State(api): State<Arc<Api>>, who: Caller<Staff>) -> Result<Response, ApiError> {
    if let Some(s) = &who.session {
        api.db()?.revoke_session(s.id, "logout").await?;
        api.audit_staff(
            &who.sub,
            "auth.logout",
            &format!("staff:{}", who.sub),
            "ok",
            json!({ "session": s.id }),
        )
        .await;
    }
    Ok((StatusCode::NO_CONTENT, session_cookies(None)).into_response())
}

#[utoipa::path(
    get, path = "/api/auth/me", operation_id = "whoami", tag = "staff",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn me(who: Caller<Staff>) -> Json<Value> {
    Json(json!({
        "id": who.sub,
        "roles": who.roles,
        "name": who.session.as_ref().map(|s| s.name.clone()),
        "csrf": who.session.as_ref().map(|s| s.csrf.clone()),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ChatFor {
    customer: Option<String>,
    app: Option<String>,
}

/// How long a console's chat token lives (the page asks again on reconnect).
const CHAT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

#[utoipa::path(
    get, path = "/api/auth/chat-token", tag = "staff",
    params(ChatFor),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn chat_token(
    State(api): State<Arc<Api>>,
    who: Caller<Staff>,
    query: Result<Query<ChatFor>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    let subject = match (&q.customer, &q.app) {
        (Some(c), None) => {
            api.customer(c).await?;
            Subject::Customer(c)
        }
        (None, Some(a)) => {
            api.db()?
                .app(a)
                .await?
                .ok_or_else(|| not_found(format!("app {a}")))?;
            Subject::App(a)
        }
        _ => return Err(bad("invalid_query", "give exactly one of customer, app")),
    };
    if !api.events.enabled() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_chat",
            "live progress needs the chat service: set jobs.chat_url".into(),
        ));
    }
    api.events.add_member(subject, &who.sub).await?;
    Ok(Json(json!({
        "token": api.tokens.issue(&who.sub, &[], CHAT_TOKEN_TTL),
        "conv": crate::queue::progress::channel(subject),
        "expires_in": CHAT_TOKEN_TTL.as_secs(),
    })))
}

#[utoipa::path(
    get, path = "/api/staff/users", tag = "staff",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn list_users(State(api): State<Arc<Api>>, _who: Caller<SuperAdmin>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "users": api.db()?.users().await? })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    id: String,
    email: String,
    name: String,
    role: String,
    /// Generated (and answered once) when absent.
    password: Option<String>,
}

/// Adds a staff account (shared with `portico-jobs user add`); answers
/// the password when it was generated.
pub async fn add_account(
    db: &crate::queue::Db,
    id: &str,
    email: &str,
    name: &str,
    role: &str,
    password: Option<String>,
) -> Result<(User, Option<String>), ApiError> {
    let invalid = |e: super::AccountError| bad("invalid_user", e.to_string());
    super::check_id(id).map_err(invalid)?;
    super::check_email(email).map_err(invalid)?;
    super::check_name(name).map_err(invalid)?;
    let role = Role::parse(role).ok_or_else(|| invalid(super::AccountError::Role))?;
    let (password, generated) = new_password(password, "invalid_user")?;
    let user = User {
        id: id.to_string(),
        email: email.to_lowercase(),
        name: name.to_string(),
        role,
        disabled: false,
    };
    let hash = hashed(&password).await?;
    db.add_user(&user, &hash).await?;
    Ok((user, generated.then_some(password)))
}

/// The password to set: the one given (checked; refused with `code`) or a
/// generated one; and whether it was generated (to be shown once).
pub fn new_password(given: Option<String>, code: &'static str) -> Result<(String, bool), ApiError> {
    let generated = given.is_none();
    let password = given.unwrap_or_else(super::generate_password);
    super::check_password(&password).map_err(|e| bad(code, e.to_string()))?;
    Ok((password, generated))
}

/// A password's Argon2id hash, computed on a blocking thread.
pub async fn hashed(password: &str) -> Result<String, ApiError> {
    let pw = password.to_string();
    tokio::task::spawn_blocking(move || super::hash_password(&pw))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

#[utoipa::path(
    post, path = "/api/staff/users", tag = "staff",
    request_body = NewUser,
    responses((status = 201, description = "Created", body = Object), Errors),
)]
async fn add_user(
    State(api): State<Arc<Api>>,
    who: Caller<SuperAdmin>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    let r = add_account(api.db()?, &req.id, &req.email, &req.name, &req.role, req.password).await;
    api.audit_staff(
        &who.sub,
        "staff.add",
        &format!("staff:{}", req.id),
        if r.is_ok() { "ok" } else { "refused" },
        json!({ "role": req.role }),
    )
    .await;
    let (user, password) = r?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "user": user, "password": password })),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewPassword {
    /// Generated (and answered once) when absent.
    password: Option<String>,
}

#[utoipa::path(
    post, path = "/api/staff/users/{id}/password", tag = "staff",
    params(("id", description = "Staff user id")),
    request_body = NewPassword,
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn set_password(
    State(api): State<Arc<Api>>,
    who: Caller<SuperAdmin>,
    Path(id): Path<String>,
    body: Result<Json<NewPassword>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = json_body(body)?;
    let (password, generated) = new_password(req.password, "invalid_password")?;
    let hash = hashed(&password).await?;
    let r = api.db()?.set_password(&id, &hash).await;
    api.audit_staff(
        &who.sub,
        "staff.password",
        &format!("staff:{id}"),
        if r.is_ok() { "ok" } else { "refused" },
        json!({}),
    )
    .await;
    r?;
    Ok(Json(json!({ "password": generated.then_some(password) })))
}

async fn set_disabled(
    api: &Api,
    who: &Caller<SuperAdmin>,
    id: &str,
    disabled: bool,
) -> Result<StatusCode, ApiError> {
    if disabled && id == who.sub {
        return Err(bad("invalid_user", "you cannot disable yourself"));
    }
    let r = api.db()?.set_disabled(id, disabled).await;
    api.audit_staff(
        &who.sub,
        if disabled { "staff.disable" } else { "staff.enable" },
        &format!("staff:{id}"),
        if r.is_ok() { "ok" } else { "refused" },
        json!({}),
    )
    .await;
    r?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/api/staff/users/{id}/disable", operation_id = "disable_user", tag = "staff",
    params(("id", description = "Staff user id")),
    responses((status = 204, description = "Done: the user's sessions ended"), Errors),
)]
async fn disable(
    State(api): State<Arc<Api>>,
    who: Caller<SuperAdmin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_disabled(&api, &who, &id, true).await
}

#[utoipa::path(
    post, path = "/api/staff/users/{id}/enable", operation_id = "enable_user", tag = "staff",
    params(("id", description = "Staff user id")),
    responses((status = 204, description = "Done: the user's sessions ended"), Errors),
)]
async fn enable(
    State(api): State<Arc<Api>>,
    who: Caller<SuperAdmin>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_disabled(&api, &who, &id, false).await
}
