//! The jobs service against real PostgreSQL and the real pg_dump and
//! pg_restore: fast backups (contents, exclusions, checksums, modes),
//! restore into an emptied database and tree, retention, one task per
//! customer, a killed worker, the disk pre-check, roles, signed downloads
//! and progress events on the customer's ops conversation.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use portico_tests::client::{Ws, api_call, token_with_roles};
use portico_tests::servers::{Postgres, Service, pg_bin};
use portico_tests::{bins, eventually, free_port};
use serde_json::{Value, json};

const ADMIN: &[&str] = &["super_admin"];

struct Jobs {
    svc: Service,
    port: u16,
    pg: Postgres,
    root: tempfile::TempDir,
}

fn jobs_env(
    pg: &Postgres,
    root: &Path,
    port: u16,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let bin_dir = pg_bin("pg_dump").parent().unwrap().display().to_string();
    let mut env = vec![
        ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}")),
        ("PORTICO_JOBS__POSTGRES_URL", pg.url()),
        ("PORTICO_JOBS__CUSTOMERS_ROOT", root.display().to_string()),
        ("PORTICO_JOBS__PG_BIN_DIR", bin_dir),
        ("PORTICO_JOBS__DISK_RESERVE_BYTES", "0".into()),
        ("PORTICO_JOBS__LEASE_SECS", "3".into()),
        ("PORTICO_JOBS__REAP_SECS", "1".into()),
    ];
    env.extend(extra.iter().cloned());
    env
}

