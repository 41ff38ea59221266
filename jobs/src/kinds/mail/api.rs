//! Mail migration routes under `/api/migration/` (seed 004's roles:
//! manage = super_admin, ops_lead, technician; approve the gate =
//! super_admin, ops_lead; override = super_admin). Passwords go in, are
//! sealed at once, and never come out; every call is audited.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use portico_common::api::ApiError;
use portico_common::auth::Claims;
use portico_config::is_hostname;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::db::MailJob;
use super::imap::Server;
use super::{Shared, aad};
use crate::api::{KindApi, bad, json_body, not_found};
use crate::queue::Subject;
use crate::staff::auth::{Caller, Leads, Staff, StaffOrServices, SuperAdmin};

/// The mail routes' state: the shared API and the mail config and vault.
pub type MailApi = KindApi<Arc<Shared>>;

pub fn router(api: Arc<MailApi>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Staff, _>(routes!(create_job)))
        .routes(secured::<Staff, _>(routes!(list_jobs)))
        .routes(secured::<Staff, _>(routes!(show_job)))
        .routes(secured::<Staff, _>(routes!(add_mailbox)))
        .routes(secured::<Staff, _>(routes!(list_mailboxes)))
        .routes(secured::<Staff, _>(routes!(import_mailboxes)))
        .routes({
            // Uploads are streamed to disk: no body limit.
            let (schemas, paths, route) = secured::<Staff, _>(routes!(upload));
            (
                schemas,
                paths,
                route.layer(axum::extract::DefaultBodyLimit::disable()),
            )
        })
        .routes(secured::<Staff, _>(routes!(preflight)))
        .routes(secured::<Staff, _>(routes!(sync)))
        .routes(secured::<Staff, _>(routes!(verify)))
        .routes(secured::<Staff, _>(routes!(report_csv)))
        .routes(secured::<Staff, _>(routes!(report_html)))
        .routes(secured::<Leads, _>(routes!(approve_gate)))
        .routes(secured::<SuperAdmin, _>(routes!(override_gate)))
        .routes(secured::<StaffOrServices, _>(routes!(gate)))
        .routes(routes!(dns_applied))
        .with_state(api)
}

fn server_ok(s: &Server, field: &str) -> Result<(), ApiError> {
    let ip = s.host.parse::<std::net::IpAddr>().is_ok();
    if !(ip || is_hostname(&s.host)) || s.port == 0 {
        return Err(bad(
            "invalid_server",
            format!("{field}: host must be a hostname or an IP, port 1-65535"),
        ));
    }
    Ok(())
}

fn login_ok(s: &str, field: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > 320 || s.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err(bad(
            "invalid_login",
            format!("{field}: 1-320 characters, no quotes, backslashes or control characters"),
        ));
    }
    Ok(())
}

fn password_ok(s: &str, field: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > 1024 || s.contains(['\r', '\n', '\0']) {
        return Err(bad(
            "invalid_password",
            format!("{field}: 1-1024 bytes, one line"),
        ));
    }
    Ok(())
}

impl MailApi {
    async fn job(&self, id: i64) -> Result<MailJob, ApiError> {
        self.db()?
            .mail_job(id)
            .await?
            .ok_or_else(|| not_found(format!("migration job {id}")))
    }

    async fn note(&self, who: &Claims, action: &str, job: &MailJob, result: &str, detail: Value) {
        self.audit(
            who,
            action,
            Subject::Customer(&job.customer),
            Some(&format!("mail-job:{}", job.id)),
            result,
            detail,
        )
        .await;
    }

