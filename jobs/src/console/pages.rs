//! The console's pages. Each reads what it shows from the database (and,
//! for apps and releases, from Docker and the release catalog), renders it
//! with the caller's permissions in mind, and leaves actions to forms that
//! `console.js` sends to the JSON API.
//!
//! Forms are marked up for the script (and say `method="post"`, so that
//! one sent before the script runs never puts its fields in a URL):
//! `data-api="METHOD /path"` sends
//! the form as JSON (`name="a.b"` nests, checkboxes are booleans,
//! `data-raw` sends one field's text as the body), `data-confirm` asks
//! first, `data-then` says what follows (`refresh` the listed parts of
//! the page, `go` to a URL, `show` the answer).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::Uri;
use axum::response::Response;
use maud::{Markup, html};
use portico_common::api::ApiError;
use serde::Deserialize;
use serde_json::Value;

use super::{ConsoleApi, bare, can, error_page, gate, human_bytes, human_secs, layout, respond};
use crate::api::not_found;
use crate::audit::AuditQuery;
use crate::queue::Subject;
use crate::staff::auth::Roles;
use crate::staff::auth::{Caller, Leads, Staff, SuperAdmin};

type Who = Result<Caller<Staff>, ApiError>;

/// Renders `body` inside the layout, or the error as a page.
fn page<R: Roles>(who: &Caller<R>, title: &str, active: &str, body: Result<Markup, ApiError>) -> Response {
    match body {
        Ok(b) => respond(layout(who, title, active, b)),
        Err(e) => error_page(Some(who), e),
    }
}

macro_rules! caller {
    ($who:expr, $uri:expr) => {
        match gate($who, &$uri) {
            Ok(w) => w,
            Err(r) => return *r,
        }
    };
}

#[derive(Deserialize)]
pub struct Next {
    next: Option<String>,
}

