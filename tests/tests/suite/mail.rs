//! Mail migrations between two real Dovecot servers (passwd-file users,
//! maildirs), through the jobs service on real PostgreSQL: a generated
//! corpus (nested folders with non-ASCII names, every flag and keywords,
//! internal dates years apart, a 10 MB attachment, duplicate Message-Ids,
//! messages without one) is copied with identical per-folder counts, flags
//! and dates; a second sync copies nothing; a delta copies exactly the new
//! messages; a jobs process killed mid-sync leaves no duplicate and no gap;
//! the DNS gate, its roles, the override and the signed webhook.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use portico_tests::bins;
use portico_tests::client::{api_call, token_with_roles};
use portico_tests::dovecot::{Dovecot, Held};
use portico_tests::servers::{Postgres, Service, pg_bin};
use portico_tests::{eventually, free_port};
use serde_json::{Value, json};
use sha2::Sha256;

const ADMIN: &[&str] = &["super_admin"];
const USER: &str = "alice@shop.test";
const SRC_PW: &str = "src-Secret-4711";
const DST_PW: &str = "dst-Secret-0815";
const WEBHOOK: &str = "webhook-secret-for-tests";

/// Source folders (separator `.`, no SPECIAL-USE) and where they must land
/// on the destination (separator `/`, SPECIAL-USE folders).
const FOLDERS: &[(&str, &str)] = &[
    ("INBOX", "INBOX"),
    ("Itens Enviados", "Sent"),
    ("Rascunhos", "Drafts"),
    ("Projetos", "Projetos"),
    ("Projetos.Ação 2024", "Projetos/Ação 2024"),
    ("Çöp Kutusu", "Trash"),
];

/// Modified UTF-7, for CREATE and APPEND of non-ASCII names. The jobs
/// service's own encoder: Dovecot decodes what it stores, and `held()`
/// compares Dovecot's names, so a wrong encoding still fails the tests.
fn mutf7(s: &str) -> String {
    portico_jobs::kinds::mail::folders::encode(s)
}

fn message(i: usize, id: Option<&str>, extra: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Sender {i} <s{i}@old.example>\r\nTo: {USER}\r\nSubject: message {i} çé\r\nDate: Mon, 1 Jan 2018 10:00:00 +0000\r\n"
    );
    if let Some(id) = id {
        m.push_str(&format!("Message-ID: {id}\r\n"));
    }
    m.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n");
    m.push_str(&format!("Body of message {i}.\r\n"));
    for l in 0..extra {
        m.push_str(&format!(
            "line {l} of padding for message {i} ................................\r\n"
        ));
    }
    m.into_bytes()
}

const FLAGS: &[&str] = &[
    "",
    "\\Seen",
    "\\Seen \\Answered",
    "\\Flagged",
    "\\Seen \\Draft",
    "\\Seen $Work",
    "$Label1 \\Flagged \\Seen",
];

/// Fills the source with `n` messages (plus a 10 MB one and duplicates).
fn corpus(src: &Dovecot, n: usize, start: usize) {
    let mut imap = src.imap(USER, SRC_PW);
    if start == 0 {
        for (f, _) in FOLDERS.iter().skip(1) {
            imap.create(&mutf7(f));
        }
    }
    for i in start..start + n {
        let (folder, _) = FOLDERS[i % FOLDERS.len()];
        let id = if i % 97 == 0 {
            None
        } else {
            Some(format!("<m{i}@corpus.test>"))
        };
        let year = 2004 + (i % 20);
        let date = format!(
            "{:02}-{}-{year} {:02}:{:02}:00 +0000",
            1 + i % 28,
            ["Jan", "Mar", "Jun", "Oct"][i % 4],
            i % 24,
            i % 60
        );
        imap.append(
            &mutf7(folder),
            FLAGS[i % FLAGS.len()],
            &date,
            &message(i, id.as_deref(), i % 40),
        );
        // Every 150th message has a twin with the same Message-Id.
        if i % 150 == 1 {
            imap.append(
                &mutf7(folder),
                "\\Seen",
                &date,
                &message(i + 1_000_000, id.as_deref(), 1),
            );
        }
    }
    if start == 0 {
        let mut big = message(999_999, Some("<big@corpus.test>"), 0);
        big.extend(
            std::iter::repeat_n(b'x', 10 << 20)
                .collect::<Vec<u8>>()
                .chunks(76)
                .flat_map(|c| [c, b"\r\n"].concat()),
        );
        imap.append("INBOX", "\\Seen", "24-Dec-2010 18:30:00 +0100", &big);
    }
}