    /// Stores a mailbox: the row, then its secrets sealed with its id.
    async fn store_mailbox(&self, job: &MailJob, m: &NewMailbox) -> Result<i64, ApiError> {
        login_ok(&m.source_login, "source_login")?;
        login_ok(&m.dest_login, "dest_login")?;
        match (job.source_type.as_str(), &m.source_password) {
            ("imap", Some(p)) => password_ok(p, "source_password")?,
            ("imap", None) => {
                return Err(bad(
                    "invalid_password",
                    "source_password is required for an imap job",
                ));
            }
            (_, Some(_)) => return Err(bad("invalid_password", "a pst job takes no source_password")),
            (_, None) => {}
        }
        password_ok(&m.dest_password, "dest_password")?;
        let map = serde_json::to_value(m.folder_map.clone().unwrap_or_default()).unwrap_or_default();
        let db = self.db()?;
        let id = db
            .add_mailbox(job.id, &m.source_login, &m.dest_login, &map)
            .await?;
        let seal = |pw: &str, side: &str| {
            self.kind
                .vault
                .seal(pw, &aad(id, side))
                .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "no_key", e.to_string()))
        };
        let sealed = m
            .source_password
            .as_deref()
            .map(|p| seal(p, "source"))
            .transpose()
            .and_then(|s| Ok((s, seal(&m.dest_password, "destination")?)));
        match sealed {
            Ok((s, d)) => db.set_mailbox_secrets(id, s.as_deref(), &d).await?,
            Err(e) => {
                let _ = db.delete_mailbox(id).await;
                return Err(e);
            }
        }
        Ok(id)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewJob {
    customer: String,
    domain: String,
    source_type: String,
    source: Option<Server>,
    destination: Server,
    #[serde(default)]
    options: Value,
}

#[utoipa::path(
    post, path = "/api/migration/jobs", operation_id = "create_mail_job", tag = "mail",
    request_body = NewJob,
    responses((status = 201, description = "Created", body = Object), Errors),
)]
async fn create_job(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    body: Result<Json<NewJob>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    api.kind
        .vault
        .ready()
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "no_key", e.to_string()))?;
    if !is_hostname(&req.domain) {
        return Err(bad("invalid_domain", format!("`{}` is not a domain", req.domain)));
    }
    match req.source_type.as_str() {
        "imap" => {
            let source = req
                .source
                .as_ref()
                .ok_or_else(|| bad("invalid_source", "an imap job needs source {host, port, tls}"))?;
            server_ok(source, "source")?;
        }
        "pst" | "tgz" if req.source.is_some() => {
            return Err(bad(
                "invalid_source",
                "a pst or tgz job has no source server: upload a file per mailbox",
            ));
        }
        "pst" | "tgz" => {}
        other => {
            return Err(bad(
                "invalid_source_type",
                format!("`{other}`: source_type is imap, pst or tgz"),
            ));
        }
    }
    server_ok(&req.destination, "destination")?;
    if !req.options.is_null() && !req.options.is_object() {
        return Err(bad("invalid_options", "options must be an object"));
    }
    let domain = req.domain.to_ascii_lowercase();
    let id = api
        .db()?
        .add_mail_job(
            &req.customer,
            &domain,
            &req.source_type,
            req.source
                .as_ref()
                .map(|s| serde_json::to_value(s).unwrap_or_default())
                .as_ref(),
            &serde_json::to_value(&req.destination).unwrap_or_default(),
            &if req.options.is_null() {
                json!({})
            } else {
                req.options.clone()
            },
            &who.sub,
        )
        .await?;
    let job = api.job(id).await?;
    api.note(&who, "mail.job.create", &job, "ok", json!({ "domain": domain }))
        .await;
    Ok((StatusCode::CREATED, Json(job)))
}

#[utoipa::path(
    get, path = "/api/migration/jobs", operation_id = "list_mail_jobs", tag = "mail",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn list_jobs(
    State(api): State<Arc<MailApi>>,
    _who: Caller<Staff>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({ "jobs": api.db()?.mail_jobs().await? })))
}

#[utoipa::path(
    get, path = "/api/migration/jobs/{id}", operation_id = "get_mail_job", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn show_job(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let job = api.job(id).await?;
    api.note(&who, "mail.job.show", &job, "ok", json!({})).await;
    let db = api.db()?;
    Ok(Json(json!({
        "job": job,
        "ratio": job.ratio(),
        "min_ratio": api.kind.cfg.gate_min_ratio,
        "mailboxes": db.mailboxes(id).await?,
        "runs": db.mail_runs(id).await?,
    })))
}

#[derive(Deserialize, Clone, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewMailbox {
    source_login: String,
    /// Not for PST jobs (the source is the uploaded file).
    source_password: Option<String>,
    dest_login: String,
    dest_password: String,
    folder_map: Option<std::collections::BTreeMap<String, String>>,
}

