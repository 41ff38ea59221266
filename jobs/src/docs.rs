//! The API's description, published: `GET /api/openapi.json` (OpenAPI
//! 3.1, generated from the routes the routers mount and the handlers'
//! types, with the chat shards' API) and `GET /api/docs`, a page that
//! renders it on the server — nothing is fetched by the browser or at
//! build time. Both need no login: the description holds no secret.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use portico_common::api::Errors;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{OpenApi, RefOr, Required};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The published forms of the description, set once it is complete (the
/// two routes are part of what it describes).
pub type Published = Arc<OnceLock<(String, String)>>;

/// The two routes; [`publish`] gives them the finished description.
pub fn router() -> (OpenApiRouter, Published) {
    let published = Published::default();
    let r = OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
        .with_state(published.clone());
    (r, published)
}

/// Renders `doc` for the two routes.
pub fn publish(published: &Published, doc: &OpenApi) {
    let json = doc.to_pretty_json().expect("the description serialises");
    let _ = published.set((json, render(doc).into_string()));
}

/// This description (OpenAPI 3.1), generated from the routes as mounted.
#[utoipa::path(get, path = "/api/openapi.json", tag = "jobs", operation_id = "get_openapi",
    responses((status = 200, description = "The description", body = Object), Errors))]
async fn openapi_json(State(p): State<Published>) -> Response {
    let json = p.get().map(|(j, _)| j.clone()).unwrap_or_default();
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        json,
    )
        .into_response()
}

/// The description as a page (rendered on the server).
#[utoipa::path(get, path = "/api/docs", tag = "jobs", operation_id = "api_docs",
    responses((status = 200, description = "The reference page", body = String, content_type = "text/html"), Errors))]
