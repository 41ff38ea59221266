//! The API description against the running stack (`portico up` with its
//! private PostgreSQL): `GET /api/openapi.json` through the gateway
//! describes every route the services mount — each described operation
//! answers with a documented status and an error body of the documented
//! shape, no source file mounts an `/api/` route outside the description
//! — and a client that knows only the description (paths, examples,
//! schemas) backs a customer up end to end, every answer validated
//! against the response schema the description gives.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use portico_tests::client::token_with_roles;
use portico_tests::free_port;
use portico_tests::servers::{EdgePorts, pg_bin, up_with};
use serde_json::{Value, json};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The description, with lookups by operation id.
struct Description {
    doc: Value,
}

/// One operation: its method, path template and description.
struct Op<'a> {
    method: &'a str,
    path: &'a str,
    op: &'a Value,
}

impl Description {
    fn ops(&self) -> Vec<Op<'_>> {
        let mut ops = Vec::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for m in METHODS {
                if let Some(op) = item.get(m) {
                    ops.push(Op { method: m, path, op });
                }
            }
        }
        ops
    }

    fn op(&self, id: &str) -> Op<'_> {
        self.ops()
            .into_iter()
            .find(|o| o.op["operationId"] == id)
            .unwrap_or_else(|| panic!("no operation {id} in the description"))
    }

    /// Follows a `$ref` within the description.
    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v["$ref"].as_str() {
            Some(r) => self
                .doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling {r}")),
            None => v,
        }
    }

    /// The request body an operation's schema gives as its example.
    fn example_body(&self, op: &Op) -> Value {
        let schema = &op.op["requestBody"]["content"]["application/json"]["schema"];
        let s = self.resolve(schema);
        s.get("example")
            .or_else(|| s["examples"].get(0))
            .cloned()
            .unwrap_or_else(|| panic!("{} has no example body", op.op["operationId"]))
    }

    /// Checks an answer against what the operation documents for its
    /// status: the status is listed, and a JSON body matches the schema.
    fn check(&self, op: &Op, status: u16, content_type: &str, body: &[u8]) {
        let id = &op.op["operationId"];
        let Some(resp) = op.op["responses"].get(status.to_string()) else {
            panic!(
                "{id}: status {status} is not documented: {}",
                String::from_utf8_lossy(body)
            );
        };
        let resp = self.resolve(resp);
        let Some(content) = resp["content"].as_object().filter(|c| !c.is_empty()) else {
            return;
        };
        let ct = content_type.split(';').next().unwrap_or("").trim();
        // A media range (`*/*`, `application/*`) documents any of its types.
        let range = format!("{}/*", ct.split('/').next().unwrap_or(""));
        let Some(media) = content
            .get(ct)
            .or_else(|| content.get(&range))
            .or_else(|| content.get("*/*"))
        else {
            panic!(
                "{id} {status}: content type {ct} is not documented ({:?})",
                content.keys()
            );
        };
        if ct != "application/json" || !content.contains_key(ct) {
            return;
        }
        let instance: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{id} {status}: not JSON ({e}): {}", String::from_utf8_lossy(body)));
        let schema = json!({
            "$ref": "#/x",
            "x": media["schema"],
            "components": self.doc["components"],
        });
        let v = jsonschema::validator_for(&schema).expect("the response schema compiles");
        let errors: Vec<String> = v.iter_errors(&instance).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{id} {status}: {errors:?} in {instance}");
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    d: Description,
}