#[utoipa::path(
    post, path = "/api/migration/jobs/{id}/mailboxes", tag = "mail",
    params(("id", description = "Migration job id")),
    request_body = NewMailbox,
    responses((status = 201, description = "Created", body = Object), Errors),
)]
async fn add_mailbox(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
    body: Result<Json<NewMailbox>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    let job = api.job(id).await?;
    let r = api.store_mailbox(&job, &req).await;
    api.note(
        &who,
        "mail.mailbox.add",
        &job,
        if r.is_ok() { "ok" } else { "refused" },
        json!({ "source_login": req.source_login }),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!({ "id": r? }))))
}

/// CSV lines `source_login,source_password,dest_login,dest_password`
/// (a header line with these names is skipped); each line is stored or
/// refused on its own, with its line number and reason.
#[utoipa::path(
    post, path = "/api/migration/jobs/{id}/mailboxes/import", tag = "mail",
    params(("id", description = "Migration job id")),
    request_body(content = String, content_type = "text/csv", description = "At most 1 MiB"),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn import_mailboxes(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let job = api.job(id).await?;
    if body.len() > 1 << 20 {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "at most 1 MiB of CSV".into(),
        ));
    }
    let text = std::str::from_utf8(&body).map_err(|_| bad("invalid_csv", "the CSV is not UTF-8"))?;
    let (mut created, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || (n == 1 && line.to_ascii_lowercase().starts_with("source_login")) {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() != 4 {
            errors.push(json!({ "line": n, "error": format!("{} fields, expected 4: source_login,source_password,dest_login,dest_password", cols.len()) }));
            continue;
        }
        let m = NewMailbox {
            source_login: cols[0].into(),
            source_password: (!cols[1].is_empty()).then(|| cols[1].to_string()),
            dest_login: cols[2].into(),
            dest_password: cols[3].into(),
            folder_map: None,
        };
        match api.store_mailbox(&job, &m).await {
            Ok(mid) => created.push(json!({ "line": n, "id": mid, "source_login": m.source_login })),
            Err(ApiError(_, code, message)) => {
                errors.push(json!({ "line": n, "error": code, "message": message }))
            }
        }
    }
    api.note(
        &who,
        "mail.mailbox.import",
        &job,
        "ok",
        json!({ "created": created.len(), "errors": errors.len() }),
    )
    .await;
    Ok(Json(json!({ "created": created, "errors": errors })))
}

/// Streams a mailbox's source file (the PST of a pst job, the export of a
/// tgz job) to disk (mode 600), at most `jobs.mail.max_pst_bytes`;
/// replaces an earlier upload only when whole.
#[utoipa::path(
    put, path = "/api/migration/jobs/{id}/mailboxes/{mailbox}/upload", operation_id = "upload_mailbox", tag = "mail",
    params(("id", description = "Migration job id"), ("mailbox", description = "Mailbox id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The mailbox file (PST or tar.gz), streamed to disk"),
    responses((status = 201, description = "Created", body = Object), Errors),
)]
async fn upload(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path((id, mailbox)): Path<(i64, i64)>,
    body: axum::body::Body,
) -> Result<impl IntoResponse, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let job = api.job(id).await?;
    if job.source_type == "imap" {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "not_a_file_source",
            format!("job {id} copies from an IMAP server: nothing to upload"),
        ));
    }
    if !api.db()?.mailboxes(id).await?.iter().any(|m| m.id == mailbox) {
        return Err(not_found(format!("mailbox {mailbox} of job {id}")));
    }
    let path = api.kind.upload_path(&job, mailbox);
    let dir = path.parent().expect("a file in a directory").to_path_buf();
    let io = |e: std::io::Error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string());
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    // Mail is private: the directories are the service user's alone.
    for d in [&api.kind.dir, &dir] {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(io)?;
    }
    let tmp = dir.join(format!(".upload-{mailbox}-{}", rand::random::<u32>()));
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .map_err(io)?;
    let max = api.kind.cfg.max_pst_bytes;
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    let result: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad("upload_interrupted", e.to_string()))?;
            size += chunk.len() as u64;
            if size > max {
                return Err(ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("an upload may have at most {max} bytes (jobs.mail.max_pst_bytes)"),
                ));
            }
            f.write_all(&chunk).await.map_err(io)?;
        }
        f.sync_all().await.map_err(io)?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    api.note(
        &who,
        "mail.upload",
        &job,
        "ok",
        json!({ "mailbox": mailbox, "bytes": size }),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "mailbox": mailbox, "bytes": size })),
    ))
}

