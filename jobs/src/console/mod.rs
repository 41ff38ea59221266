//! The ops console: the web pages staff use every day, at `/console/`
//! (through the gateway: same origin as the API and the chat WebSocket).
//!
//! Pages are rendered here from the database (maud templates: HTML
//! escaped by construction, checked at compile time, no build step); one
//! small script (`console.js`, no framework, nothing from a CDN) sends the
//! forms to the same JSON API machines use, with the session's CSRF
//! token, and follows a customer's or an app's task events live over the
//! chat WebSocket. A page offers only what the caller's role may do; the
//! API refuses the rest anyway. [`pages`] holds the pages, this module the
//! routes, the layout and the session gate.

mod pages;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, html};
use portico_common::api::ApiError;

use crate::api::KindApi;
use crate::kinds::{paas, upgrade};
use crate::staff::auth::Caller;
use crate::staff::auth::Roles;

/// What the console reads besides the database.
pub struct Parts {
    pub paas: Arc<paas::Paas>,
    pub shops: Arc<upgrade::Shared>,
}

pub type ConsoleApi = KindApi<Parts>;

pub fn router(api: Arc<ConsoleApi>) -> Router {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(pages::customers))
        .route("/console/login", get(pages::login))
        .route("/console/customers/{id}", get(pages::customer))
        .route("/console/apps", get(pages::apps))
        .route("/console/apps/{name}", get(pages::app))
        .route("/console/mail", get(pages::mail_jobs))
        .route("/console/mail/{id}", get(pages::mail_job))
        .route("/console/audit", get(pages::audit))
        .route("/console/users", get(pages::users))
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("console.js")) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("console.css")) }),
        )
        .with_state(api)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The headers every page carries: nothing inline may run, nothing from
/// elsewhere may load, no other site may frame it, nothing is cached.
pub(crate) fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    for (k, v) in [
        (
            "content-security-policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    resp
}

/// A page's caller, or where to send someone who is not one: the login
/// page (no session, or it expired), or a page saying what is missing.
pub(crate) fn gate<R: Roles>(
    who: Result<Caller<R>, ApiError>,
    uri: &Uri,
) -> Result<Caller<R>, Box<Response>> {
    match who {
        Ok(w) => Ok(w),
        Err(ApiError(StatusCode::UNAUTHORIZED, ..)) => {
            let next = uri.path_and_query().map_or("/console/", |p| p.as_str());
            let to = format!("/console/login?next={}", urlencode(next));
            Err(Box::new(Redirect::to(&to).into_response()))
        }
        Err(e) => Err(Box::new(error_page(None::<&Caller<R>>, e))),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error as a page: its status and its message (never a bare 500).
pub(crate) fn error_page<R: Roles>(who: Option<&Caller<R>>, e: ApiError) -> Response {
    let ApiError(status, code, message) = e;
    let body = html! {
        h1 { (status.canonical_reason().unwrap_or("Error")) }
        p role="alert" class="error" { (message) " (" code { (code) } ")" }
        p { a href="/console/" { "Back to customers" } }
    };
    let page = match who {
        Some(w) => layout(w, "Error", "", body),
        None => bare("Error", body),
    };
    secure((status, Html(page.into_string())).into_response())
}

/// A rendered page as a response, with the page headers.
pub(crate) fn respond(m: Markup) -> Response {
    secure(Html(m.into_string()).into_response())
}

/// The navigation, by what each role may see.
const NAV: &[(&str, &str, &[&str])] = &[
    ("customers", "/console/", crate::api::STAFF),
    ("apps", "/console/apps", crate::api::STAFF),
    ("mail", "/console/mail", crate::api::STAFF),
    ("audit", "/console/audit", crate::staff::auth::Leads::ROLES),
    ("users", "/console/users", crate::staff::auth::SuperAdmin::ROLES),
];

/// Whether the caller has one of `roles`.
pub(crate) fn can<R: Roles>(who: &Caller<R>, roles: &[&str]) -> bool {
    roles.iter().any(|r| who.has_role(r))
}

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) " · Portico console" }
        link rel="stylesheet" href="/console/console.css";
        script src="/console/console.js" defer {}
    }
}

/// A page for a logged-in caller: the navigation, who they are, logout,
/// and the session's CSRF token for the script.
pub(crate) fn layout<R: Roles>(who: &Caller<R>, title: &str, active: &str, body: Markup) -> Markup {
    let csrf = who.session.as_ref().map(|s| s.csrf.as_str()).unwrap_or("");
    let name = who.session.as_ref().map(|s| s.name.as_str()).unwrap_or(&who.sub);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                (head(title))
                meta name="csrf-token" content=(csrf);
            }
            body {
                header class="top" {
                    a class="brand" href="/console/" { "Portico" }
                    nav aria-label="Main" {
                        @for (key, href, roles) in NAV {
                            @if can(who, roles) {
                                a href=(href) aria-current=[(*key == active).then_some("page")] { (capitalize(key)) }
                            }
                        }
                    }
                    div class="me" {
                        span { (name) " · " (who.roles.join(", ")) }
                        button type="button" id="logout" { "Log out" }
                    }
                }
                main id="main" {
                    div id="flash" role="status" aria-live="polite" {}
                    (body)
                }
            }
        }
    }
}

/// A page without a session (login, errors before login).
pub(crate) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body class="bare" {
                main id="main" { (body) }
            }
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// Bytes for people: 1.5 MB.
pub(crate) fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n >= 1e9 => format!("{:.1} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// A duration for people: 3 h 5 min, 42 s.
pub(crate) fn human_secs(s: i64) -> String {
    match s.max(0) {
        s if s >= 86400 => format!("{} d {} h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_read_sizes_and_durations() {
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_secs(3 * 3600 + 5 * 60), "3 h 5 min");
        assert_eq!(human_secs(42), "42 s");
        assert_eq!(urlencode("/console/x?a=b&c"), "/console/x%3Fa%3Db%26c");
    }
}
