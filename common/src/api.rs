//! The error shape of every Portico REST API: an HTTP status and a JSON
//! body `{"error": code, "message": …}` with a stable code for programs
//! and a sentence for people; and what the OpenAPI descriptions of the
//! APIs share (that body, the error responses, the security schemes).

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, ToSchema};

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.1.into(),
            message: self.2,
            retry_after_ms: None,
        };
        (self.0, Json(body)).into_response()
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code for programs, e.g. `invalid_body`, `not_found`, `customer_busy`.
    #[schema(example = "not_found")]
    pub error: String,
    /// A sentence for people naming what was wrong.
    #[schema(example = "customer acme")]
    pub message: String,
    /// With `rate_limited`: how long to wait before trying again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// The error responses an operation may give besides its own (each has
/// an [`ErrorBody`]). Listed on every operation: a probe of the API meets
/// only documented statuses and bodies.
#[derive(IntoResponses)]
pub enum Errors {
    /// The request is malformed or a value is invalid (`error` names which).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid bearer token or session (or it expired, or was revoked).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The caller's role may not do this, a CSRF token is missing, or a
    /// signed link is invalid.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// What the path names does not exist (or no such route).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The method is not served on this path.
    #[response(status = 405)]
    MethodNotAllowed(ErrorBody),
    /// The request conflicts with the current state (busy, exists, not active).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is larger than the API accepts.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// A precondition of the operation does not hold (e.g. a backup precheck).
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// Too many requests or failed logins: wait (`Retry-After`).
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// A dependency is down (database, Docker, bus): try again later.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// Not enough space for the operation.
    #[response(status = 507)]
    InsufficientStorage(ErrorBody),
}

/// Middleware for an API's routes: an error answer that is not JSON (a
/// path or query the router could not parse, an unknown route, a method
/// not served, a body over the limit) becomes an [`ErrorBody`], so every
/// error of the API has the one documented shape.
/// Only paths under `/api/` are touched (pages and probes keep theirs).
pub async fn json_errors(req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let what = format!("{} {}", req.method(), req.uri().path());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let (error, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", format!("no route for {what}")),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", format!("{what} is not served")),
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "the request body is too large".into()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", text.trim().to_string()),
        s if s.is_client_error() => ("bad_request", text.trim().to_string()),
        _ => ("internal", "internal error".into()),
    };
    let body = serde_json::to_vec(&ErrorBody {
        error: error.into(),
        message,
        retry_after_ms: None,
    })
    .unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The security scheme of bearer tokens (every API): a Portico token
/// (HS256 JWT) whose `roles` claim holds the caller's roles. An
/// operation's requirement lists the roles that may call it.
pub const BEARER: &str = "bearer";
/// The security scheme of console sessions (jobs only).
pub const SESSION: &str = "session";

/// Adds the security schemes an API uses to its description.
pub fn add_security(doc: &mut OpenApi, session: bool) {
    let components = doc.components.get_or_insert_with(Default::default);
    let mut bearer = Http::new(HttpAuthScheme::Bearer);
    bearer.bearer_format = Some("JWT".into());
    bearer.description = Some(
        "A Portico token (HS256, signed with auth.jwt_secret) whose `roles` claim names the \
         caller's roles; each operation lists the roles that may call it."
            .into(),
    );
    components
        .security_schemes
        .insert(BEARER.into(), SecurityScheme::Http(bearer));
    if session {
        components.security_schemes.insert(
            SESSION.into(),
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "__Host-portico_access",
                "A console session (POST /api/auth/login). Requests that change state also \
                 send the session's CSRF token in `X-CSRF-Token`.",
            ))),
        );
    }
}