/// The source's messages with their folders mapped to the destination's.
fn expected(src: &Dovecot) -> Vec<Held> {
    let map: BTreeMap<String, String> = FOLDERS
        .iter()
        .map(|(s, d)| (s.to_string(), d.to_string()))
        .collect();
    let mut v: Vec<Held> = src
        .held(USER)
        .into_iter()
        .map(|mut h| {
            h.mailbox = map.get(&h.mailbox).cloned().unwrap_or(h.mailbox);
            h
        })
        .collect();
    v.sort();
    v
}

struct Stack {
    pg: Postgres,
    jobs: Option<Service>,
    port: u16,
    env: Vec<(&'static str, String)>,
    src: Dovecot,
    dst: Dovecot,
    _root: tempfile::TempDir,
}

impl Stack {
    fn start(extra: &[(&'static str, String)]) -> Option<Stack> {
        if !Dovecot::available() {
            eprintln!("SKIPPED LOUDLY: dovecot is not installed (scripts/test installs dovecot-imapd)");
            return None;
        }
        let src = Dovecot::start(".", &[], &[(USER, SRC_PW)]);
        let dst = Dovecot::start(
            "/",
            &[
                ("Sent", "\\Sent"),
                ("Drafts", "\\Drafts"),
                ("Trash", "\\Trash"),
                ("Junk", "\\Junk"),
                ("Archive", "\\Archive"),
            ],
            &[(USER, DST_PW)],
        );
        let pg = Postgres::start();
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut env = vec![
            ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}")),
            ("PORTICO_JOBS__POSTGRES_URL", pg.url()),
            ("PORTICO_JOBS__CUSTOMERS_ROOT", root.path().display().to_string()),
            (
                "PORTICO_JOBS__PG_BIN_DIR",
                pg_bin("pg_dump").parent().unwrap().display().to_string(),
            ),
            ("PORTICO_JOBS__LEASE_SECS", "3".into()),
            ("PORTICO_JOBS__REAP_SECS", "1".into()),
            (
                "PORTICO_JOBS__MAIL__KEYS__K1",
                "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=".into(),
            ),
            ("PORTICO_JOBS__MAIL__ACTIVE_KEY", "k1".into()),
            ("PORTICO_JOBS__MAIL__WEBHOOK_SECRET", WEBHOOK.into()),
        ];
        env.extend(extra.iter().cloned());
        let mut s = Stack {
            pg,
            jobs: None,
            port,
            env,
            src,
            dst,
            _root: root,
        };
        s.start_jobs();
        Some(s)
    }

    fn start_jobs(&mut self) {
        self.jobs = Some(Service::start(&bins::jobs(), &[], &self.env, self.port));
    }

    async fn call(&self, method: &str, path: &str, roles: &[&str], body: Option<Value>) -> (u16, Value) {
        api_call(self.port, method, path, roles, body).await
    }

    /// Customer `shop`, a job for shop.test and alice's mailbox (by CSV,
    /// with a bad line refused on its own).
    async fn job(&self) -> i64 {
        let (s, b) = self
            .call(
                "POST",
                "/api/customers",
                ADMIN,
                Some(json!({ "id": "shop", "domain": "shop.test" })),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = self
            .call(
                "POST",
                "/api/migration/jobs",
                &["technician"],
                Some(json!({
                    "customer": "shop", "domain": "shop.test", "source_type": "imap",
                    "source": { "host": "127.0.0.1", "port": self.src.port, "tls": false },
                    "destination": { "host": "127.0.0.1", "port": self.dst.port, "tls": false },
                })),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let job = b["id"].as_i64().unwrap();
        let csv = format!(
            "source_login,source_password,dest_login,dest_password\n{USER},{SRC_PW},{USER},{DST_PW}\nbroken line\n"
        );
        let r = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/api/migration/jobs/{job}/mailboxes/import",
                self.port
            ))
            .bearer_auth(token_with_roles("tech", &["technician"]))
            .body(csv)
            .send()
            .await
            .unwrap();
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["created"].as_array().unwrap().len(), 1, "{b}");
        assert_eq!(b["errors"][0]["line"], 3, "{b}");
        job
    }

