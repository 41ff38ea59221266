//! Blue/green upgrades of a shop against real PostgreSQL, a real
//! supervisord (Debian's `supervisor`), the jobs service and the gateway.
//!
//! The shop's services are static sites served by busybox `httpd` on the
//! loopback port the upgrade gives them; releases are real tar.gz archives
//! with a `.env.example`, a SQL migration run by `psql` and a build step.
//! A client fetches the shop through the gateway in a loop during the
//! upgrade: no request may fail, and once it has seen the new release it
//! never sees the old one again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portico_tests::client::api_call;
use portico_tests::proc::Proc;
use portico_tests::servers::{EdgePorts, Postgres, Service};
use portico_tests::{bins, eventually, free_port};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const ADMIN: &[&str] = &["super_admin"];
const START: &str = "busybox httpd -f -p 127.0.0.1:$PORT -h public";

/// A supervisord of the test's own, with an include directory.
struct Supervisor {
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Supervisor {
    fn start() -> Supervisor {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::create_dir_all(dir.path().join("conf.d")).unwrap();
        let conf = format!(
            "[unix_http_server]\nfile={d}/supervisor.sock\n\n[supervisord]\nlogfile={d}/supervisord.log\n\
             pidfile={d}/supervisord.pid\nchildlogdir={d}\nnodaemon=true\nuser=root\n\n\
             [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n[include]\nfiles = {d}/conf.d/*.conf\n"
        );
        std::fs::write(dir.path().join("supervisord.conf"), conf).unwrap();
        let mut cmd = Command::new("supervisord");
        cmd.args(["-n", "-c"]).arg(dir.path().join("supervisord.conf"));
        let proc = Proc::spawn("supervisord", cmd, &dir.path().join("out.log"));
        let s = Supervisor { proc, dir };
        for _ in 0..100 {
            if s.ctl(&["status"]).status.code().is_some_and(|c| c != 4 && c != 2) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("supervisord did not start: {}", s.proc.log());
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("supervisord.conf")
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("supervisorctl")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .unwrap()
    }

    fn programs(&self) -> String {
        String::from_utf8_lossy(&self.ctl(&["status"]).stdout).to_string()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "all"]);
        self.proc.stop("TERM", Duration::from_secs(10));
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A tar.gz of `files` (paths relative to the service directory).
fn archive(out: &Path, files: &[(&str, &[u8])]) -> String {
    let src = tempfile::tempdir().unwrap();
    for (p, content) in files {
        let path = src.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let st = Command::new("tar")
        .arg("czf")
        .arg(out)
        .arg("-C")
        .arg(src.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    sha256(&std::fs::read(out).unwrap())
}

/// The release catalog: 1.0.0 (what the old-layout shop runs), 2.0.0 (a
/// new `.env` key, a migration, a build), 3.0.0 (a failing build), 4.0.0
/// (healthy at first, broken seconds later: fails the checks after the
/// switch), 5.0.0 (only from 4.x), 2.1.0 (an archive that does not match).
fn catalog(dir: &Path, big: bool) -> PathBuf {
    let mut releases = Vec::new();
    let svc = |v: &str, s: &str, files: &[(&str, &[u8])], extra: Value| -> Value {
        let sum = archive(&dir.join(format!("{v}/{s}.tar.gz")), files);
        let health: Value = match s {
            "backend" => json!(["/health"]),
            "admin" => json!(["/"]),
            _ => json!(["/", "/static/app.js"]),
        };
        let mut o =
            json!({ "archive": format!("{v}/{s}.tar.gz"), "sha256": sum, "start": START, "health": health });
        for (k, val) in extra.as_object().unwrap() {
            o[k] = val.clone();
        }
        o
    };
    let filler: Vec<u8> = if big {
        // Incompressible: unpacking takes long enough to be caught.
        let mut x = 0x2545F4914F6CDD1Du64;
        (0..24 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    } else {
        Vec::new()
    };
    for (v, from, store_build, store_start) in [
        ("1.0.0", "<1.0.0", None, START.to_string()),
        ("2.0.0", ">=1.0.0, <2.0.0", Some("touch .building; sleep 2; mkdir -p public/static && cp src/app.js public/static/app.js && echo built"), START.to_string()),
        ("3.0.0", ">=1.0.0", Some("echo compiling; echo \"ERROR in src/app.ts: Type 'x' is not assignable\" >&2; exit 2"), START.to_string()),
        (
            "4.0.0",
            ">=1.0.0",
            Some("mkdir -p public/static && cp src/app.js public/static/app.js"),
            "sh -c 'busybox httpd -f -p 127.0.0.1:$PORT -h public & sleep 1.5; rm -f public/static/app.js; wait'".to_string(),
        ),
        ("5.0.0", ">=4.0.0", None, START.to_string()),
    ] {
        let backend_index = format!("backend {v}");
        let store_index = format!("store {v}");
        let mut backend_files: Vec<(&str, &[u8])> = vec![
            ("public/health", b"ok"),
            ("public/index.html", backend_index.as_bytes()),
            (".env.example", b"DATABASE_URL=\nSECRET=change-me\nCACHE_TTL=60\n"),
            ("migrations/002.sql", b"CREATE TABLE IF NOT EXISTS v2_things (id int); INSERT INTO v2_things SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM v2_things);"),
        ];
        if big && v == "2.0.0" {
            backend_files.push(("assets/filler.bin", &filler));
        }
        let mut store_files: Vec<(&str, &[u8])> = vec![("public/index.html", store_index.as_bytes()), ("src/app.js", b"console.log(2)")];
        if store_build.is_none() {
            store_files.push(("public/static/app.js", b"console.log(1)"));
        }
        let migrate = if v == "1.0.0" {
            json!({})
        } else {
            json!({ "migrate": "psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -q -f migrations/002.sql" })
        };
        let mut store_extra = json!({ "start": store_start, "install": "echo installing store" });
        if let Some(b) = store_build {
            store_extra["build"] = json!(b);
        }
        releases.push(json!({
            "version": v,
            "upgradable_from": [from],
            "engines": { "postgresql": ">=13" },
            "services": {
                "backend": svc(v, "backend", &backend_files, migrate),
                "admin": svc(v, "admin", &[("public/index.html", format!("admin {v}").as_bytes())], json!({})),
                "store": svc(v, "store", &store_files, store_extra),
            }
        }));
    }
    // 2.1.0: the catalog's checksum is not the archive's.
    let mut bad = releases[1].clone();
    bad["version"] = json!("2.1.0");
    bad["services"]["store"]["sha256"] = json!("0".repeat(64));
    releases.push(bad);
    let path = dir.join("releases.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&json!({ "releases": releases })).unwrap(),
    )
    .unwrap();
    path
}

struct Stack {
    pg: Postgres,
    sup: Supervisor,
    jobs: Option<Service>,
    jobs_port: u16,
    jobs_env: Vec<(&'static str, String)>,
    gw: Service,
    edge: EdgePorts,
    root: tempfile::TempDir,
    _releases: tempfile::TempDir,
    domain: String,
}

impl Stack {
    fn start(domain: &str, big: bool) -> Stack {
        Stack::start_with(domain, big, &[])
    }

    fn start_with(domain: &str, big: bool, extra: &[(&'static str, String)]) -> Stack {
        let pg = Postgres::start();
        let sup = Supervisor::start();
        let releases = tempfile::tempdir().unwrap();
        let catalog = catalog(releases.path(), big);
        let root = tempfile::tempdir().unwrap();
        let jobs_port = free_port();
        let edge = EdgePorts::free();
        let mut env = edge.env();
        env.extend(EdgePorts::unlimited());
        env.push(("PORTICO_GATEWAY__JOBS_UPSTREAM", format!("127.0.0.1:{jobs_port}")));
        env.push(("PORTICO_PAAS__ROUTES_POLL_MS", "4000".into()));
        env.push((
            "PORTICO_GATEWAY__HOSTNAMES",
            format!("[\"localhost\", \"{domain}\", \"admin.{domain}\", \"api.{domain}\"]"),
        ));
        let gw = Service::gateway(&[], &env, &edge);
        let bin_dir = portico_tests::servers::pg_bin("pg_dump")
            .parent()
            .unwrap()
            .display()
            .to_string();
        let jobs_env = vec![
            ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{jobs_port}")),
            ("PORTICO_JOBS__POSTGRES_URL", pg.url()),
            ("PORTICO_JOBS__CUSTOMERS_ROOT", root.path().display().to_string()),
            ("PORTICO_JOBS__PG_BIN_DIR", bin_dir),
            ("PORTICO_JOBS__DISK_RESERVE_BYTES", "0".into()),
            ("PORTICO_JOBS__LEASE_SECS", "3".into()),
            ("PORTICO_JOBS__REAP_SECS", "1".into()),
            ("PORTICO_JOBS__MAX_ATTEMPTS", "10".into()),
            ("PORTICO_JOBS__UPGRADE__RELEASES", catalog.display().to_string()),
            (
                "PORTICO_JOBS__UPGRADE__SUPERVISORCTL",
                format!("[\"supervisorctl\", \"-c\", \"{}\"]", sup.conf().display()),
            ),
            (
                "PORTICO_JOBS__UPGRADE__SUPERVISOR_CONF_DIR",
                sup.dir.path().join("conf.d").display().to_string(),
            ),
            (
                "PORTICO_JOBS__UPGRADE__GATEWAY_URL",
                format!("https://127.0.0.1:{}", edge.https),
            ),
            (
                "PORTICO_JOBS__UPGRADE__GATEWAY_CA_FILE",
                gw.certificate_path("localhost").display().to_string(),
            ),
            ("PORTICO_JOBS__UPGRADE__DRAIN_SECS", "2".into()),
            ("PORTICO_JOBS__UPGRADE__SWITCH_WAIT_SECS", "12".into()),
            ("PORTICO_JOBS__UPGRADE__HEALTH_DEADLINE_SECS", "10".into()),
        ];
        let jobs_env = jobs_env.into_iter().chain(extra.iter().cloned()).collect();
        let mut s = Stack {
            pg,
            sup,
            jobs: None,
            jobs_port,
            jobs_env,
            gw,
            edge,
            root,
            _releases: releases,
            domain: domain.to_string(),
        };
        s.start_jobs();
        s
    }

    fn start_jobs(&mut self) {
        self.jobs = Some(Service::start(&bins::jobs(), &[], &self.jobs_env, self.jobs_port));
    }

    fn kill_jobs(&mut self) {
        let mut j = self.jobs.take().unwrap();
        j.proc.signal("KILL");
        j.proc.wait_exit(Duration::from_secs(5));
    }

    fn tree(&self) -> PathBuf {
        self.root.path().join(&self.domain)
    }

    fn db_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.pg.port)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        api_call(self.jobs_port, method, path, ADMIN, body).await
    }

    /// An HTTPS client for the gateway resolving the shop's hostnames to it.
    fn edge_client(&self) -> reqwest::Client {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.edge.https));
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.gw.certificate("localhost")).unwrap())
            .timeout(Duration::from_secs(10));
        for h in [
            self.domain.clone(),
            format!("admin.{}", self.domain),
            format!("api.{}", self.domain),
        ] {
            b = b.resolve(&h, addr);
        }
        b.build().unwrap()
    }

    fn site_url(&self, host_prefix: &str, path: &str) -> String {
        format!("https://{host_prefix}{}:{}{path}", self.domain, self.edge.https)
    }

    async fn get(&self, host_prefix: &str, path: &str) -> (u16, String) {
        match self
            .edge_client()
            .get(self.site_url(host_prefix, path))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// A customer `id` in the old layout at 1.0.0, with uploads, a `.env`
    /// and a database; served through the gateway.
    async fn old_shop(&self, id: &str) {
        let pg = self.pg.url();
        sql(&pg, &format!("CREATE DATABASE {id}")).await;
        sql(
            &self.db_url(id),
            "CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2)",
        )
        .await;
        let tree = self.tree();
        let photo: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (path, content) in [
            ("backend/package.json", br#"{"version": "1.0.0"}"#.to_vec()),
            ("backend/public/health", b"ok".to_vec()),
            ("backend/public/index.html", b"backend 1.0.0".to_vec()),
            (
                "backend/.env",
                format!("DATABASE_URL={}\nSECRET=keep-me\n", self.db_url(id)).into_bytes(),
            ),
            ("backend/uploads/photo.jpg", photo),
            ("backend/uploads/2024/05/doc.pdf", b"%PDF-1.4 doc".to_vec()),
            ("admin/public/index.html", b"admin 1.0.0".to_vec()),
            ("store/public/index.html", b"store 1.0.0".to_vec()),
            ("store/public/static/app.js", b"console.log(1)".to_vec()),
        ] {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        let (s, body) = self
            .call(
                "POST",
                "/api/customers",
                Some(json!({ "id": id, "domain": self.domain, "database_url": self.db_url(id), "process_manager": "supervisor" })),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        let (s, body) = self
            .call("POST", &format!("/api/customers/{id}/serve"), None)
            .await;
        assert_eq!(s, 202, "{body}");
        let t = self.finished(id, body["task"].as_i64().unwrap()).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        eventually(
            Duration::from_secs(10),
            "1.0.0 served through the gateway",
            || async { (self.get("", "/").await == (200, "store 1.0.0".to_string())).then_some(()) },
        )
        .await;
    }

    async fn task(&self, id: &str, task: i64) -> Value {
        self.call("GET", &format!("/api/customers/{id}/tasks/{task}"), None)
            .await
            .1
    }

    async fn finished(&self, id: &str, task: i64) -> Value {
        eventually(Duration::from_secs(120), "the task to finish", || async move {
            let t = self.task(id, task).await;
            ["succeeded", "failed", "cancelled"]
                .contains(&t["state"].as_str()?)
                .then_some(t)
        })
        .await
    }

    async fn upgrade(&self, id: &str, to: &str) -> (u16, Value) {
        self.call(
            "POST",
            &format!("/api/customers/{id}/upgrade"),
            Some(json!({ "to": to, "heapMB": 1024 })),
        )
        .await
    }

    fn current(&self) -> String {
        std::fs::read_link(self.tree().join("current"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

async fn sql(url: &str, q: &str) -> Vec<tokio_postgres::SimpleQueryMessage> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.simple_query(q).await.unwrap()
}

async fn rows(url: &str, q: &str) -> Vec<String> {
    sql(url, q)
        .await
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_string()),
            _ => None,
        })
        .collect()
}

fn files_with_sums(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir(dir) {
        if e.is_file() {
            out.insert(
                e.strip_prefix(dir).unwrap().display().to_string(),
                sha256(&std::fs::read(&e).unwrap()),
            );
        }
    }
    out
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() && !path.is_symlink() {
            v.extend(walkdir(&path));
        } else {
            v.push(path);
        }
    }
    v
}

/// Fetches the store through the gateway until `stop`: (status, body) of
/// every request, in order.
fn watch(stack: &Stack, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<(u16, String)>> {
    let client = stack.edge_client();
    let url = stack.site_url("", "/");
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = match client.get(&url).send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            };
            seen.push(r);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_layout_shop_is_upgraded_with_zero_failed_requests_and_rolled_back_on_demand() {
    let s = Stack::start("shop1.test", false);
    s.old_shop("shop1").await;
    let uploads_before = files_with_sums(&s.tree().join("backend/uploads"));
    assert_eq!(uploads_before.len(), 2);

    // The plan says what would happen, before anything is changed.
    let (st, plan) = s
        .call("GET", "/api/customers/shop1/upgrade-plan?to=2.0.0", None)
        .await;
    assert_eq!(st, 200, "{plan}");
    assert_eq!(plan["compatible"], true, "{plan}");
    assert_eq!(plan["from"], "1.0.0");
    assert_eq!(plan["env"]["backend"]["added"], json!(["CACHE_TTL"]), "{plan}");
    assert!(plan["steps"].to_string().contains("release layout"), "{plan}");
    let (st, list) = s.call("GET", "/api/releases", None).await;
    assert_eq!(st, 200);
    assert_eq!(list["releases"].as_array().unwrap().len(), 6, "{list}");

    let stop = Arc::new(AtomicBool::new(false));
    let client = watch(&s, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, body) = s.upgrade("shop1", "2.0.0").await;
    assert_eq!(st, 202, "{body}");
    let task = body["task"].as_i64().unwrap();
    let t = s.finished("shop1", task).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = client.await.unwrap();

    // Zero failed requests; the new release only after the switch, and
    // never the old one after the new one was seen.
    let failed: Vec<_> = seen.iter().filter(|(st, _)| *st != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    let first_new = seen
        .iter()
        .position(|(_, b)| b == "store 2.0.0")
        .expect("2.0.0 was served");
    assert!(first_new > 0, "the old release served first");
    assert!(seen[..first_new].iter().all(|(_, b)| b == "store 1.0.0"));
    assert!(
        seen[first_new..].iter().all(|(_, b)| b == "store 2.0.0"),
        "1.0.0 came back after 2.0.0"
    );
    assert!(seen.len() > 50, "only {} requests", seen.len());

    // The layout, the uploads (same files, same checksums), the symlink.
    let tree = s.tree();
    assert_eq!(s.current(), "releases/2.0.0");
    assert!(!tree.join("backend").exists(), "the old layout is gone");
    assert_eq!(files_with_sums(&tree.join("shared/uploads")), uploads_before);
    for v in ["1.0.0", "2.0.0"] {
        let link = tree.join(format!("releases/{v}/backend/uploads"));
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../../shared/uploads")
        );
        assert_eq!(files_with_sums(&link), uploads_before);
    }
    // The migration ran against the customer's database.
    assert_eq!(rows(&s.db_url("shop1"), "SELECT id FROM v2_things").await, ["2"]);
    // `.env`: the new key added, the old values kept, the diff in the task.
    let env = std::fs::read_to_string(tree.join("current/backend/.env")).unwrap();
    assert!(env.contains("SECRET=keep-me"), "{env}");
    assert!(env.contains("CACHE_TTL=60"), "{env}");
    assert!(!env.contains("change-me"), "{env}");
    assert_eq!(
        t["result"]["env"]["backend"]["added"],
        json!(["CACHE_TTL"]),
        "{t}"
    );
    assert!(
        !t.to_string().contains("keep-me"),
        "a .env value in the task record"
    );
    // Served through the gateway: every service and the built asset.
    assert_eq!(s.get("", "/static/app.js").await, (200, "console.log(2)".into()));
    assert_eq!(s.get("admin.", "/").await, (200, "admin 2.0.0".into()));
    assert_eq!(s.get("api.", "/").await, (200, "backend 2.0.0".into()));
    // Blue is gone from the process manager, green runs.
    let programs = s.sup.programs();
    assert!(!programs.contains("1_0_0"), "{programs}");
    assert_eq!(programs.matches("RUNNING").count(), 3, "{programs}");

    // The pre-upgrade backup: linked to the task, listed, and restores.
    let backup = t["result"]["backup"].as_str().unwrap().to_string();
    let (_, list) = s.call("GET", "/api/customers/shop1/backups", None).await;
    let row = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == backup.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["kind"], "pre-upgrade");
    assert_eq!(row["task"], task);
    sql(&s.pg.url(), "CREATE DATABASE shop1_restored").await;
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bins::jobs());
    cmd.args([
        "restore",
        &backup,
        "--customer",
        "shop1",
        "--target-db",
        &s.db_url("shop1_restored"),
    ])
    .arg("--target-root")
    .arg(scratch.path())
    .env("PORTICO_AUTH__JWT_SECRET", portico_tests::TEST_SECRET);
    for (k, v) in &s.jobs_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&s.db_url("shop1_restored"), "SELECT count(*) FROM items").await,
        ["2"]
    );
    assert!(
        scratch.path().join("backend/uploads/photo.jpg").exists()
            || files_with_sums(scratch.path())
                .keys()
                .any(|k| k.ends_with("photo.jpg"))
    );

    // Rollback on demand: 1.0.0 again, with the same switch and checks.
    let (st, body) = s.call("POST", "/api/customers/shop1/rollback", None).await;
    assert_eq!(st, 202, "{body}");
    assert_eq!(body["to"], "1.0.0");
    let t = s.finished("shop1", body["task"].as_i64().unwrap()).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(s.current(), "releases/1.0.0");
    assert_eq!(s.get("", "/").await, (200, "store 1.0.0".into()));
    let (_, site) = s.call("GET", "/api/customers/shop1/site", None).await;
    assert_eq!(site["version"], "1.0.0", "{site}");
    assert_eq!(site["previous_version"], "2.0.0", "{site}");
    // Every request and outcome audited.
    let (_, audit) = s.call("GET", "/api/audit?customer=shop1", None).await;
    let actions = audit.to_string();
    for a in [
        "upgrade.request",
        "task.upgrade",
        "rollback.request",
        "task.rollback",
        "serve.request",
    ] {
        assert!(actions.contains(a), "no {a} in the audit log: {actions}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_leave_the_old_release_serving_and_bad_targets_change_nothing() {
    let s = Stack::start("shop2.test", false);
    s.old_shop("shop2").await;

    // Refused before anything is changed, each with its reason.
    for (to, status, code) in [
        ("5.0.0", 409, "incompatible"),
        ("9.9.9", 404, "not_found"),
        ("2.1.0", 422, "checksum_mismatch"),
        ("two", 400, "invalid_version"),
    ] {
        let (st, body) = s.upgrade("shop2", to).await;
        assert_eq!(
            (st, body["error"].as_str().unwrap_or_default()),
            (status, code),
            "{to}: {body}"
        );
    }
    let (_, tasks) = s.call("GET", "/api/customers/shop2/tasks", None).await;
    assert_eq!(
        tasks["tasks"].as_array().unwrap().len(),
        1,
        "only the serve task: {tasks}"
    );
    assert!(s.tree().join("backend").is_dir(), "the old layout is untouched");
    assert!(!s.tree().join("releases").exists());
    let (_, list) = s.call("GET", "/api/customers/shop2/backups", None).await;
    assert_eq!(list["backups"].as_array().unwrap().len(), 0);

    // A build that fails: 1.0.0 still serves, `current` is 1.0.0, the task
    // names the step and its last lines.
    let (st, body) = s.upgrade("shop2", "3.0.0").await;
    assert_eq!(st, 202, "{body}");
    let t = s.finished("shop2", body["task"].as_i64().unwrap()).await;
    assert_eq!(t["state"], "failed", "{t}");
    let err = t["error"].as_str().unwrap();
    assert!(err.contains("build of store failed"), "{err}");
    assert!(err.contains("ERROR in src/app.ts"), "{err}");
    assert_eq!(s.current(), "releases/1.0.0");
    assert_eq!(s.get("", "/").await, (200, "store 1.0.0".into()));
    assert!(
        s.tree().join("releases/3.0.0/store").is_dir(),
        "the failed release stays for inspection"
    );

    // Healthy at first, broken after the switch: back on 1.0.0 by itself.
    let (st, body) = s.upgrade("shop2", "4.0.0").await;
    assert_eq!(st, 202, "{body}");
    let t = s.finished("shop2", body["task"].as_i64().unwrap()).await;
    assert_eq!(t["state"], "failed", "{t}");
    let err = t["error"].as_str().unwrap();
    assert!(err.contains("switched back to 1.0.0 (healthy)"), "{err}");
    assert_eq!(s.current(), "releases/1.0.0");
    assert_eq!(s.get("", "/").await, (200, "store 1.0.0".into()));
    assert_eq!(s.get("", "/static/app.js").await, (200, "console.log(1)".into()));
    let (_, site) = s.call("GET", "/api/customers/shop2/site", None).await;
    assert_eq!(site["version"], "1.0.0", "{site}");
    let programs = s.sup.programs();
    assert!(!programs.contains("4_0_0"), "green still runs: {programs}");
}

/// How a test sees that the upgrade is in a phase.
type Phase = Box<dyn Fn(&Stack) -> bool>;

/// Waits (polling fast) until `cond` holds, then returns.
async fn when(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never saw {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jobs_process_killed_in_every_phase_leaves_a_serving_release_and_the_retry_completes() {
    // A throttled backup: the phase lasts long enough to be caught.
    let mut s = Stack::start_with(
        "shop3.test",
        true,
        &[("PORTICO_JOBS__BACKUP_MAX_BYTES_PER_SEC", "4000000".into())],
    );
    s.old_shop("shop3").await;
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(s.tree().join("backend/uploads/video.mp4"), &big).unwrap();
    let (st, body) = s.upgrade("shop3", "2.0.0").await;
    assert_eq!(st, 202, "{body}");
    let task = body["task"].as_i64().unwrap();
    let tree = s.tree();
    let green_conf = |sup: &Supervisor| {
        std::fs::read_dir(sup.dir.path().join("conf.d"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("2_0_0"))
    };
    let phases: [(&str, Phase); 5] = [
        (
            "backup",
            Box::new(|s: &Stack| {
                std::fs::read_dir(s.tree().join("backups"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.path().join("uploads.tar.gz").exists() || e.path().join("db.dump").exists())
            }),
        ),
        (
            "unpack",
            Box::new(|s: &Stack| s.tree().join("releases/.2.0.0.partial/backend").exists()),
        ),
        (
            "build",
            Box::new(|s: &Stack| s.tree().join("releases/2.0.0/store/.building").exists()),
        ),
        ("green start", Box::new(move |s: &Stack| green_conf(&s.sup))),
        ("switch", Box::new(|s: &Stack| s.current() == "releases/2.0.0")),
    ];
    for (phase, cond) in phases.iter() {
        when(phase, || cond(&s)).await;
        s.kill_jobs();
        // Whatever the phase: `current` is a complete release that serves.
        let cur = s.current();
        assert!(
            tree.join(&cur).join(".portico-release").exists() || tree.join("backend").is_dir(),
            "{phase}: current `{cur}` incomplete"
        );
        let (st, body) = s.get("", "/").await;
        assert_eq!(st, 200, "{phase}: {body}");
        s.start_jobs();
    }
    let t = s.finished("shop3", task).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert!(t["attempt"].as_i64().unwrap() >= 6, "{t}");
    assert_eq!(s.current(), "releases/2.0.0");
    assert_eq!(s.get("", "/").await, (200, "store 2.0.0".into()));
    assert_eq!(s.get("api.", "/").await, (200, "backend 2.0.0".into()));
    // One pre-upgrade backup, not one per attempt; uploads in one place.
    let (_, list) = s.call("GET", "/api/customers/shop3/backups", None).await;
    let pre: Vec<_> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "pre-upgrade")
        .collect();
    assert_eq!(pre.len(), 1, "{list}");
    assert_eq!(std::fs::read(tree.join("shared/uploads/video.mp4")).unwrap(), big);
    // Three instances run: the dead attempts' greens were replaced.
    let programs = s.sup.programs();
    assert_eq!(programs.matches("RUNNING").count(), 3, "{programs}");
    assert_eq!(
        rows(&s.db_url("shop3"), "SELECT count(*) FROM v2_things").await,
        ["1"]
    );
}

#[test]
fn a_broken_release_catalog_stops_the_jobs_service_naming_the_entry_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("releases.json");
    let svc = json!({ "archive": "a.tar.gz", "sha256": "ab".repeat(32), "start": "run", "health": ["/"] });
    let bad = json!({ "releases": [{ "version": "2.0.0", "upgradable_from": ["~1"],
        "services": { "backend": svc, "admin": svc, "store": { "archive": "../x.tar.gz", "sha256": "ab".repeat(32), "start": "run", "health": ["/"] } } }] });
    std::fs::write(&path, bad.to_string()).unwrap();
    let mut cmd = Command::new(bins::jobs());
    cmd.env("PORTICO_AUTH__JWT_SECRET", portico_tests::TEST_SECRET)
        .env("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("PORTICO_JOBS__UPGRADE__RELEASES", &path);
    let mut p = Proc::spawn("jobs", cmd, &dir.path().join("jobs.log"));
    let status = p.wait_exit(Duration::from_secs(20));
    let err = p.log();
    if status.is_none() {
        p.stop("KILL", Duration::from_secs(5));
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "the service started anyway: {err}"
    );
    assert!(
        err.contains("releases[0] (2.0.0): services.store.archive"),
        "{err}"
    );
}
