//! Who is calling: the one extractor every jobs route uses.
//!
//! `Caller<R>` finds the caller and refuses the request unless its role is
//! one of `R`'s: a bearer JWT (machines, scripts: `Authorization: Bearer`)
//! or a console session (the access cookie, looked up in the database on
//! every request, so a logout or a disabled user takes effect at once).
//! A request that changes something with a session cookie must carry the
//! session's CSRF token in `X-CSRF-Token`; bearer requests need none (a
//! browser never adds that header by itself).

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use portico_common::api::{ApiError, BEARER, SESSION};
use portico_common::auth::{Claims, bearer_token};
use subtle::ConstantTimeEq;
use utoipa::openapi::security::SecurityRequirement;
use utoipa_axum::router::UtoipaMethodRouter;

use super::{Role, token_hash};
use crate::api::{Api, KindApi, OPS_LEAD, SERVICE, STAFF, SUPER_ADMIN, TECHNICIAN};

/// The access cookie (`__Host-`: Secure, whole site, set by this host only).
pub const ACCESS_COOKIE: &str = "__Host-portico_access";
/// The refresh cookie, sent only to `/api/auth`.
pub const REFRESH_COOKIE: &str = "__Secure-portico_refresh";
/// The header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A set of roles a route admits.
pub trait Roles: Send + Sync + 'static {
    const ROLES: &'static [&'static str];
}

/// Any staff member.
pub struct Staff;
/// Super admins and ops leads: approvals, upgrades, the audit log.
pub struct Leads;
/// Super admins only: customers and staff accounts.
pub struct SuperAdmin;
/// Other Portico services (the gateway) and super admins.
pub struct Services;
/// Other Portico services and any staff member (read-only views).
pub struct StaffOrServices;

impl Roles for Staff {
    const ROLES: &'static [&'static str] = STAFF;
}
impl Roles for Leads {
    const ROLES: &'static [&'static str] = &[SUPER_ADMIN, OPS_LEAD];
}
impl Roles for SuperAdmin {
    const ROLES: &'static [&'static str] = &[SUPER_ADMIN];
}
impl Roles for Services {
    const ROLES: &'static [&'static str] = &[SERVICE, SUPER_ADMIN];
}
impl Roles for StaffOrServices {
    const ROLES: &'static [&'static str] = &[SERVICE, SUPER_ADMIN, OPS_LEAD, TECHNICIAN];
}

/// An authenticated caller with one of `R`'s roles. Derefs to its claims
/// (`sub` is the user id; a session's claims carry its one role).
pub struct Caller<R: Roles = Staff> {
    pub claims: Claims,
    /// The console session, when the caller came with a cookie.
    pub session: Option<Session>,
    _roles: PhantomData<R>,
}

/// What the extractor knows of a console session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: i64,
    pub csrf: String,
    pub name: String,
    pub role: Role,
}

impl<R: Roles> std::ops::Deref for Caller<R> {
    type Target = Claims;
    fn deref(&self) -> &Claims {
        &self.claims
    }
}

impl<R: Roles> Caller<R> {
    /// Refuses unless the caller also has one of `roles` (for checks that
    /// depend on configuration).
    pub fn require(&self, roles: &[&str]) -> Result<(), ApiError> {
        check_roles(&self.claims, roles)
    }
}

/// A route state that holds the shared [`Api`].
pub trait HasApi: Send + Sync {
    fn core(&self) -> &Api;
}

impl HasApi for Arc<Api> {
    fn core(&self) -> &Api {
        self
    }
}

impl<S: Send + Sync> HasApi for Arc<KindApi<S>> {
    fn core(&self) -> &Api {
        &self.api
    }
}

pub(crate) fn unauthorized(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, code, msg.into())
}

fn check_roles(claims: &Claims, roles: &[&str]) -> Result<(), ApiError> {
    if roles.iter().any(|r| claims.has_role(r)) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs one of the roles {}", roles.join(", ")),
        ))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The client's address: `X-Real-IP` when the request came through a
/// proxy on this machine (the gateway sets it), else the peer's address.
pub fn client_ip(parts: &Parts) -> String {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let forwarded = parts
        .headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok());
    match (peer, forwarded) {
        (Some(p), Some(f)) if p.is_loopback() => f.to_string(),
        (Some(p), _) => p.to_string(),
        (None, Some(f)) => f.to_string(),
        (None, None) => "unknown".into(),
    }
}

/// Finds the console session of a request's access cookie (no role or
/// CSRF check).
pub async fn session_of(api: &Api, headers: &HeaderMap) -> Result<(Claims, Session), ApiError> {
    let token = cookie(headers, ACCESS_COOKIE)
        .filter(|t| !t.is_empty() && t.len() <= 128)
        .ok_or_else(|| unauthorized("unauthorized", "log in first (no session cookie or bearer token)"))?;
    let s = api.db()?.session(&token_hash(token)).await?.ok_or_else(|| {
        unauthorized(
            "session_expired",
            "the session has ended or expired: log in again",
        )
    })?;
    let claims = Claims {
        sub: s.user.id.clone(),
        roles: vec![s.user.role.as_str().to_string()],
        exp: s.access_expires,
    };
    Ok((
        claims,
        Session {
            id: s.id,
            csrf: s.csrf,
            name: s.user.name,
            role: s.user.role,
        },
    ))
}

impl<S: HasApi, R: Roles> FromRequestParts<S> for Caller<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let api = state.core();
        if let Some(token) = bearer_token(&parts.headers) {
            let claims = api
                .tokens
                .verify(token)
                .map_err(|e| unauthorized("unauthorized", e.to_string()))?;
            check_roles(&claims, R::ROLES)?;
            return Ok(Caller {
                claims,
                session: None,
                _roles: PhantomData,
            });
        }
        let (claims, session) = session_of(api, &parts.headers).await?;
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(sent.ct_eq(session.csrf.as_bytes())) {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    format!(
                        "a console request that changes something needs the session's {CSRF_HEADER} header"
                    ),
                ));
            }
        }
        check_roles(&claims, R::ROLES)?;
        Ok(Caller {
            claims,
            session: Some(session),
            _roles: PhantomData,
        })
    }
}

/// Mounts a route whose handler takes a [`Caller<R>`]: its description
/// lists `R`'s roles as the security requirement (a bearer token with one
/// of them, or a console session of a staff user with one), so the roles
/// described are the roles the extractor admits. The test
/// `openapi::the_description_covers_every_route…` calls every operation
/// with a listed and an unlisted role.
///
/// [`Caller<R>`]: Caller
pub(crate) fn secured<R: Roles, S>(
    (schemas, mut paths, route): UtoipaMethodRouter<S>,
) -> UtoipaMethodRouter<S> {
    let staff: Vec<&str> = R::ROLES.iter().copied().filter(|r| *r != SERVICE).collect();
    let mut reqs = vec![SecurityRequirement::new(BEARER, R::ROLES.iter().copied())];
    if !staff.is_empty() {
        reqs.push(SecurityRequirement::new(SESSION, staff));
    }
    for item in paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            op.security = Some(reqs.clone());
        }
    }
    (schemas, paths, route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1; __Host-portico_access=tok; b=2".parse().unwrap());
        h.append("cookie", "c=3".parse().unwrap());
        assert_eq!(cookie(&h, ACCESS_COOKIE), Some("tok"));
        assert_eq!(cookie(&h, "c"), Some("3"));
        assert_eq!(cookie(&h, "portico_access"), None);
    }
}