    async fn sync(&self, job: i64, kind: &str) -> Value {
        let (s, b) = self
            .call(
                "POST",
                &format!("/api/migration/jobs/{job}/sync"),
                &["technician"],
                Some(json!({ "kind": kind })),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        self.finished(b["task"].as_i64().unwrap()).await
    }

    async fn finished(&self, task: i64) -> Value {
        eventually(
            Duration::from_secs(240),
            "the mail task to finish",
            || async move {
                let (_, t) = self
                    .call("GET", &format!("/api/customers/shop/tasks/{task}"), ADMIN, None)
                    .await;
                ["succeeded", "failed", "cancelled"]
                    .contains(&t["state"].as_str()?)
                    .then_some(t)
            },
        )
        .await
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn webhook(port: u16, body: &Value, sig: &str) -> (u16, Value) {
    let body = body.to_string();
    let r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/api/migration/webhooks/dns-applied"
        ))
        .header("x-portico-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corpus_is_copied_exactly_then_deltas_copy_only_what_is_new_and_the_gate_opens() {
    let Some(s) = Stack::start(&[]) else { return };
    corpus(&s.src, 2000, 0);
    let want = expected(&s.src);
    assert!(want.len() > 2000, "{}", want.len());
    let job = s.job().await;

    let (st, pre) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/preflight"),
            &["technician"],
            None,
        )
        .await;
    assert_eq!(st, 200, "{pre}");
    assert_eq!(pre["messages"], want.len(), "{pre}");
    assert!(pre["bytes"].as_u64().unwrap() > 10 << 20, "{pre}");

    let t = s.sync(job, "initial").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["copied"], want.len(), "{t}");
    // Same folders, counts, Message-Ids, flags (keywords too) and dates.
    let got = s.dst.held(USER);
    let counts = |v: &[Held]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for h in v {
            *m.entry(h.mailbox.clone()).or_default() += 1;
        }
        m
    };
    assert_eq!(counts(&got), counts(&want));
    assert_eq!(got, want, "messages differ");
    assert!(got.iter().any(|h| h.flags.contains("$Work")));
    assert!(got.iter().any(|h| h.size > 10 << 20));
    assert_eq!(t["result"]["ratio"], 1.0, "{t}");

    // Again: nothing copied.
    let t = s.sync(job, "delta").await;
    assert_eq!(t["result"]["copied"], 0, "{t}");
    let t = s.sync(job, "final").await;
    assert_eq!(t["result"]["copied"], 0, "{t}");
    // Ten new messages: exactly ten copied.
    corpus(&s.src, 10, 5000);
    let t = s.sync(job, "delta").await;
    assert_eq!(t["result"]["copied"], 10, "{t}");
    assert_eq!(s.dst.held(USER), expected(&s.src));

    // The verification report, per folder.
    let (_, v) = s
        .call(
            "GET",
            &format!("/api/migration/jobs/{job}/verify"),
            &["technician"],
            None,
        )
        .await;
    assert_eq!(v["gate"], "warning", "{v}");
    let folders = v["mailboxes"][0]["folders"].as_array().unwrap();
    assert!(
        folders
            .iter()
            .any(|f| f["source"] == "Projetos.Ação 2024" && f["destination"] == "Projetos/Ação 2024"),
        "{v}"
    );
    assert!(folders.iter().all(|f| f["verified"] == f["source_count"]), "{v}");