impl Client {
    /// Calls an operation with its path parameters filled in order, a
    /// body, and the bearer token; checks the answer against the
    /// description and answers status and body.
    async fn call(&self, id: &str, params: &[&str], body: Option<Value>) -> (u16, Value) {
        let op = self.d.op(id);
        let mut url = op.path.to_string();
        for p in params {
            let start = url.find('{').expect("a parameter to fill");
            let end = start + url[start..].find('}').expect("a closing brace");
            url.replace_range(start..=end, p);
        }
        assert!(!url.contains('{'), "{id}: parameters left in {url}");
        let mut r = self
            .http
            .request(
                op.method.to_uppercase().parse().unwrap(),
                format!("{}{url}", self.base),
            )
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let ct = content_type(&resp);
        let bytes = resp.bytes().await.unwrap();
        self.d.check(&op, status, &ct, &bytes);
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A value of the schema's type for a path parameter that names nothing.
fn filler(param: &Value) -> &'static str {
    match param["schema"]["type"].as_str() {
        Some("integer") => "999999",
        _ => "no-such-thing",
    }
}

/// Calls `o` with its path parameters filled with values that name
/// nothing, a `{}` body where it takes one, and `token` if given; checks
/// the answer against the description and answers status and body. The
/// route table the gateways poll is asked on the jobs listener (the
/// gateway does not route it), everything else through the gateway.
async fn probe(
    http: &reqwest::Client,
    d: &Description,
    origins: (&str, &str),
    o: &Op<'_>,
    token: Option<&str>,
) -> (u16, String) {
    let mut url = o.path.to_string();
    for p in o.op["parameters"].as_array().into_iter().flatten() {
        if p["in"] == "path" {
            url = url.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), filler(p));
        }
    }
    let origin = if o.path == "/api/paas/routes" {
        origins.1
    } else {
        origins.0
    };
    let mut req = http.request(o.method.to_uppercase().parse().unwrap(), format!("{origin}{url}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if matches!(o.method, "post" | "put" | "patch") {
        req = req.header("content-type", "application/json").body("{}");
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = content_type(&resp);
    let body = resp.bytes().await.unwrap();
    d.check(o, status, &ct, &body);
    (
        status,
        format!("{} {url}: {}", o.method, String::from_utf8_lossy(&body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_description_covers_every_route_and_drives_a_backup() {
    if !pg_bin("initdb").is_file() {
        eprintln!("\n*** SKIPPED: PostgreSQL is not installed (scripts/test installs it) ***\n");
        return;
    }
    let jobs_port = free_port();
    let mut env = EdgePorts::unlimited();
    env.push(("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{jobs_port}")));
    let (svc, edge) = up_with(&env);
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&svc.certificate("localhost")).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", edge.https);

    // The description, through the gateway, and its page.
    let resp = http.get(format!("{base}/api/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(content_type(&resp).starts_with("application/json"));
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let d = Description { doc };
    let page = http.get(format!("{base}/api/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let page = page.text().await.unwrap();
    assert!(!page.contains("<script"), "the page runs nothing");

    // Every operation: a unique id, declared path parameters, error
    // bodies of the one shape, a security requirement unless public.
    let public: HashSet<&str> = [
        "get_service",
        "get_openapi",
        "api_docs",
        "login",
        "refresh",
        "download_backup_file",
        "dns_applied",
        "demo_token",
    ]
    .into();
    let mut ids = HashSet::new();
    let ops = d.ops();
    assert!(ops.len() >= 60, "{} operations", ops.len());
    for o in &ops {
        let id = o.op["operationId"].as_str().expect("an operation id");
        assert!(ids.insert(id.to_string()), "operation id {id} twice");
        for name in o.path.split('{').skip(1).map(|s| &s[..s.find('}').unwrap()]) {
            assert!(
                o.op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == name && p["in"] == "path"),
                "{id}: path parameter {name} undeclared"
            );
        }
        assert_eq!(
            d.resolve(&o.op["responses"]["401"]["content"]["application/json"]["schema"]),
            &d.doc["components"]["schemas"]["ErrorBody"],
            "{id}: 401 is an ErrorBody"
        );
        if !public.contains(id) {
            let sec = o.op["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{id}: no security"));
            assert!(!sec.is_empty(), "{id}: empty security");
            for req in sec {
                for scheme in req.as_object().unwrap().keys() {
                    assert!(
                        d.doc["components"]["securitySchemes"].get(scheme).is_some(),
                        "{id}: unknown scheme {scheme}"
                    );
                }
            }
        }
    }

    // Every described operation is mounted where the description says:
    // asked without credentials (or with bad ones) it answers with one of
    // its documented statuses and bodies, never "no route" or 405.
    let jobs_origin = format!("http://127.0.0.1:{jobs_port}");
    let origins = (base.as_str(), jobs_origin.as_str());
    for o in &ops {
        let id = o.op["operationId"].as_str().unwrap();
        let (status, what) = probe(&http, &d, origins, o, None).await;
        assert_ne!(status, 405, "{id}: {what}: not mounted");
        assert!(!what.contains("no route for"), "{id}: {what}: not mounted");
    }

    // The roles an operation lists are the roles it lets in: a bearer
    // token with another role is refused (403), one with a listed role
    // gets past the check (whatever the fillers then make of it).
    let all_roles = ["super_admin", "ops_lead", "technician", "service"];
    for o in &ops {
        let id = o.op["operationId"].as_str().unwrap();
        let roles: Vec<&str> = o.op["security"][0]["bearer"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if roles.is_empty() {
            continue;
        }
        let outsider = all_roles.iter().find(|r| !roles.contains(r)).unwrap_or(&"nobody");
        for (role, allowed) in [(*outsider, false), (roles[0], true)] {
            let token = token_with_roles("probe", &[role]);
            let (status, what) = probe(&http, &d, origins, o, Some(&token)).await;
            if allowed {
                assert!(
                    status != 401 && status != 403,
                    "{id}: role {role} is listed but refused: {status} {what}"
                );
            } else {
                assert_eq!(status, 403, "{id}: role {role} is not listed but let in: {what}");
            }
        }
    }

    // Nothing mounts an `/api/` route except through the description
    // (utoipa-axum's `routes!`, which mounts from the same attribute).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stray = Vec::new();
    for dir in ["jobs/src", "chat/src"] {
        for f in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&f).unwrap();
            let flat: String = text.split_whitespace().collect();
            if flat.contains(".route(\"/api") {
                stray.push(f.display().to_string());
            }
        }
    }
    assert!(
        stray.is_empty(),
        "routes mounted outside the description in {stray:?}"
    );

    // A backup end to end, from the description alone: the customer's
    // files exist (that is the shop), the rest is the API.
    let c = Client {
        http: http.clone(),
        base: base.clone(),
        token: token_with_roles("integrator", &["super_admin"]),
        d,
    };
    let new_customer = c.d.example_body(&c.d.op("create_customer"));
    let domain = new_customer["domain"]
        .as_str()
        .expect("the example names a domain");
    let tree = svc.dir.path().join("customers").join(domain);
    for (path, content) in [
        ("backend/package.json", "{\"version\": \"1.0.0\"}"),
        ("backend/.env", "SECRET=1"),
        ("backend/uploads/logo.png", "png"),
        ("store/index.js", "store"),
    ] {
        let p = tree.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let (s, customer) = c.call("create_customer", &[], Some(new_customer)).await;
    assert_eq!(s, 201, "{customer}");
    let cid = customer["id"].as_str().unwrap().to_string();
    let (s, customers) = c.call("list_customers", &[], None).await;
    assert_eq!(s, 200);
    assert!(
        customers["customers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == cid)
    );

    let backup = c.d.example_body(&c.d.op("create_backup"));
    let (s, queued) = c.call("create_backup", &[&cid], Some(backup)).await;
    assert_eq!(s, 202, "{queued}");
    let task = queued["task"].as_i64().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, t) = c.call("get_task", &[&cid, &task], None).await;
        assert_eq!(s, 200);
        match t["state"].as_str().unwrap() {
            "succeeded" => break,
            "failed" | "cancelled" => panic!("backup task ended: {t}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "backup still {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, tasks) = c.call("list_tasks", &[&cid], None).await;
    assert_eq!(s, 200);
    assert!(!tasks["tasks"].as_array().unwrap().is_empty());
    let (s, backups) = c.call("list_backups", &[&cid], None).await;
    assert_eq!(s, 200);
    let bid = backups["backups"][0]["id"].as_str().unwrap().to_string();
    let (s, links) = c.call("backup_links", &[&cid, &bid], None).await;
    assert_eq!(s, 200, "{links}");
    let download = c.d.op("download_backup_file");
    let mut fetched = 0;
    for l in links["links"].as_array().unwrap() {
        let resp = http
            .get(format!("{base}{}", l["url"].as_str().unwrap()))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let ct = content_type(&resp);
        let bytes = resp.bytes().await.unwrap();
        c.d.check(&download, status, &ct, &bytes);
        assert_eq!(status, 200, "{l}");
        if l["file"] == "manifest.json" {
            let m: Value = serde_json::from_slice(&bytes).expect("the manifest is JSON");
            assert!(m["artifacts"].as_array().is_some_and(|a| !a.is_empty()), "{m}");
        }
        fetched += 1;
    }
    assert!(fetched >= 2, "{links}");

    // A NUL byte in a value is the caller's error (400 and a documented
    // body), never an outage (PostgreSQL text cannot hold one).
    for (id, method, url, body) in [
        (
            "chat_token",
            "GET",
            "/api/auth/chat-token?app=a%00b".to_string(),
            None,
        ),
        ("list_audit", "GET", "/api/audit?actor=a%00b".to_string(), None),
        (
            "post_message",
            "POST",
            "/api/conversations/lobby/messages".to_string(),
            Some(json!({"id": "nul-1", "body": "a\u{0}b"})),
        ),
        (
            "create_conversation",
            "POST",
            "/api/conversations".to_string(),
            Some(json!({"members": ["a\u{0}b"]})),
        ),
    ] {
        let mut r = http
            .request(method.parse().unwrap(), format!("{base}{url}"))
            .bearer_auth(&c.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let ct = content_type(&resp);
        let bytes = resp.bytes().await.unwrap();
        c.d.check(&c.d.op(id), status, &ct, &bytes);
        assert_eq!(status, 400, "{id}: {}", String::from_utf8_lossy(&bytes));
    }
}

fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}