impl Jobs {
    fn start(extra: &[(&'static str, String)]) -> Jobs {
        let pg = Postgres::start();
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let svc = Service::start(&bins::jobs(), &[], &jobs_env(&pg, root.path(), port, extra), port);
        Jobs { svc, port, pg, root }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn call(&self, method: &str, path: &str, roles: &[&str], body: Option<Value>) -> (u16, Value) {
        api_call(self.port, method, path, roles, body).await
    }

    /// A customer `id` with database `id` (rows in `items`) and a tree.
    async fn customer(&self, id: &str, members: &[&str]) -> PathBuf {
        sql(&self.pg.url(), &format!("CREATE DATABASE {id}")).await;
        let db = db_url(&self.pg, id);
        sql(&db, "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g").await;
        let domain = format!("{id}.example.com");
        let tree = self.root.path().join(&domain);
        for (path, content) in [
            ("backend/package.json", "{\"version\": \"1.4.2\"}"),
            ("backend/src/app.js", "console.log('app')"),
            ("backend/.env", "SECRET=1"),
            ("backend/ecosystem.config.js", "module.exports = {}"),
            ("backend/node_modules/dep/index.js", "dep"),
            ("backend/logs/app.log", "log line"),
            ("backend/uploads/a.png", "PNGDATA"),
            ("backend/uploads/sub/b.txt", "b"),
            ("admin/index.js", "admin"),
            ("admin/.next/cache.bin", "cache"),
            ("store/index.js", "store"),
            ("store/dist/bundle.js", "bundle"),
        ] {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        let (s, body) = self
            .call(
                "POST",
                "/api/customers",
                ADMIN,
                Some(json!({ "id": id, "domain": domain, "database_url": db, "ops_members": members })),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        tree
    }

    async fn backup(&self, customer: &str) -> i64 {
        let (s, body) = self
            .call(
                "POST",
                &format!("/api/customers/{customer}/backups"),
                &["technician"],
                Some(json!({"type": "fast"})),
            )
            .await;
        assert_eq!(s, 202, "{body}");
        body["task"].as_i64().unwrap()
    }

    async fn finished(&self, customer: &str, task: i64) -> Value {
        eventually(Duration::from_secs(60), "the task to finish", || async move {
            let (_, t) = self
                .call(
                    "GET",
                    &format!("/api/customers/{customer}/tasks/{task}"),
                    ADMIN,
                    None,
                )
                .await;
            ["succeeded", "failed", "cancelled"]
                .contains(&t["state"].as_str()?)
                .then_some(t)
        })
        .await
    }

    async fn backups(&self, customer: &str) -> Vec<Value> {
        let (s, body) = self
            .call("GET", &format!("/api/customers/{customer}/backups"), ADMIN, None)
            .await;
        assert_eq!(s, 200, "{body}");
        body["backups"].as_array().unwrap().clone()
    }
}

fn db_url(pg: &Postgres, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port)
}

async fn sql(url: &str, q: &str) -> Vec<tokio_postgres::SimpleQueryMessage> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query(q).await.unwrap()
}

async fn rows(url: &str) -> Vec<String> {
    sql(url, "SELECT id || ':' || name FROM items ORDER BY id")
        .await
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    ring::digest::digest(&ring::digest::SHA256, &data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn entries(archive: &Path) -> Vec<String> {
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(archive).unwrap());
    tar::Archive::new(gz)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}

/// Every regular file under `dir` with its content.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let mut data = Vec::new();
                std::fs::File::open(&p).unwrap().read_to_end(&mut data).unwrap();
                out.insert(p.strip_prefix(base).unwrap().display().to_string(), data);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `portico-jobs restore <id> --customer shop` with `args`.
fn restore_cli(j: &Jobs, id: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bins::jobs());
    cmd.args(["restore", id, "--customer", "shop"])
        .args(args)
        .env("PORTICO_AUTH__JWT_SECRET", portico_tests::TEST_SECRET)
        .env("PORTICO_LOG__FORMAT", "json");
    for (k, v) in jobs_env(&j.pg, j.root.path(), j.port, &[]) {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A tar.gz whose one entry is named `name` verbatim (`tar` itself refuses
/// to write `..`, so the header is written by hand).
fn crafted_archive(name: &str) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    b.append(&header, &b"evil"[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[tokio::test]
async fn a_refused_or_failed_restore_changes_nothing() {
    let j = Jobs::start(&[]);
    let tree = j.customer("shop", &[]).await;
    let db = db_url(&j.pg, "shop");
    let t = j.backup("shop").await;
    assert_eq!(j.finished("shop", t).await["state"], "succeeded");
    let id = j.backups("shop").await[0]["id"].as_str().unwrap().to_string();
    let dir = tree.join("backups").join(&id);
    // Life goes on after the backup: a restore would change both of these.
    sql(&db, "UPDATE items SET name = 'changed since'").await;
    std::fs::write(tree.join("backend/src/app.js"), "changed since").unwrap();

    // The last archive of the manifest now holds an escaping entry, with a
    // checksum that matches (as an attacker with write access would make).
    let manifest_path = dir.join("backup.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let artifacts = manifest["artifacts"].as_array_mut().unwrap();
    let last = artifacts
        .iter_mut()
        .rev()
        .find(|a| a["file"].as_str().unwrap().ends_with(".tar.gz"))
        .unwrap();
    let file = last["file"].as_str().unwrap().to_string();
    let evil = crafted_archive("../escaped.txt");
    std::fs::write(dir.join(&file), &evil).unwrap();
    last["size"] = json!(evil.len());
    last["sha256"] = json!(sha256(&dir.join(&file)));
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();

    let rows_before = rows(&db).await;
    let files_before = files(&tree);
    let refused = restore_cli(&j, &id, &[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("would leave the target directory"), "{err}");
    assert_eq!(rows(&db).await, rows_before, "the database is untouched");
    assert_eq!(files(&tree), files_before, "the tree is untouched, byte for byte");
    assert!(!tree.parent().unwrap().join("escaped.txt").exists());

    // With good archives but a database that cannot be restored into, the
    // files moved into place are moved back.
    let t = j.backup("shop").await;
    assert_eq!(j.finished("shop", t).await["state"], "succeeded");
    let newest = j.backups("shop").await[0]["id"].as_str().unwrap().to_string();
    std::fs::write(tree.join("backend/src/app.js"), "changed again").unwrap();
    std::fs::write(tree.join("backend/uploads/a.png"), "changed too").unwrap();
    let files_before = files(&tree);
    let missing_db = db_url(&j.pg, "no_such_database");
    let failed = restore_cli(&j, &newest, &["--target-db", &missing_db]);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("pg_restore failed"));
    assert_eq!(
        files(&tree),
        files_before,
        "files rolled back after the database failed"
    );
    assert_eq!(rows(&db).await, rows_before);
}

#[tokio::test]
async fn a_fast_backup_verifies_and_restores_rows_and_files() {
    let j = Jobs::start(&[]);
    let tree = j.customer("shop", &[]).await;
    let db = db_url(&j.pg, "shop");
    let before_rows = rows(&db).await;
    let before_files: BTreeMap<_, _> = files(&tree)
        .into_iter()
        .filter(|(k, _)| {
            !k.contains("node_modules")
                && !k.contains("/logs/")
                && !k.contains(".next")
                && !k.contains("dist/")
        })
        .collect();

    let task = j.backup("shop").await;
    let t = j.finished("shop", task).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let list = j.backups("shop").await;
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();
    let dir = tree.join("backups").join(&id);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // The manifest lists every artifact; each checksum and size verifies.
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["type"], "fast");
    assert_eq!(manifest["versions"]["backend"], "1.4.2");
    assert!(manifest["engine"]["postgresql"].as_str().is_some(), "{manifest}");
    let names: Vec<&str> = manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["file"].as_str().unwrap())
        .collect();
    for want in [
        "db.dump",
        "backend.tar.gz",
        "admin.tar.gz",
        "store.tar.gz",
        "uploads.tar.gz",
        "env-pm2.tar.gz",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    for a in manifest["artifacts"].as_array().unwrap() {
        let p = dir.join(a["file"].as_str().unwrap());
        assert_eq!(sha256(&p), a["sha256"].as_str().unwrap(), "{p:?}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), a["size"].as_u64().unwrap());
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600,
            "{p:?}"
        );
    }
    // Exclusions: dependencies, build output, logs; uploads have their own archive.
    let backend = entries(&dir.join("backend.tar.gz"));
    assert!(backend.iter().any(|e| e == "backend/src/app.js"), "{backend:?}");
    for bad in ["node_modules", "logs", "uploads"] {
        assert!(
            !backend.iter().any(|e| e.contains(bad)),
            "{bad} excluded: {backend:?}"
        );
    }
    assert!(
        !entries(&dir.join("admin.tar.gz"))
            .iter()
            .any(|e| e.contains(".next"))
    );
    assert!(
        !entries(&dir.join("store.tar.gz"))
            .iter()
            .any(|e| e.contains("dist"))
    );
    assert!(entries(&dir.join("uploads.tar.gz")).contains(&"backend/uploads/sub/b.txt".to_string()));
    assert!(entries(&dir.join("env-pm2.tar.gz")).contains(&"backend/.env".to_string()));
    let listed = Command::new(pg_bin("pg_restore"))
        .arg("--list")
        .arg(dir.join("db.dump"))
        .output()
        .unwrap();
    assert!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("TABLE public items")
    );

    // Empty the database and damage the tree, then restore.
    sql(&db, "DROP TABLE items").await;
    std::fs::remove_dir_all(tree.join("backend/uploads")).unwrap();
    std::fs::write(tree.join("backend/src/app.js"), "tampered").unwrap();
    let restore = |dry: bool| restore_cli(&j, &id, if dry { &["--dry-run"] } else { &[] });
    let dry = restore(true);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains("backend/uploads/a.png") && plan.contains("backend/src/app.js"),
        "{plan}"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("backend/src/app.js")).unwrap(),
        "tampered",
        "dry run changes nothing"
    );
    let done = restore(false);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(rows(&db).await, before_rows, "identical rows");
    let after: BTreeMap<_, _> = files(&tree)
        .into_iter()
        .filter(|(k, _)| before_files.contains_key(k))
        .collect();
    assert_eq!(after, before_files, "identical files");

    // A corrupted artifact stops a restore before anything is touched.
    std::fs::write(dir.join("store.tar.gz"), "corrupt").unwrap();
    let refused = restore(false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("checksum mismatch"));
}

#[tokio::test]
async fn roles_signed_links_and_the_audit_log() {
    let j = Jobs::start(&[]);
    j.customer("shop", &[]).await;
    let t = j.backup("shop").await;
    assert_eq!(j.finished("shop", t).await["state"], "succeeded");
    let id = j.backups("shop").await[0]["id"].as_str().unwrap().to_string();

    assert_eq!(
        j.call("GET", "/api/customers/shop/backups", &[], None).await.0,
        401,
        "no token"
    );
    assert_eq!(
        j.call("GET", "/api/customers/shop/backups", &["customer"], None)
            .await
            .0,
        403,
        "no staff role"
    );
    assert_eq!(
        j.call(
            "POST",
            "/api/customers",
            &["ops_lead"],
            Some(json!({"id": "x", "domain": "x.example.com"}))
        )
        .await
        .0,
        403
    );
    for (bad, code) in [
        (json!({"id": "Bad_Id", "domain": "x.example.com"}), "invalid_id"),
        (json!({"id": "x", "domain": "not a domain"}), "invalid_domain"),
        (
            json!({"id": "x", "domain": "x.example.com", "database_url": "nope://"}),
            "invalid_database_url",
        ),
    ] {
        let (s, body) = j.call("POST", "/api/customers", ADMIN, Some(bad)).await;
        assert_eq!((s, body["error"].as_str()), (400, Some(code)), "{body}");
    }
    let (s, body) = j
        .call("DELETE", "/api/customers/shop/backups/..%2F..", ADMIN, None)
        .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_backup_id")),
        "{body}"
    );
    let (s, body) = j
        .call(
            "POST",
            "/api/customers/shop/backups",
            ADMIN,
            Some(json!({"type": "slow"})),
        )
        .await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_type")));
    let (s, _) = j
        .call(
            "POST",
            "/api/customers/shop/backups",
            ADMIN,
            Some(json!({"type": "fast", "extra": 1})),
        )
        .await;
    assert_eq!(s, 400, "unknown fields are refused");

    let (s, links) = j
        .call(
            "POST",
            &format!("/api/customers/shop/backups/{id}/links"),
            &["technician"],
            None,
        )
        .await;
    assert_eq!(s, 200, "{links}");
    let url = links["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["file"] == "db.dump")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let http = reqwest::Client::new();
    let full = http.get(j.url(&url)).send().await.unwrap();
    assert_eq!(full.status(), 200);
    let len: u64 = full.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = full.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, len);
    let part = http
        .get(j.url(&url))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap(), bytes.slice(0..10));
    let tampered = url.replace("file=db.dump", "file=backend.tar.gz");
    assert_eq!(http.get(j.url(&tampered)).send().await.unwrap().status(), 403);
    let expires = url.split("expires=").nth(1).unwrap().split('&').next().unwrap();
    let earlier = url.replace(&format!("expires={expires}"), "expires=1");
    assert_eq!(
        http.get(j.url(&earlier)).send().await.unwrap().status(),
        403,
        "expiry is signed"
    );
    let traversal = url.replace("file=db.dump", "file=../../../../etc/passwd");
    assert_eq!(http.get(j.url(&traversal)).send().await.unwrap().status(), 403);
    let unsigned = format!("/api/customers/shop/backups/{id}/download?file=db.dump");
    assert_eq!(http.get(j.url(&unsigned)).send().await.unwrap().status(), 403);

    let path = format!("/api/customers/shop/backups/{id}");
    assert_eq!(
        j.call("DELETE", &path, &["technician"], None).await.0,
        403,
        "technicians may not delete"
    );
    assert_eq!(j.call("DELETE", &path, &["ops_lead"], None).await.0, 204);
    assert!(j.backups("shop").await.is_empty());
    assert!(!j.root.path().join("shop.example.com/backups").join(&id).exists());

    let (s, audit) = j
        .call("GET", "/api/audit?customer=shop", &["ops_lead"], None)
        .await;
    assert_eq!(s, 200);
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "customer.create",
        "backup.create",
        "task.backup",
        "backup.links",
        "backup.delete",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    assert_eq!(j.call("GET", "/api/audit", &["technician"], None).await.0, 403);
}

#[tokio::test]
async fn six_backups_keep_five_and_one_task_per_customer() {
    let j = Jobs::start(&[("PORTICO_JOBS__BACKUP_MAX_BYTES_PER_SEC", "2000000".into())]);
    let tree = j.customer("shop", &[]).await;
    j.customer("other", &[]).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let t = j.backup("shop").await;
        assert_eq!(j.finished("shop", t).await["state"], "succeeded");
        ids.push(j.backups("shop").await[0]["id"].as_str().unwrap().to_string());
    }
    let kept: Vec<String> = j
        .backups("shop")
        .await
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert!(
        !kept.contains(&ids[0]) && !tree.join("backups").join(&ids[0]).exists(),
        "the oldest is gone"
    );

    // A slow backup (6 MB at 2 MB/s): a second one for the same customer
    // is refused with 409 naming it; another customer's runs.
    std::fs::write(tree.join("backend/uploads/big.bin"), vec![7u8; 6_000_000]).unwrap();
    let running = j.backup("shop").await;
    let (s, body) = j
        .call(
            "POST",
            "/api/customers/shop/backups",
            ADMIN,
            Some(json!({"type": "fast"})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(&running.to_string()),
        "{body}"
    );
    let other = j.backup("other").await;
    assert_eq!(j.finished("other", other).await["state"], "succeeded");

    // Cancelled mid-way: the partial directory goes, the five stay.
    eventually(Duration::from_secs(20), "the slow backup to run", || async {
        let (_, t) = j
            .call(
                "GET",
                &format!("/api/customers/shop/tasks/{running}"),
                ADMIN,
                None,
            )
            .await;
        (t["progress"]["bytes"].as_u64()? > 0).then_some(())
    })
    .await;
    assert_eq!(
        j.call(
            "POST",
            &format!("/api/customers/shop/tasks/{running}/cancel"),
            ADMIN,
            None
        )
        .await
        .0,
        202
    );
    assert_eq!(j.finished("shop", running).await["state"], "cancelled");
    let after: Vec<String> = j
        .backups("shop")
        .await
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(after, kept, "a backup that did not succeed deletes nothing");
    let dirs = std::fs::read_dir(tree.join("backups")).unwrap().count();
    assert_eq!(dirs, 5, "no partial directory left");
}

#[tokio::test]
async fn a_killed_worker_s_task_is_taken_over_and_no_half_backup_is_listed() {
    let mut j = Jobs::start(&[("PORTICO_JOBS__BACKUP_MAX_BYTES_PER_SEC", "1000000".into())]);
    let tree = j.customer("shop", &[]).await;
    std::fs::write(tree.join("backend/uploads/big.bin"), vec![7u8; 4_000_000]).unwrap();
    let task = j.backup("shop").await;
    eventually(Duration::from_secs(20), "the backup to be half way", || async {
        let (_, t) = j
            .call("GET", &format!("/api/customers/shop/tasks/{task}"), ADMIN, None)
            .await;
        (t["progress"]["bytes"].as_u64()? > 500_000).then_some(())
    })
    .await;
    j.svc.proc.signal("KILL");
    j.svc.proc.wait_exit(Duration::from_secs(5));
    assert_eq!(
        std::fs::read_dir(tree.join("backups")).unwrap().count(),
        1,
        "a partial directory"
    );
    assert!(
        reqwest::get(j.url("/healthz")).await.is_err(),
        "the worker is gone"
    );

    // A new process: the reaper notices the lapsed lease, a worker takes
    // the task again (attempt 2), cleans the partial directory, finishes.
    let env = jobs_env(
        &j.pg,
        j.root.path(),
        j.port,
        &[("PORTICO_JOBS__BACKUP_MAX_BYTES_PER_SEC", "0".into())],
    );
    j.svc = Service::start(&bins::jobs(), &[], &env, j.port);
    let t = j.finished("shop", task).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempt"], 2);
    let list = j.backups("shop").await;
    assert_eq!(list.len(), 1);
    let dirs: Vec<_> = std::fs::read_dir(tree.join("backups"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(dirs.len(), 1, "only the complete backup");
    assert!(dirs[0].path().join("backup.json").exists());
}

#[tokio::test]
async fn a_task_that_recorded_its_backup_before_a_crash_does_not_make_another() {
    let j = Jobs::start(&[]);
    let tree = j.customer("shop", &[]).await;
    let task = j.backup("shop").await;
    let first = j.finished("shop", task).await;
    assert_eq!(first["state"], "succeeded");
    let id = first["result"]["backup"].as_str().unwrap().to_string();
    // The state a worker killed between writing the backup row and ending
    // the task leaves behind: still running, its lease lapsing.
    sql(
        &j.pg.url(),
        &format!(
            "UPDATE tasks SET state = 'running', result = NULL, finished_at = NULL,
             lease_until = now() - interval '1 second' WHERE id = {task}"
        ),
    )
    .await;
    let t = eventually(Duration::from_secs(20), "the re-run to end", || async {
        let (_, t) = j
            .call("GET", &format!("/api/customers/shop/tasks/{task}"), ADMIN, None)
            .await;
        (t["state"] == "succeeded" && t["attempt"].as_i64()? >= 2).then_some(t)
    })
    .await;
    assert_eq!(
        t["result"]["backup"],
        id.as_str(),
        "the recorded backup is the result: {t}"
    );
    assert_eq!(t["result"]["recovered"], true);
    assert_eq!(j.backups("shop").await.len(), 1, "no second backup row");
    assert_eq!(
        std::fs::read_dir(tree.join("backups")).unwrap().count(),
        1,
        "no second backup directory"
    );
}

#[tokio::test]
async fn a_failed_disk_precheck_refuses_the_backup() {
    let j = Jobs::start(&[("PORTICO_JOBS__DISK_RESERVE_BYTES", "1000000000000000000".into())]);
    j.customer("shop", &[]).await;
    let (s, body) = j
        .call(
            "POST",
            "/api/customers/shop/backups",
            ADMIN,
            Some(json!({"type": "fast"})),
        )
        .await;
    assert_eq!(s, 507, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not enough disk space"),
        "{body}"
    );
    assert!(j.backups("shop").await.is_empty());
}

#[tokio::test]
async fn progress_events_reach_the_customer_ops_conversation() {
    let (_chat, chat_port) = Service::chat(&[]);
    let j = Jobs::start(&[
        ("PORTICO_JOBS__CHAT_URL", format!("http://127.0.0.1:{chat_port}")),
        ("PORTICO_JOBS__BACKUP_MAX_BYTES_PER_SEC", "1000000".into()),
    ]);
    let tree = j.customer("shop", &["alice"]).await;
    std::fs::write(tree.join("backend/uploads/big.bin"), vec![7u8; 2_500_000]).unwrap();
    let mut alice = Ws::joined(chat_port, "alice", "ops-shop").await;
    let task = j.backup("shop").await;
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["event"] == "backup-completed") {
        let frame = alice.recv_type("message").await;
        let event: Value = serde_json::from_str(frame["body"].as_str().unwrap()).unwrap();
        assert_eq!(event["task"], task);
        seen.push(event);
    }
    let progress: Vec<&Value> = seen.iter().filter(|e| e["event"] == "backup-progress").collect();
    assert!(
        progress.len() >= 2,
        "at least once a second for a ~2.5 s backup: {seen:?}"
    );
    assert!(
        progress.iter().any(|e| e["data"]["eta_secs"].is_u64()),
        "{seen:?}"
    );
    assert!(
        progress.iter().any(|e| e["data"]["step"] == "uploads.tar.gz"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn without_a_database_the_api_says_what_is_missing() {
    let (_svc, port) = Service::jobs();
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/customers"))
        .bearer_auth(token_with_roles("ops-person", ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("jobs.postgres_url"),
        "{body}"
    );
}