    // The gate: a technician may not approve; an ops_lead may at 1.0.
    let (st, _) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/approve-gate"),
            &["technician"],
            None,
        )
        .await;
    assert_eq!(st, 403);
    let (st, b) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/approve-gate"),
            &["ops_lead"],
            None,
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let (st, g) = s
        .call("GET", "/api/migration/gate?domain=shop.test", &["service"], None)
        .await;
    assert_eq!((st, g["gate"].as_str()), (200, Some("ready_for_dns")), "{g}");

    // The webhook: a bad signature is refused; a replay changes nothing.
    let body = json!({ "delivery_id": "d-1", "domain": "shop.test" });
    let (st, _) = webhook(s.port, &body, "sha256=00").await;
    assert_eq!(st, 401);
    let (st, b) = webhook(s.port, &body, &sign(body.to_string().as_bytes())).await;
    assert_eq!((st, b["gate"].as_str()), (200, Some("dns_applied")), "{b}");
    let (st, b) = webhook(s.port, &body, &sign(body.to_string().as_bytes())).await;
    assert_eq!((st, b["replayed"].as_bool()), (200, Some(true)), "{b}");

    // No password in clear anywhere in the database.
    let dump = std::process::Command::new(pg_bin("pg_dump"))
        .arg(s.pg.url())
        .output()
        .unwrap();
    assert!(dump.status.success());
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("mail_mailboxes"));
    assert!(
        !text.contains(SRC_PW) && !text.contains(DST_PW),
        "a password is in the database dump"
    );
    let (_, mbs) = s
        .call(
            "GET",
            &format!("/api/migration/jobs/{job}/mailboxes"),
            &["technician"],
            None,
        )
        .await;
    assert!(!mbs.to_string().contains("Secret"), "{mbs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn below_the_ratio_the_gate_stays_shut_until_a_super_admin_overrides() {
    // Messages over 20 kB are refused (counted as errors): 2 of 100.
    let Some(s) = Stack::start(&[("PORTICO_JOBS__MAIL__MAX_MESSAGE_BYTES", "20000".into())]) else {
        return;
    };
    let mut imap = s.src.imap(USER, SRC_PW);
    for i in 0..100 {
        let padding = if i % 50 == 7 { 400 } else { 2 };
        imap.append(
            "INBOX",
            "\\Seen",
            "01-Jan-2020 10:00:00 +0000",
            &message(i, Some(&format!("<r{i}@x>")), padding),
        );
    }
    let job = s.job().await;
    let t = s.sync(job, "initial").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["ratio"], 0.98, "{t}");
    assert_eq!(t["result"]["errors"], 2, "{t}");
    let (st, b) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/approve-gate"),
            &["ops_lead"],
            None,
        )
        .await;
    assert_eq!(st, 409, "{b}");
    assert!(b["message"].as_str().unwrap().contains("0.98"), "{b}");
    let (st, _) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/override-gate"),
            &["ops_lead"],
            Some(json!({ "reason": "customer accepts" })),
        )
        .await;
    assert_eq!(st, 403);
    let (st, b) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/override-gate"),
            ADMIN,
            Some(json!({ "reason": "two newsletters too big, customer accepts" })),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let (_, g) = s
        .call("GET", "/api/migration/gate?domain=shop.test", &["service"], None)
        .await;
    assert_eq!(g["gate"], "ready_for_dns");
    let (_, audit) = s.call("GET", "/api/audit?customer=shop", ADMIN, None).await;
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "mail.gate.override")
        .cloned()
        .unwrap();
    assert_eq!(
        entry["detail"]["reason"], "two newsletters too big, customer accepts",
        "{entry}"
    );
    assert_eq!(entry["actor"], "ops-person");
    // The report, as a page and as CSV.
    let get = |path: String| async move {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", s.port))
            .bearer_auth(token_with_roles("tech", &["technician"]))
            .send()
            .await
            .unwrap();
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        (ct, r.text().await.unwrap())
    };
    let (ct, page) = get(format!("/api/migration/jobs/{job}/report.html")).await;
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(
        page.contains("verified 98 of 100") && page.contains("class=\"short\""),
        "{page}"
    );
    let (ct, csv) = get(format!("/api/migration/jobs/{job}/report.csv")).await;
    assert!(ct.starts_with("text/csv"), "{ct}");
    assert!(
        csv.lines().any(|l| l == "alice@shop.test,INBOX,INBOX,100,98,98"),
        "{csv}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_process_killed_mid_sync_leaves_no_duplicate_and_no_gap() {
    // About 2 MB/s: the sync takes a few seconds and can be caught.
    let Some(mut s) = Stack::start(&[("PORTICO_JOBS__MAIL__MAX_BYTES_PER_SEC", "1500000".into())]) else {
        return;
    };
    corpus(&s.src, 600, 0);
    let want = expected(&s.src);
    let job = s.job().await;
    let (st, b) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/sync"),
            &["technician"],
            Some(json!({ "kind": "initial" })),
        )
        .await;
    assert_eq!(st, 202, "{b}");
    let task = b["task"].as_i64().unwrap();
    // Kill twice, each time with part of the mail copied.
    for round in 0..2 {
        let before = s.dst.held(USER).len();
        eventually(
            Duration::from_secs(60),
            "more messages at the destination",
            || async {
                let n = s.dst.held(USER).len();
                (n > before + 50 && n < want.len()).then_some(())
            },
        )
        .await;
        let mut j = s.jobs.take().unwrap();
        j.proc.signal("KILL");
        j.proc.wait_exit(Duration::from_secs(5));
        let partial = s.dst.held(USER).len();
        assert!(partial < want.len(), "round {round}: the sync had finished");
        s.start_jobs();
    }
    let t = s.finished(task).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert!(t["attempt"].as_i64().unwrap() >= 3, "{t}");
    assert_eq!(s.dst.held(USER), want, "duplicates or gaps after the crashes");
}