#[utoipa::path(
    get, path = "/api/migration/jobs/{id}/mailboxes", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn list_mailboxes(
    State(api): State<Arc<MailApi>>,
    _who: Caller<Staff>,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    api.job(id).await?;
    Ok(Json(json!({ "mailboxes": api.db()?.mailboxes(id).await? })))
}

/// Logs in on both sides of every mailbox, lists the source's folders with
/// their messages and bytes, and estimates the copy time.
#[utoipa::path(
    post, path = "/api/migration/jobs/{id}/preflight", operation_id = "mail_preflight", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn preflight(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let job = api.job(id).await?;
    let mut out = Vec::new();
    let (mut messages, mut bytes) = (0u64, 0u64);
    for mb in api.db()?.mailboxes(id).await? {
        let r: Result<Value, String> = async {
            let (mut src, dst) = api.kind.sessions(&job, &mb).await.map_err(|f| f.message)?;
            let mut folders = Vec::new();
            for f in src.folders().await.map_err(|e| e.to_string())?.into_iter().filter(|f| f.selectable) {
                src.examine(&f.raw).await.map_err(|e| e.to_string())?;
                let list = src.summaries(1).await.map_err(|e| e.to_string())?;
                let size: u64 = list.iter().map(|m| u64::from(m.size)).sum();
                messages += list.len() as u64;
                bytes += size;
                folders.push(json!({ "folder": super::folders::decode(&f.raw), "messages": list.len(), "bytes": size }));
            }
            src.logout().await;
            dst.logout().await;
            Ok(json!({ "folders": folders }))
        }
        .await;
        out.push(match r {
            Ok(v) => json!({ "mailbox": mb.source_login, "ok": true, "source": v }),
            Err(e) => json!({ "mailbox": mb.source_login, "ok": false, "error": e }),
        });
    }
    // A conservative rate for the estimate: the cap, or 5 MB/s.
    let rate = match api.kind.cfg.max_bytes_per_sec {
        0 => 5_000_000,
        n => n,
    };
    api.note(
        &who,
        "mail.preflight",
        &job,
        "ok",
        json!({ "messages": messages, "bytes": bytes }),
    )
    .await;
    Ok(Json(json!({
        "mailboxes": out,
        "messages": messages,
        "bytes": bytes,
        "estimated_seconds": bytes / rate + messages / 200,
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SyncRequest {
    kind: String,
}

#[utoipa::path(
    post, path = "/api/migration/jobs/{id}/sync", operation_id = "start_mail_sync", tag = "mail",
    params(("id", description = "Migration job id")),
    request_body = SyncRequest,
    responses(
        (status = 202, description = "Queued: follow the task", body = crate::api::Queued),
        Errors,
    ),
)]
async fn sync(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    if !["initial", "delta", "final", "verify"].contains(&req.kind.as_str()) {
        return Err(bad("invalid_kind", "kind is initial, delta, final or verify"));
    }
    let job = api.job(id).await?;
    let r = api
        .db()?
        .enqueue(
            Subject::Customer(&job.customer),
            "mail",
            &json!({ "job": id, "run": req.kind }),
            &who.sub,
            api.cfg.max_attempts.max(5),
        )
        .await;
    api.note(
        &who,
        "mail.sync",
        &job,
        if r.is_ok() { "queued" } else { "refused" },
        json!({ "kind": req.kind }),
    )
    .await;
    Ok((StatusCode::ACCEPTED, crate::api::Queued::new(r?)))
}

async fn verification(api: &MailApi, job: &MailJob) -> Result<Value, ApiError> {
    let db = api.db()?;
    let mut mailboxes = Vec::new();
    for mb in db.mailboxes(job.id).await? {
        let folders = db.folder_states(mb.id).await?;
        mailboxes.push(json!({
            "mailbox": mb.source_login,
            "destination": mb.dest_login,
            "folders": folders.iter().map(|f| json!({
                "source": super::folders::decode(&f.source_folder),
                "destination": super::folders::decode(&f.dest_folder),
                "source_count": f.source_count,
                "dest_count": f.dest_count,
                "verified": f.verified,
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(json!({
        "job": job.id,
        "domain": job.domain,
        "gate": job.gate,
        "verified": job.verified,
        "expected": job.expected,
        "ratio": job.ratio(),
        "min_ratio": api.kind.cfg.gate_min_ratio,
        "mailboxes": mailboxes,
    }))
}

#[utoipa::path(
    get, path = "/api/migration/jobs/{id}/verify", operation_id = "verify_mail", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn verify(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let job = api.job(id).await?;
    api.note(&who, "mail.verify", &job, "ok", json!({})).await;
    Ok(Json(verification(&api, &job).await?))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The job's verification as a page a person can read or print.
#[utoipa::path(
    get, path = "/api/migration/jobs/{id}/report.html", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn report_html(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let job = api.job(id).await?;
    let v = verification(&api, &job).await?;
    let mut rows = String::new();
    for mb in v["mailboxes"].as_array().into_iter().flatten() {
        for f in mb["folders"].as_array().into_iter().flatten() {
            let ok = f["verified"] == f["source_count"];
            rows.push_str(&format!(
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                if ok { "ok" } else { "short" },
                html(mb["mailbox"].as_str().unwrap_or_default()),
                html(f["source"].as_str().unwrap_or_default()),
                html(f["destination"].as_str().unwrap_or_default()),
                f["source_count"],
                f["dest_count"],
                f["verified"],
            ));
        }
    }
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Migration of {d}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}tr.short td{{background:#fee}}</style></head>\
         <body><h1>Mail migration of {d}</h1><p>Gate: <b>{g}</b> · verified {vv} of {e} ({r:.2}%, needs {m:.2}%)</p>\
         <table><tr><th>mailbox</th><th>source folder</th><th>destination folder</th><th>source</th>\
         <th>destination</th><th>verified</th></tr>\n{rows}</table></body></html>\n",
        d = html(&job.domain),
        g = html(&job.gate),
        vv = job.verified,
        e = job.expected,
        r = job.ratio() * 100.0,
        m = api.kind.cfg.gate_min_ratio * 100.0,
    );
    api.note(&who, "mail.report", &job, "ok", json!({ "format": "html" }))
        .await;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        page,
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/api/migration/jobs/{id}/report.csv", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn report_csv(
    State(api): State<Arc<MailApi>>,
    who: Caller<Staff>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let job = api.job(id).await?;
    api.note(&who, "mail.report", &job, "ok", json!({ "format": "csv" }))
        .await;
    let v = verification(&api, &job).await?;
    let mut out = String::from("mailbox,source_folder,destination_folder,source_count,dest_count,verified\n");
    for mb in v["mailboxes"].as_array().into_iter().flatten() {
        for f in mb["folders"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{},{},{},{},{},{}\n",
                csv_field(mb["mailbox"].as_str().unwrap_or_default()),
                csv_field(f["source"].as_str().unwrap_or_default()),
                csv_field(f["destination"].as_str().unwrap_or_default()),
                f["source_count"],
                f["dest_count"],
                f["verified"]
            ));
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response())
}

#[utoipa::path(
    post, path = "/api/migration/jobs/{id}/approve-gate", tag = "mail",
    params(("id", description = "Migration job id")),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn approve_gate(
    State(api): State<Arc<MailApi>>,
    who: Caller<Leads>,
    Path(id): Path<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let job = api.job(id).await?;
    let (ratio, min) = (job.ratio(), api.kind.cfg.gate_min_ratio);
    if job.gate != "warning" || ratio < min {
        api.note(
            &who,
            "mail.gate.approve",
            &job,
            "refused",
            json!({ "ratio": ratio, "gate": job.gate }),
        )
        .await;
        return Err(ApiError(
            StatusCode::CONFLICT,
            "gate_not_ready",
            format!("verified ratio {ratio:.4} (needs {min}); gate is {}", job.gate),
        ));
    }
    api.db()?.set_gate(id, "ready_for_dns", &who.sub, None).await?;
    api.note(&who, "mail.gate.approve", &job, "ok", json!({ "ratio": ratio }))
        .await;
    Ok(Json(json!({ "gate": "ready_for_dns", "ratio": ratio })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Override {
    reason: String,
}

#[utoipa::path(
    post, path = "/api/migration/jobs/{id}/override-gate", tag = "mail",
    params(("id", description = "Migration job id")),
    request_body = Override,
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn override_gate(
    State(api): State<Arc<MailApi>>,
    who: Caller<SuperAdmin>,
    Path(id): Path<i64>,
    body: Result<Json<Override>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = json_body(body)?;
    let reason = req.reason.trim();
    if reason.len() < 3 || reason.len() > 1000 {
        return Err(bad(
            "invalid_reason",
            "an override needs a reason of 3-1000 characters",
        ));
    }
    let job = api.job(id).await?;
    api.db()?
        .set_gate(id, "ready_for_dns", &who.sub, Some(reason))
        .await?;
    api.note(
        &who,
        "mail.gate.override",
        &job,
        "ok",
        json!({ "reason": reason, "ratio": job.ratio() }),
    )
    .await;
    Ok(Json(json!({ "gate": "ready_for_dns", "overridden": true })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct GateQuery {
    domain: String,
}

/// For other systems (a DNS panel): may this domain's MX move?
#[utoipa::path(
    get, path = "/api/migration/gate", operation_id = "mail_gate", tag = "mail",
    params(GateQuery),
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn gate(
    State(api): State<Arc<MailApi>>,
    _who: Caller<StaffOrServices>,
    query: Result<Query<GateQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| bad("invalid_query", e.body_text()))?;
    let job = api
        .db()?
        .mail_job_by_domain(&q.domain.to_ascii_lowercase())
        .await?
        .ok_or_else(|| not_found(format!("no migration job for {}", q.domain)))?;
    Ok(Json(json!({
        "domain": job.domain,
        "gate": job.gate,
        "ratio": job.ratio(),
        "min_ratio": api.kind.cfg.gate_min_ratio,
        "ready": matches!(job.gate.as_str(), "ready_for_dns" | "dns_applied"),
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DnsApplied {
    delivery_id: String,
    domain: String,
}

/// `dns.applied`: the DNS system says the MX moved. Signed with
/// HMAC-SHA256 over the body (`X-Portico-Signature: sha256=<hex>`,
/// compared in constant time); a delivery id seen before changes nothing.
#[utoipa::path(
    post, path = "/api/migration/webhooks/dns-applied", tag = "mail",
    params(("X-Portico-Signature" = String, Header, description = "sha256=<hex>: HMAC-SHA256 of the body with jobs.mail.webhook_secret")),
    request_body = DnsApplied,
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn dns_applied(
    State(api): State<Arc<MailApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, "bad_signature", m.to_string());
    let secret = api.kind.cfg.webhook_secret.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_secret",
            "jobs.mail.webhook_secret is not set".into(),
        )
    })?;
    let sig = headers
        .get("x-portico-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| unauthorized("X-Portico-Signature: sha256=<hex> is required"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key");
    mac.update(&body);
    mac.verify_slice(&sig)
        .map_err(|_| unauthorized("the signature does not match the body"))?;
    let req: DnsApplied = serde_json::from_slice(&body).map_err(|e| bad("invalid_body", e.to_string()))?;
    if req.delivery_id.is_empty() || req.delivery_id.len() > 200 {
        return Err(bad("invalid_delivery", "delivery_id: 1-200 characters"));
    }
    let db = api.db()?;
    let job = db
        .mail_job_by_domain(&req.domain.to_ascii_lowercase())
        .await?
        .ok_or_else(|| not_found(format!("no migration job for {}", req.domain)))?;
    if !db.webhook_once(&req.delivery_id, &job.domain).await? {
        return Ok(Json(json!({ "gate": job.gate, "replayed": true })));
    }
    if job.gate != "ready_for_dns" && job.gate != "dns_applied" {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "gate_not_ready",
            format!("the gate of {} is {}, not ready_for_dns", job.domain, job.gate),
        ));
    }
    db.set_gate(job.id, "dns_applied", "webhook:dns.applied", None)
        .await?;
    let _ = db
        .audit(
            "webhook:dns.applied",
            "mail.gate.dns_applied",
            Subject::Customer(&job.customer),
            Some(&format!("mail-job:{}", job.id)),
            "ok",
            &json!({ "delivery_id": req.delivery_id }),
        )
        .await;
    Ok(Json(json!({ "gate": "dns_applied", "replayed": false })))
}