async fn docs_page(State(p): State<Published>) -> Response {
    let page = p.get().map(|(_, h)| h.clone()).unwrap_or_default();
    let resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response();
    crate::console::secure(resp)
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn operations(doc: &OpenApi) -> Vec<(&str, &'static str, &Operation)> {
    let mut ops = Vec::new();
    for (path, item) in doc.paths.paths.iter() {
        for m in METHODS {
            let op = match m {
                "get" => item.get.as_ref(),
                "post" => item.post.as_ref(),
                "put" => item.put.as_ref(),
                "patch" => item.patch.as_ref(),
                _ => item.delete.as_ref(),
            };
            if let Some(op) = op {
                ops.push((path.as_str(), m, op));
            }
        }
    }
    ops
}

/// The roles an operation's security names (one list per scheme; the
/// schemes take the same roles), or "no login".
fn roles(op: &Operation) -> String {
    let Some(reqs) = &op.security else {
        return "no login".into();
    };
    let v = serde_json::to_value(reqs).unwrap_or_default();
    let mut roles: Vec<String> = Vec::new();
    let mut schemes: Vec<String> = Vec::new();
    for req in v.as_array().into_iter().flatten() {
        for (scheme, rs) in req.as_object().into_iter().flatten() {
            schemes.push(scheme.clone());
            for r in rs.as_array().into_iter().flatten() {
                if let Some(r) = r.as_str()
                    && !roles.iter().any(|x| x == r)
                {
                    roles.push(r.to_string());
                }
            }
        }
    }
    let who = if roles.is_empty() {
        "any user".to_string()
    } else {
        roles.join(", ")
    };
    format!("{who} ({})", schemes.join(" or "))
}

fn is_error(status: &str) -> bool {
    status.starts_with('4') || status.starts_with('5')
}

/// Each error status once, with the description the operations give it.
fn error_legend(ops: &[(&str, &'static str, &Operation)]) -> Vec<(String, String)> {
    let mut legend: Vec<(String, String)> = Vec::new();
    for (_, _, op) in ops {
        for (status, r) in op.responses.responses.iter() {
            if let RefOr::T(r) = r
                && is_error(status)
                && !legend.iter().any(|(s, _)| s == status)
            {
                legend.push((status.clone(), r.description.clone()));
            }
        }
    }
    legend.sort();
    legend
}

fn schema_name(s: &RefOr<utoipa::openapi::schema::Schema>) -> String {
    match s {
        RefOr::Ref(r) => r.ref_location.rsplit('/').next().unwrap_or("").to_string(),
        RefOr::T(t) => serde_json::to_string(t).unwrap_or_default(),
    }
}

fn render(doc: &OpenApi) -> Markup {
    let ops = operations(doc);
    let tags: Vec<(String, String)> = doc
        .tags
        .iter()
        .flatten()
        .map(|t| (t.name.clone(), t.description.clone().unwrap_or_default()))
        .collect();
    let tag_of = |op: &Operation| {
        op.tags
            .as_ref()
            .and_then(|t| t.first().cloned())
            .unwrap_or_default()
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (doc.info.title) " — reference" }
                link rel="stylesheet" href="/console/console.css";
            }
            body {
                main {
                    h1 { (doc.info.title) " " small { (doc.info.version) } }
                    p { (doc.info.description.clone().unwrap_or_default()) }
                    p { "Machine-readable: " a href="/api/openapi.json" { "/api/openapi.json" } " (OpenAPI " (serde_json::to_value(&doc.openapi).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()) ")." }
                    nav { ul { @for (t, _) in &tags { li { a href={ "#tag-" (t) } { (t) } } } li { a href="#schemas" { "schemas" } } } }
                    @for (t, desc) in &tags {
                        section id={ "tag-" (t) } {
                            h2 { (t) }
                            p { (desc) }
                            @for (path, method, op) in ops.iter().filter(|(_, _, op)| &tag_of(op) == t) {
                                article id=(op.operation_id.clone().unwrap_or_default()) {
                                    h3 { code { (method.to_uppercase()) " " (path) } }
                                    @if let Some(s) = &op.summary { p { (s) } }
                                    @if let Some(d) = &op.description { p { (d) } }
                                    p { "Operation " code { (op.operation_id.clone().unwrap_or_default()) } "; who: " (roles(op)) }
                                    @if let Some(ps) = &op.parameters {
                                        table {
                                            thead { tr { th { "parameter" } th { "in" } th { "required" } th { "schema" } th { "description" } } }
                                            tbody {
                                                @for p in ps {
                                                    tr {
                                                        td { code { (p.name) } }
                                                        td { (match p.parameter_in { ParameterIn::Path => "path", ParameterIn::Query => "query", ParameterIn::Header => "header", ParameterIn::Cookie => "cookie" }) }
                                                        td { (if matches!(p.required, Required::True) { "yes" } else { "no" }) }
                                                        td { code { (p.schema.as_ref().map(schema_name).unwrap_or_default()) } }
                                                        td { (p.description.clone().unwrap_or_default()) }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                    @if let Some(b) = &op.request_body {
                                        p { "Body: "
                                            @for (ct, c) in b.content.iter() {
                                                code { (ct) } " " @if let Some(s) = &c.schema { a href={ "#schema-" (schema_name(s)) } { code { (schema_name(s)) } } }
                                            }
                                        }
                                    }
                                    ul {
                                        @for (status, r) in op.responses.responses.iter().filter(|(s, _)| !is_error(s)) {
                                            li {
                                                code { (status) } " "
                                                @match r {
                                                    RefOr::T(r) => {
                                                        (r.description)
                                                        @for (ct, c) in r.content.iter() {
                                                            " — " code { (ct) } " " @if let Some(s) = &c.schema { code { (schema_name(s)) } }
                                                        }
                                                    }
                                                    RefOr::Ref(r) => { (r.ref_location) }
                                                }
                                            }
                                        }
                                        li {
                                            "Errors: "
                                            (op.responses.responses.keys().filter(|s| is_error(s)).cloned().collect::<Vec<_>>().join(", "))
                                            " — " a href="#errors" { "ErrorBody" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    section id="errors" {
                        h2 { "errors" }
                        p { "Every error answers with an " code { "ErrorBody" } " (" code { "{\"error\": code, \"message\": …}" } "). What each status means:" }
                        ul {
                            @for (status, text) in error_legend(&ops) {
                                li { code { (status) } " " (text) }
                            }
                        }
                    }
                    section id="schemas" {
                        h2 { "schemas" }
                        @for (name, s) in doc.components.iter().flat_map(|c| c.schemas.iter()) {
                            article id={ "schema-" (name) } {
                                h3 { code { (name) } }
                                pre { (serde_json::to_string_pretty(s).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    }
}