/// Creates customer `id` (domain `<id>.test`), a pst job and one mailbox;
/// uploads `pst`; returns (job, mailbox).
async fn pst_job(s: &Stack, id: &str, pst: Vec<u8>) -> (i64, i64) {
    file_job(s, id, "pst", pst).await
}

/// Like [`pst_job`] for any file source (`pst`, `tgz`).
async fn file_job(s: &Stack, id: &str, source_type: &str, file: Vec<u8>) -> (i64, i64) {
    let (st, b) = s
        .call(
            "POST",
            "/api/customers",
            ADMIN,
            Some(json!({ "id": id, "domain": format!("{id}.test") })),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let (st, b) = s
        .call(
            "POST",
            "/api/migration/jobs",
            &["technician"],
            Some(
                json!({ "customer": id, "domain": format!("{id}.test"), "source_type": source_type,
                         "destination": { "host": "127.0.0.1", "port": s.dst.port, "tls": false } }),
            ),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let job = b["id"].as_i64().unwrap();
    let (st, b) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/mailboxes"),
            &["technician"],
            Some(json!({ "source_login": "outlook.pst", "dest_login": USER, "dest_password": DST_PW })),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let mb = b["id"].as_i64().unwrap();
    let r = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/api/migration/jobs/{job}/mailboxes/{mb}/upload",
            s.port
        ))
        .bearer_auth(token_with_roles("tech", &["technician"]))
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    (job, mb)
}

async fn task_of(s: &Stack, customer: &str, job: i64, kind: &str) -> Value {
    let (st, b) = s
        .call(
            "POST",
            &format!("/api/migration/jobs/{job}/sync"),
            &["technician"],
            Some(json!({ "kind": kind })),
        )
        .await;
    assert_eq!(st, 202, "{b}");
    let task = b["task"].as_i64().unwrap();
    eventually(
        Duration::from_secs(120),
        "the PST task to finish",
        || async move {
            let (_, t) = s
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
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pst_fixture_imports_with_its_counts_and_a_damaged_one_imports_nothing() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/mail/sample.pst"
    );
    let Ok(pst) = std::fs::read(fixture) else {
        eprintln!("SKIPPED LOUDLY: {fixture} is not there");
        return;
    };
    let Some(s) = Stack::start(&[]) else { return };

    let (job, _) = pst_job(&s, "outlook", pst.clone()).await;
    let t = task_of(&s, "outlook", job, "initial").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["copied"], 10, "{t}");
    assert_eq!(t["result"]["ratio"], 1.0, "{t}");
    // The README's counts: 10 messages in dev_age_apache_org, all with a
    // Message-Id, read (Status: RO) and dated from their Date header.
    let held = s.dst.held(USER);
    assert_eq!(
        s.dst.counts(USER).get("dev_age_apache_org"),
        Some(&10),
        "{held:?}"
    );
    assert!(
        held.iter()
            .all(|h| h.message_id.starts_with('<') && h.flags == "\\Seen"),
        "{held:?}"
    );
    assert!(held.iter().all(|h| h.received.starts_with("20")), "{held:?}");
    // Again: nothing new.
    let t = task_of(&s, "outlook", job, "delta").await;
    assert_eq!(t["result"]["copied"], 0, "{t}");

    // Damaged copies: nothing imported, nothing verified, the gate shut.
    let mut flipped = pst.clone();
    flipped[..4].copy_from_slice(b"XXXX");
    for (id, bad) in [("flipped", flipped), ("truncated", pst[..100_000].to_vec())] {
        let before = s.dst.held(USER).len();
        let (job, _) = pst_job(&s, id, bad).await;
        let t = task_of(&s, id, job, "initial").await;
        assert_eq!(t["state"], "failed", "{id}: {t}");
        assert!(t["error"].as_str().unwrap().contains("readpst"), "{id}: {t}");
        assert_eq!(s.dst.held(USER).len(), before, "{id}: something was imported");
        let (_, v) = s
            .call(
                "GET",
                &format!("/api/migration/jobs/{job}/verify"),
                &["technician"],
                None,
            )
            .await;
        assert_eq!(
            (v["verified"].as_i64(), v["gate"].as_str()),
            (Some(0), Some("blocked")),
            "{id}: {v}"
        );
    }
}