pub async fn login(Query(q): Query<Next>) -> Response {
    // Only a path of ours: never an open redirect.
    let next = q
        .next
        .filter(|n| n.starts_with("/console/") && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or_else(|| "/console/".into());
    respond(bare(
        "Log in",
        html! {
            div class="login" {
                h1 { "Portico console" }
                // POST, and no button until the script has taken the form
                // over: a password never lands in a URL.
                form id="login" method="post" data-next=(next) {
                    label for="account" { "User or e-mail" }
                    input id="account" name="account" autocomplete="username" required autofocus;
                    label for="password" { "Password" }
                    input id="password" name="password" type="password" autocomplete="current-password" required;
                    button type="submit" disabled { "Log in" }
                    p class="error" role="alert" id="login-error" {}
                }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct Search {
    q: Option<String>,
}

/// One row of the customer list.
struct CustomerRow {
    id: String,
    domain: String,
    last_backup: Option<String>,
    backup_age: Option<i64>,
    release: Option<String>,
    running: Option<String>,
}

pub async fn customers(
    State(api): State<Arc<ConsoleApi>>,
    who: Who,
    uri: Uri,
    Query(s): Query<Search>,
) -> Response {
    let who = caller!(who, uri);
    let q = s.q.unwrap_or_default();
    let body = async {
        let rows = customer_rows(&api, q.trim()).await?;
        Ok(html! {
            h1 { "Customers" }
            form method="get" class="search" role="search" {
                label for="q" { "Search customers" }
                input id="q" name="q" type="search" value=(q) placeholder="id or domain";
                button type="submit" { "Search" }
            }
            @if rows.is_empty() {
                p class="empty" { @if q.is_empty() { "No customers yet. They are registered through the API (POST /api/customers)." } @else { "No customer matches “" (q) "”." } }
            } @else {
                table {
                    thead { tr { th { "Customer" } th { "Domain" } th { "Last backup" } th { "Age" } th { "Release" } th { "Running task" } } }
                    tbody {
                        @for r in &rows {
                            tr {
                                td { a href={ "/console/customers/" (r.id) } { (r.id) } }
                                td { (r.domain) }
                                td { (r.last_backup.as_deref().unwrap_or("never")) }
                                td class=[r.backup_age.filter(|a| *a > 26 * 3600).map(|_| "stale")] { (r.backup_age.map(human_secs).unwrap_or_else(|| "—".into())) }
                                td { (r.release.as_deref().unwrap_or("—")) }
                                td { (r.running.as_deref().unwrap_or("—")) }
                            }
                        }
                    }
                }
            }
        })
    }
    .await;
    page(&who, "Customers", "customers", body)
}

/// Escapes `%`, `_` and `\` for a LIKE pattern.
fn like(s: &str) -> String {
    let mut out = String::from("%");
    for c in s.chars().take(100) {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

async fn customer_rows(api: &ConsoleApi, q: &str) -> Result<Vec<CustomerRow>, ApiError> {
    let rows = api
        .db()?
        .read(
            "SELECT c.id, c.domain,
                    to_char(b.at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'),
                    extract(epoch FROM now() - b.at)::bigint,
                    s.version,
                    (SELECT kind || ' #' || id || ' (' || state || ')' FROM tasks
                     WHERE customer_id = c.id AND state IN ('queued', 'running') LIMIT 1)
             FROM customers c
             LEFT JOIN LATERAL (SELECT max(created_at) AS at FROM backups WHERE customer_id = c.id) b ON true
             LEFT JOIN shop_sites s ON s.customer_id = c.id
             WHERE $1 = '' OR c.id ILIKE $2 OR c.domain ILIKE $2
             ORDER BY c.id LIMIT 500",
            &[&q, &like(q)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| CustomerRow {
            id: r.get(0),
            domain: r.get(1),
            last_backup: r.get(2),
            backup_age: r.get(3),
            release: r.get(4),
            running: r.get(5),
        })
        .collect())
}

#[derive(Deserialize)]
pub struct Tab {
    tab: Option<String>,
}

pub async fn customer(
    State(api): State<Arc<ConsoleApi>>,
    who: Who,
    uri: Uri,
    Path(id): Path<String>,
    Query(t): Query<Tab>,
) -> Response {
    let who = caller!(who, uri);
    let tab = t.tab.unwrap_or_else(|| "backups".into());
    let body = async {
        let c = api.customer(&id).await?;
        let db = api.db()?;
        let tasks = db.tasks(Subject::Customer(&id), 100).await?;
        let inner = match tab.as_str() {
            "backups" => backups_tab(&api, &who, &id, &tasks).await?,
            "upgrades" => upgrades_tab(&api, &who, &id).await?,
            "tasks" => tasks_tab(&id, &tasks),
            other => return Err(not_found(format!("tab {other}"))),
        };
        Ok(html! {
            h1 { (c.id) " " small { (c.domain) } }
            p class="meta" { "Root " code { (c.root) } " · process manager " (c.process_manager) " · database " (if c.has_database { "yes" } else { "none" }) }
            nav class="tabs" aria-label="Customer" {
                @for (key, label) in [("backups", "Backups"), ("upgrades", "Upgrades"), ("tasks", "Tasks")] {
                    a href={ "?tab=" (key) } aria-current=[(key == tab).then_some("page")] { (label) }
                }
            }
            section id="live" data-customer=(id) hidden {
                h2 { "Task: " span id="live-kind" {} }
                progress id="live-bar" max="100" value="0" aria-label="Task progress" {}
                p { span id="live-step" {} " · " span id="live-bytes" {} " · ETA " span id="live-eta" { "—" } }
                p id="live-result" role="status" {}
            }
            (inner)
        })
    }
    .await;
    page(&who, &id, "customers", body)
}

async fn backups_tab(
    api: &ConsoleApi,
    who: &Caller<Staff>,
    id: &str,
    tasks: &[crate::queue::TaskRecord],
) -> Result<Markup, ApiError> {
    let backups = api.db()?.backups(id).await?;
    let by_task: HashMap<i64, &crate::kinds::backup::db::BackupRow> =
        backups.iter().map(|b| (b.task, b)).collect();
    let may_delete = api.cfg.technician_can_delete || can(who, Leads::ROLES);
    let history: Vec<_> = tasks.iter().filter(|t| t.kind == "backup").collect();
    Ok(html! {
        section {
            h2 { "New backup" }
            form class="backup" data-api={ "POST /api/customers/" (id) "/backups" } data-then="live" {
                fieldset {
                    legend { "Type" }
                    label { input type="radio" name="type" value="fast" checked; " Fast (database, uploads, .env + PM2)" }
                    label { input type="radio" name="type" value="custom"; " Custom" }
                }
                fieldset class="custom" {
                    legend { "Custom backup includes" }
                    label { input type="checkbox" name="include.db" checked; " Database" }
                    label { input type="checkbox" name="include.uploads" checked; " Uploads" }
                    label { input type="checkbox" name="include.env_pm2" checked; " .env and PM2 files" }
                    label { input type="checkbox" name="include.logs"; " Logs" }
                    label { input type="checkbox" name="include.artifacts"; " Build artifacts" }
                }
                button type="submit" { "Start backup" }
            }
        }
        section id="history" {
            h2 { "History" }
            @if history.is_empty() {
                p class="empty" { "No backups yet." }
            } @else {
                table {
                    thead { tr { th { "Date" } th { "Type" } th { "Size" } th { "Duration" } th { "Result" } th { "Who" } th { "Actions" } } }
                    tbody {
                        @for t in &history {
                            @let b = by_task.get(&t.id);
                            tr data-task=(t.id) {
                                td { (t.created_at) }
                                td { (t.params["type"].as_str().unwrap_or("?")) }
                                td { (b.map(|b| human_bytes(b.size_bytes)).unwrap_or_else(|| "—".into())) }
                                td { (b.map(|b| human_secs((b.duration_ms + 500) / 1000)).unwrap_or_else(|| "—".into())) }
                                td class={ "state " (t.state) } title=[t.error.as_deref()] { (t.state) }
                                td { (t.created_by) }
                                td class="actions" {
                                    @if let Some(b) = b {
                                        button type="button" class="download" data-links={ "/api/customers/" (id) "/backups/" (b.id) "/links" } { "Download" }
                                        @if may_delete {
                                            form method="post" data-api={ "DELETE /api/customers/" (id) "/backups/" (b.id) } data-confirm={ "Delete backup " (b.id) "? This cannot be undone." } data-then="refresh history" {
                                                button type="submit" class="danger" { "Delete" }
                                            }
                                        }
                                        ul class="links" {}
                                    }
                                    @if matches!(t.state.as_str(), "queued" | "running") {
                                        form method="post" data-api={ "POST /api/customers/" (id) "/tasks/" (t.id) "/cancel" } data-confirm="Cancel this backup?" data-then="refresh history" {
                                            button type="submit" { "Cancel" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

async fn upgrades_tab(api: &ConsoleApi, who: &Caller<Staff>, id: &str) -> Result<Markup, ApiError> {
    let site = api.db()?.site(id).await?;
    let catalog = api.kind.shops.catalog();
    let may = can(who, Leads::ROLES);
    Ok(html! {
        section {
            h2 { "Current release" }
            @match &site {
                Some(s) => {
                    p { "Serving " strong { (s.version) } @if let Some(p) = &s.previous_version { " (rollback goes to " (p) ")" } }
                    table {
                        thead { tr { th { "Service" } th { "Instance" } th { "Port" } } }
                        tbody { @for (svc, i) in &s.instances { tr { td { (svc) } td { (i.name) } td { (i.port) } } } }
                    }
                    @if may && s.previous_version.is_some() {
                        form method="post" data-api={ "POST /api/customers/" (id) "/rollback" } data-confirm="Roll back to the previous release?" data-then="live" {
                            button type="submit" class="danger" { "Roll back" }
                        }
                    }
                }
                None => p class="empty" { "No release is served by Portico for this customer yet." }
            }
        }
        section {
            h2 { "Upgrade" }
            @match &catalog {
                Err(e) => p class="error" role="alert" { "The release catalog cannot be read: " (e) }
                Ok(c) if c.releases.is_empty() => p class="empty" { "The release catalog is empty (jobs.upgrade.releases)." }
                Ok(c) => {
                    form id="plan" data-plan={ "/api/customers/" (id) "/upgrade-plan" } {
                        label for="to" { "Target release" }
                        select id="to" name="to" {
                            @for r in c.releases.iter().rev() { option value=(r.version) { (r.version) } }
                        }
                        button type="submit" { "Show the plan" }
                    }
                    div id="plan-out" {}
                    @if may {
                        form method="post" data-api={ "POST /api/customers/" (id) "/upgrade" } data-from="to" data-confirm="Start the upgrade?" data-then="live" {
                            button type="submit" { "Start upgrade" }
                        }
                    } @else {
                        p class="note" { "Upgrades are started by an ops lead or a super admin." }
                    }
                }
            }
        }
    })
}

fn tasks_tab(id: &str, tasks: &[crate::queue::TaskRecord]) -> Markup {
    html! {
        section id="tasks" {
            h2 { "Tasks" }
            @if tasks.is_empty() { p class="empty" { "No tasks yet." } } @else {
                table {
                    thead { tr { th { "#" } th { "Kind" } th { "State" } th { "Created" } th { "Finished" } th { "Who" } th { "Error" } th {} } }
                    tbody {
                        @for t in tasks {
                            tr {
                                td { (t.id) } td { (t.kind) } td class={ "state " (t.state) } { (t.state) }
                                td { (t.created_at) } td { (t.finished_at.as_deref().unwrap_or("—")) } td { (t.created_by) }
                                td { (t.error.as_deref().unwrap_or("")) }
                                td {
                                    @if matches!(t.state.as_str(), "queued" | "running") {
                                        form method="post" data-api={ "POST /api/customers/" (id) "/tasks/" (t.id) "/cancel" } data-confirm="Cancel this task?" data-then="refresh tasks" {
                                            button type="submit" { "Cancel" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub async fn apps(State(api): State<Arc<ConsoleApi>>, who: Who, uri: Uri) -> Response {
    let who = caller!(who, uri);
    let body = async {
        let apps = api.db()?.apps().await?;
        let mut states = Vec::with_capacity(apps.len());
        for a in &apps {
            states.push(api.kind.paas.status(a).await.ok());
        }
        Ok(html! {
            h1 { "Apps" }
            @if can(&who, Leads::ROLES) {
                section {
                    h2 { "New app" }
                    form method="post" data-api="POST /api/apps" data-then="refresh apps" class="inline" {
                        label { "Name " input name="name" required pattern="[a-z0-9][a-z0-9-]{0,30}" title="a-z, 0-9 and -, up to 31"; }
                        label { "Repository " input name="repo" required placeholder="/srv/repos/blog or file:///srv/repos/blog"; }
                        label { "Git ref " input name="ref" placeholder="main"; }
                        label { input type="checkbox" name="deploy" checked; " Deploy now" }
                        button type="submit" { "Create" }
                    }
                }
            }
            section id="apps" {
                @if apps.is_empty() { p class="empty" { "No apps yet." } } @else {
                    table {
                        thead { tr { th { "App" } th { "State" } th { "Memory" } th { "CPU" } th { "Deployed" } th { "Repository" } } }
                        tbody {
                            @for (a, s) in apps.iter().zip(&states) {
                                tr {
                                    td { a href={ "/console/apps/" (a.name) } { (a.name) } }
                                    td { (s.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("unknown")) }
                                    td { (stat(s, "memory_bytes").map(|m| human_bytes(m as i64)).unwrap_or_else(|| "—".into())) }
                                    td { (stat(s, "cpu_percent").map(|c| format!("{c:.1} %")).unwrap_or_else(|| "—".into())) }
                                    td { (a.deployed_at.as_deref().unwrap_or("never")) }
                                    td { code { (a.repo) } }
                                }
                            }
                        }
                    }
                }
            }
        })
    }
    .await;
    page(&who, "Apps", "apps", body)
}

fn stat(s: &Option<Value>, key: &str) -> Option<f64> {
    s.as_ref()?.get("stats")?.get(key)?.as_f64()
}

pub async fn app(
    State(api): State<Arc<ConsoleApi>>,
    who: Who,
    uri: Uri,
    Path(name): Path<String>,
) -> Response {
    let who = caller!(who, uri);
    let body = async {
        let a = api
            .db()?
            .app(&name)
            .await?
            .ok_or_else(|| not_found(format!("app {name}")))?;
        let status = api.kind.paas.status(&a).await.ok();
        let tasks = api.db()?.tasks(Subject::App(&name), 20).await?;
        let state = status.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("unknown").to_string();
        let base = format!("/api/apps/{name}");
        Ok(html! {
            h1 { (a.name) " " small { (state) } }
            p class="meta" { "Repository " code { (a.repo) } @if let Some(r) = &a.git_ref { " · ref " code { (r) } } " · https://" (a.name) "." (api.kind.paas.cfg.domain) "/" }
            p { "Memory " (stat(&status, "memory_bytes").map(|m| human_bytes(m as i64)).unwrap_or_else(|| "—".into()))
                " · CPU " (stat(&status, "cpu_percent").map(|c| format!("{c:.1} %")).unwrap_or_else(|| "—".into())) }
            div class="buttons" {
                form method="post" data-api={ "POST " (base) "/deploy" } data-then="live" { button type="submit" { "Deploy" } }
                form method="post" data-api={ "POST " (base) "/stop" } data-then="refresh main" { button type="submit" { "Stop" } }
                form method="post" data-api={ "POST " (base) "/start" } data-then="refresh main" { button type="submit" { "Start" } }
                @if can(&who, Leads::ROLES) {
                    form method="post" data-api={ "DELETE " (base) } data-confirm={ "Delete app " (name) " and its containers?" } data-then="go /console/apps" {
                        button type="submit" class="danger" { "Delete" }
                    }
                }
            }
            section id="live" data-app=(name) hidden {
                h2 { "Task: " span id="live-kind" {} }
                progress id="live-bar" max="100" value="0" aria-label="Task progress" {}
                p { span id="live-step" {} " · " span id="live-bytes" {} " · ETA " span id="live-eta" { "—" } }
                pre id="live-log" {}
                p id="live-result" role="status" {}
            }
            section {
                h2 { "Logs" }
                button type="button" id="logs-load" data-logs={ (base) "/logs?tail=200" } { "Show the latest logs" }
                pre id="logs" tabindex="0" aria-label="Container logs" {}
            }
            section id="tasks" {
                h2 { "Deploys and tasks" }
                table {
                    thead { tr { th { "#" } th { "Kind" } th { "State" } th { "Created" } th { "Who" } th { "Error" } } }
                    tbody { @for t in &tasks { tr { td { (t.id) } td { (t.kind) } td class={ "state " (t.state) } { (t.state) } td { (t.created_at) } td { (t.created_by) } td { (t.error.as_deref().unwrap_or("")) } } } }
                }
            }
        })
    }
    .await;
    page(&who, &name, "apps", body)
}

/// The gate as a badge: its words and its colour class.
fn gate_badge(gate: &str) -> Markup {
    let label = match gate {
        "blocked" => "Blocked",
        "warning" => "Warning",
        "ready_for_dns" => "Ready for DNS",
        "dns_applied" => "DNS applied",
        other => other,
    };
    html! { span class={ "badge gate-" (gate) } data-gate=(gate) { (label) } }
}

pub async fn mail_jobs(State(api): State<Arc<ConsoleApi>>, who: Who, uri: Uri) -> Response {
    let who = caller!(who, uri);
    let body = async {
        let jobs = api.db()?.mail_jobs().await?;
        Ok(html! {
            h1 { "Mail migrations" }
            @if jobs.is_empty() { p class="empty" { "No migration jobs yet. They are created through the API (POST /api/migration/jobs)." } } @else {
                table {
                    thead { tr { th { "Job" } th { "Customer" } th { "Domain" } th { "Source" } th { "Verified" } th { "Gate" } } }
                    tbody {
                        @for j in &jobs {
                            tr {
                                td { a href={ "/console/mail/" (j.id) } { "#" (j.id) } }
                                td { (j.customer) } td { (j.domain) } td { (j.source_type) }
                                td { (j.verified) " / " (j.expected) }
                                td { (gate_badge(&j.gate)) }
                            }
                        }
                    }
                }
            }
        })
    }
    .await;
    page(&who, "Mail migrations", "mail", body)
}

pub async fn mail_job(
    State(api): State<Arc<ConsoleApi>>,
    who: Who,
    uri: Uri,
    Path(id): Path<i64>,
) -> Response {
    let who = caller!(who, uri);
    let body = async {
        let db = api.db()?;
        let j = db
            .mail_job(id)
            .await?
            .ok_or_else(|| not_found(format!("migration job {id}")))?;
        let mailboxes = db.mailboxes(id).await?;
        let mut folders = Vec::with_capacity(mailboxes.len());
        for m in &mailboxes {
            folders.push(db.folder_states(m.id).await?);
        }
        let runs = db.mail_runs(id).await?;
        let base = format!("/api/migration/jobs/{id}");
        Ok(html! {
            h1 { "Migration #" (j.id) " " small { (j.domain) } }
            p id="gate" { "Gate: " (gate_badge(&j.gate)) " · verified " (j.verified) " of " (j.expected)
                @if let Some(r) = &j.gate_reason { " · " (r) } @if let Some(b) = &j.gate_by { " (" (b) ")" } }
            div class="buttons" {
                form method="post" data-api={ "POST " (base) "/preflight" } data-then="show" { button type="submit" { "Preflight" } }
                form method="post" data-api={ "POST " (base) "/sync" } data-then="live" { button type="submit" { "Sync now" } }
                a href={ (base) "/report.csv" } { "Report (CSV)" }
                a href={ (base) "/report.html" } { "Report (HTML)" }
            }
            @if can(&who, Leads::ROLES) {
                div class="buttons" {
                    @if j.gate == "warning" {
                        form method="post" data-api={ "POST " (base) "/approve-gate" } data-confirm="Approve the DNS switch with this verified ratio?" data-then="refresh gate" { button type="submit" { "Approve" } }
                    }
                    @if j.gate != "dns_applied" {
                        form method="post" data-api={ "POST " (base) "/override-gate" } data-confirm="Override the gate?" data-then="refresh gate" class="inline" {
                            label { "Reason " input name="reason" required minlength="3" maxlength="1000"; }
                            button type="submit" class="danger" { "Override" }
                        }
                    }
                }
            }
            section id="live" data-customer=(j.customer) hidden {
                h2 { "Task: " span id="live-kind" {} }
                progress id="live-bar" max="100" value="0" aria-label="Task progress" {}
                p { span id="live-step" {} " · " span id="live-bytes" {} " · ETA " span id="live-eta" { "—" } }
                p id="live-result" role="status" {}
            }
            pre id="answer" hidden {}
            section id="mailboxes" {
                h2 { "Mailboxes" }
                @if mailboxes.is_empty() { p class="empty" { "No mailboxes yet: import them below." } } @else {
                    table {
                        thead { tr { th { "Source" } th { "Destination" } th { "Folder" } th { "In source" } th { "In destination" } th { "Verified" } } }
                        tbody {
                            @for (m, fs) in mailboxes.iter().zip(&folders) {
                                @if fs.is_empty() {
                                    tr { td { (m.source_login) } td { (m.dest_login) } td colspan="4" class="empty" { "not synced yet" } }
                                }
                                @for f in fs {
                                    tr class=[(f.verified < f.source_count).then_some("short")] {
                                        td { (m.source_login) } td { (m.dest_login) }
                                        td { (f.source_folder) @if f.source_folder != f.dest_folder { " → " (f.dest_folder) } }
                                        td { (f.source_count) } td { (f.dest_count) } td { (f.verified) }
                                    }
                                }
                            }
                        }
                    }
                }
                form method="post" data-api={ "POST " (base) "/mailboxes/import" } data-raw="csv" data-then="refresh mailboxes" {
                    label for="csv" { "Import mailboxes (CSV: source_login,source_password,dest_login,dest_password)" }
                    textarea id="csv" name="csv" rows="4" required {}
                    button type="submit" { "Import" }
                }
            }
            section {
                h2 { "Runs" }
                @if runs.is_empty() { p class="empty" { "No runs yet." } } @else {
                    table {
                        thead { tr { th { "Run" } th { "Started" } th { "Kind" } th { "State" } th { "Copied" } th { "Errors" } th { "Duration" } } }
                        tbody {
                            @for r in &runs {
                                tr { td { (r["id"]) } td { (r["started_at"].as_str().unwrap_or("")) } td { (r["kind"].as_str().unwrap_or("")) }
                                     td { (r["state"].as_str().unwrap_or("")) } td { (r["copied"]) } td { (r["errors"]) }
                                     td { (r["duration_ms"].as_i64().map(|ms| human_secs((ms + 500) / 1000)).unwrap_or_else(|| "—".into())) } }
                            }
                        }
                    }
                }
            }
        })
    }
    .await;
    page(&who, &format!("Migration #{id}"), "mail", body)
}

pub async fn audit(
    State(api): State<Arc<ConsoleApi>>,
    who: Result<Caller<Leads>, ApiError>,
    uri: Uri,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let who = caller!(who, uri);
    let body = async {
        let Query(q) = query.map_err(|e| crate::api::bad("invalid_query", e.body_text()))?;
        let entries = api.db()?.audit_log(&q.filter()?).await?;
        let v = |o: &Option<String>| o.clone().unwrap_or_default();
        Ok(html! {
            h1 { "Audit log" }
            form method="get" class="filters" {
                label { "Who " input name="actor" value=(v(&q.actor)); }
                label { "Customer " input name="customer" value=(v(&q.customer)); }
                label { "Action " input name="action" value=(v(&q.action)) placeholder="backup or backup.create"; }
                label { "From " input name="since" type="date" value=(v(&q.since)); }
                label { "Before " input name="until" type="date" value=(v(&q.until)); }
                button type="submit" { "Filter" }
            }
            @if entries.is_empty() { p class="empty" { "No entries match." } } @else {
                table id="audit" {
                    thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Customer" } th { "Target" } th { "Result" } th { "Detail" } } }
                    tbody {
                        @for e in &entries {
                            tr {
                                td { (e["at"].as_str().unwrap_or("")) } td { (e["actor"].as_str().unwrap_or("")) }
                                td { (e["action"].as_str().unwrap_or("")) } td { (e["customer"].as_str().unwrap_or("")) }
                                td { (e["target"].as_str().unwrap_or("")) } td { (e["result"].as_str().unwrap_or("")) }
                                td { code { (e["detail"]) } }
                            }
                        }
                    }
                }
            }
        })
    }
    .await;
    page(&who, "Audit log", "audit", body)
}

pub async fn users(
    State(api): State<Arc<ConsoleApi>>,
    who: Result<Caller<SuperAdmin>, ApiError>,
    uri: Uri,
) -> Response {
    let who = caller!(who, uri);
    let body = async {
        let users = api.db()?.users().await?;
        Ok(html! {
            h1 { "Staff" }
            section {
                h2 { "New staff member" }
                form method="post" data-api="POST /api/staff/users" data-then="show refresh users" class="inline" {
                    label { "User id " input name="id" required pattern="[a-z0-9][a-z0-9._-]{0,63}"; }
                    label { "Name " input name="name" required; }
                    label { "E-mail " input name="email" type="email" required; }
                    label { "Role "
                        select name="role" {
                            @for r in crate::staff::Role::ALL { option value=(r.as_str()) selected[r == crate::staff::Role::Technician] { (r.as_str()) } }
                        }
                    }
                    button type="submit" { "Add (a password is generated)" }
                }
            }
            pre id="answer" hidden {}
            section id="users" {
                table {
                    thead { tr { th { "User" } th { "Name" } th { "E-mail" } th { "Role" } th { "State" } th { "Actions" } } }
                    tbody {
                        @for u in &users {
                            tr {
                                td { (u.id) } td { (u.name) } td { (u.email) } td { (u.role.as_str()) }
                                td { (if u.disabled { "disabled" } else { "active" }) }
                                td class="actions" {
                                    @if u.id != who.sub {
                                        @if u.disabled {
                                            form method="post" data-api={ "POST /api/staff/users/" (u.id) "/enable" } data-then="refresh users" { button type="submit" { "Enable" } }
                                        } @else {
                                            form method="post" data-api={ "POST /api/staff/users/" (u.id) "/disable" } data-confirm={ "Disable " (u.id) "? Their sessions end now." } data-then="refresh users" { button type="submit" class="danger" { "Disable" } }
                                        }
                                    }
                                    form method="post" data-api={ "POST /api/staff/users/" (u.id) "/password" } data-confirm={ "Set a new password for " (u.id) "? Their sessions end now." } data-then="show" { button type="submit" { "New password" } }
                                }
                            }
                        }
                    }
                }
            }
        })
    }
    .await;
    page(&who, "Staff", "users", body)
}