/// A Zimbra-layout export: folders as directories, `*.eml` messages, each
/// with a bencoded `.eml.meta` (date in ms, flag letters).
fn zimbra_tgz(messages: &[(&str, &str, &str, i64)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, path, data).unwrap();
    };
    for (i, (folder, flags, id, ms)) in messages.iter().enumerate() {
        let body = format!(
            "From: z{i}@zimbra.example\nTo: {USER}\nSubject: zimbra {i}\nDate: Tue, 2 Feb 2016 10:00:00 +0000\nMessage-ID: {id}\n\nexported {i}\n"
        );
        let name = format!("{folder}/{i:04}-zimbra {i}.eml");
        add(&name, body.as_bytes());
        let meta = format!("d1:di{ms}e1:f{}:{flags}e", flags.len());
        add(&format!("{name}.meta"), meta.as_bytes());
    }
    add("Inbox.meta", b"d1:n5:Inboxe");
    tar.into_inner().unwrap().finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zimbra_export_imports_with_its_flags_and_dates() {
    let Some(s) = Stack::start(&[]) else { return };
    let tgz = zimbra_tgz(&[
        ("Inbox", "", "<z0@x>", 1_262_304_000_000),
        ("Inbox", "u", "<z1@x>", 1_420_070_400_000),
        ("Sent", "r", "<z2@x>", 1_577_836_800_000),
        ("Projects/2024", "f", "<z3@x>", 1_704_067_200_000),
        ("Drafts", "d", "<z4@x>", 1_704_067_200_000),
    ]);
    let (job, _) = file_job(&s, "zimbra", "tgz", tgz).await;
    let t = task_of(&s, "zimbra", job, "initial").await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["copied"], 5, "{t}");
    let held: BTreeMap<String, Held> = s
        .dst
        .held(USER)
        .into_iter()
        .map(|h| (h.message_id.clone(), h))
        .collect();
    let check = |id: &str, mailbox: &str, flags: &str, date: &str| {
        let h = &held[id];
        assert_eq!(
            (h.mailbox.as_str(), h.flags.as_str()),
            (mailbox, flags),
            "{id}: {h:?}"
        );
        assert!(h.received.starts_with(date), "{id}: {h:?}");
    };
    check("<z0@x>", "INBOX", "\\Seen", "2010-01-01");
    check("<z1@x>", "INBOX", "", "2015-01-01");
    check("<z2@x>", "Sent", "\\Answered \\Seen", "2020-01-01");
    check("<z3@x>", "Projects/2024", "\\Flagged \\Seen", "2024-01-01");
    check("<z4@x>", "Drafts", "\\Draft \\Seen", "2024-01-01");
    // An archive whose entry leaves its directory is refused whole.
    let (job, _) = file_job(&s, "evil", "tgz", {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        let mut h = tar::Header::new_gnu();
        let data = b"From: x\n\nx\n";
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../escape/a.eml\0");
        h.set_cksum();
        tar.append(&h, &data[..]).unwrap();
        tar.into_inner().unwrap().finish().unwrap()
    })
    .await;
    let t = task_of(&s, "evil", job, "initial").await;
    assert_eq!(t["state"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("TGZ"), "{t}");
}
