//! The README's first command: `portico up` serves the demo over HTTPS and
//! two people can talk through the gateway (issue: foundation).

use std::time::Duration;

use portico_tests::client::{Ws, https_client, tls_config, token_with_roles};
use portico_tests::servers::{up, up_env, up_in, up_with};
use serde_json::json;

#[tokio::test]
async fn demo_page_over_https_and_two_tabs_talk() {
    let (svc, edge) = up();
    let ca = svc.certificate("localhost");
    let http = https_client(&ca);
    let base = format!("https://localhost:{}", edge.https);

    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert!(page.headers().contains_key("strict-transport-security"));
    assert!(page.text().await.unwrap().contains("Portico chat"));

    // Two "tabs": each gets a demo token and joins the lobby over wss.
    let mut tabs = Vec::new();
    for user in ["alice", "bob"] {
        let t: serde_json::Value = http
            .get(format!("{base}/demo/token?user={user}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let origin = format!("https://localhost:{}", edge.https);
        let token = t["token"].as_str().unwrap().to_string();
        let (mut ws, welcome) = Ws::via_gateway(edge.https, &token, &ca, &[("origin", &origin)]).await;
        assert_eq!(welcome["type"], "welcome");
        ws.send(json!({"type": "subscribe", "conv": "lobby"})).await;
        assert_eq!(ws.recv_type("subscribed").await["conv"], "lobby");
        tabs.push(ws);
    }
    tabs[0]
        .send(json!({"type": "publish", "conv": "lobby", "id": "m1", "body": "hi bob"}))
        .await;
    let got = tabs[1].recv_type("message").await;
    assert_eq!(got["body"], "hi bob");
    assert_eq!(got["from"], "alice");
    // The sender gets its ack and, being subscribed, the message once.
    let mut sender_saw = Vec::new();
    while sender_saw.len() < 2 {
        let f = tabs[0].recv().await;
        if f["type"] == "ack" || f["type"] == "message" {
            sender_saw.push(f);
        }
    }
    sender_saw.sort_by_key(|f| f["type"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        (sender_saw[0]["type"].as_str(), &sender_saw[0]["offset"]),
        (Some("ack"), &got["offset"])
    );
    assert_eq!(
        (sender_saw[1]["type"].as_str(), &sender_saw[1]["offset"]),
        (Some("message"), &got["offset"])
    );
    assert!(
        tabs[1].no_message_within(Duration::from_millis(300)).await,
        "delivered once"
    );
}

#[tokio::test]
async fn https_speaks_h2_and_http_redirects() {
    let (svc, edge) = up();
    let ca = svc.certificate("localhost");
    let resp = https_client(&ca)
        .get(format!("https://localhost:{}/healthz", edge.https))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);

    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://localhost:{}/a?b=1", edge.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://localhost:{}/a?b=1", edge.https)
    );

    // TLS 1.3 is what a modern client gets; plain text on the TLS port fails.
    let cfg = tls_config(&ca, &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", edge.https))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let err = plain
        .get(format!("http://localhost:{}/", edge.https))
        .send()
        .await;
    assert!(err.is_err(), "plain HTTP on the TLS port must fail: {err:?}");
}

#[tokio::test]
async fn static_text_is_gzipped_api_answers_are_not() {
    let (svc, edge) = up();
    let http = https_client(&svc.certificate("localhost"));
    let get = |path: &str| {
        http.get(format!("https://localhost:{}{path}", edge.https))
            .header("accept-encoding", "gzip")
            .send()
    };
    let js = get("/demo.js").await.unwrap();
    assert_eq!(
        js.headers().get("content-encoding").map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    let body = js.bytes().await.unwrap();
    assert_eq!(&body[..2], &[0x1f, 0x8b], "a gzip stream");
    // Tokens next to reflected input must not be compressed (BREACH).
    let token = get("/demo/token?user=gzipcheck").await.unwrap();
    assert_eq!(token.status(), 200);
    assert!(token.headers().get("content-encoding").is_none());
}

/// `up` needs no Docker: it starts, and the apps API says what is missing.
#[tokio::test]
async fn up_without_docker_says_where_it_looked() {
    let socket = "unix:///nonexistent/docker.sock";
    let (svc, edge) = up_with(&[("PORTICO_PAAS__DOCKER", socket.to_string())]);
    let http = https_client(&svc.certificate("localhost"));
    let r = http
        .get(format!("https://localhost:{}/api/apps", edge.https))
        .bearer_auth(token_with_roles("admin", &["super_admin"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "docker_unreachable", "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!("Docker engine not reachable at {socket}")),
        "{msg}"
    );
    // The rest of the stack is unaffected.
    let page = http
        .get(format!("https://localhost:{}/", edge.https))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
}

/// Posts `id` to conversation `keep` through the gateway as alice: its offset
/// and whether it was a retry.
async fn post(http: &reqwest::Client, https: u16, id: &str) -> (u64, bool) {
    let r: serde_json::Value = http
        .post(format!(
            "https://localhost:{https}/api/conversations/keep/messages"
        ))
        .bearer_auth(portico_tests::client::token("alice"))
        .json(&json!({"id": id, "body": format!("message {id}")}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        r["offset"].as_u64().unwrap_or_else(|| panic!("{r}")),
        r["duplicate"].as_bool().unwrap(),
    )
}

/// The offsets and ids of `keep`'s history, oldest first.
async fn history(http: &reqwest::Client, https: u16) -> Vec<(u64, String)> {
    let r: serde_json::Value = http
        .get(format!(
            "https://localhost:{https}/api/conversations/keep/messages?limit=50"
        ))
        .bearer_auth(portico_tests::client::token("bob"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn history_and_offsets_survive_sigkill_and_ctrl_c() {
    let (env, edge) = up_env(&[]);
    let mut svc = up_in(tempfile::tempdir().unwrap(), &env, &edge);
    let http = https_client(&svc.certificate("localhost"));
    let r = http
        .post(format!("https://localhost:{}/api/conversations", edge.https))
        .bearer_auth(portico_tests::client::token("alice"))
        .json(&json!({"id": "keep", "members": ["bob"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for (i, id) in ["m1", "m2", "m3"].iter().enumerate() {
        assert_eq!(post(&http, edge.https, id).await, (i as u64 + 1, false));
    }

    // Killed outright: nothing acknowledged is gone.
    svc.proc.signal("KILL");
    svc.proc.wait_exit(Duration::from_secs(10));
    let dir = std::mem::replace(&mut svc.dir, tempfile::tempdir().unwrap());
    drop(svc);
    let mut svc = up_in(dir, &env, &edge);
    let http = https_client(&svc.certificate("localhost"));
    let want: Vec<(u64, String)> = (1..=3).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(history(&http, edge.https).await, want, "history after SIGKILL");
    assert_eq!(
        post(&http, edge.https, "m2").await,
        (2, true),
        "a retry is still a retry"
    );
    assert_eq!(post(&http, edge.https, "m4").await, (4, false), "offsets go on");

    // Ctrl-C: a clean stop, the same.
    svc.proc.signal("INT");
    assert_eq!(
        svc.proc.wait_exit(Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0)
    );
    let dir = std::mem::replace(&mut svc.dir, tempfile::tempdir().unwrap());
    drop(svc);
    let svc = up_in(dir, &env, &edge);
    let http = https_client(&svc.certificate("localhost"));
    let want: Vec<(u64, String)> = (1..=4).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(history(&http, edge.https).await, want, "history after Ctrl-C");
}

#[tokio::test]
async fn portico_token_gives_staff_access_to_the_jobs_api() {
    // No secret given: `up` makes one under data/, as for a new user; and
    // no PostgreSQL (as where it is not installed).
    let (svc, edge) = up_with(&[
        ("PORTICO_AUTH__JWT_SECRET", String::new()),
        ("PORTICO_UP__POSTGRES", "false".into()),
    ]);
    assert!(svc.dir.path().join("jwt-secret").exists());
    let log = svc.proc.log();
    assert!(
        log.contains("portico token --role super_admin"),
        "the banner says how:\n{log}"
    );
    assert!(log.contains("need PostgreSQL"), "and what jobs lacks:\n{log}");
    let token = |args: &[&str]| {
        std::process::Command::new(portico_tests::bins::portico())
            .arg("token")
            .args(args)
            .env_remove("PORTICO_AUTH__JWT_SECRET")
            .env_remove("PORTICO_CONFIG")
            .env("PORTICO_DATA_DIR", svc.dir.path())
            .output()
            .unwrap()
    };
    let out = token(&["--role", "super_admin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let staff = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let http = https_client(&svc.certificate("localhost"));
    let url = format!("https://localhost:{}/api/customers", edge.https);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401, "no token");
    let r = http.get(&url).bearer_auth(&staff).send().await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "the token is accepted; the database is what is missing"
    );
    assert!(r.text().await.unwrap().contains("jobs.postgres_url"));

    let bad = token(&["--role", "root"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role `root`"));
}

#[tokio::test]
async fn with_postgresql_installed_up_backs_a_customer_up_end_to_end() {
    if !portico_tests::servers::pg_bin("initdb").is_file() {
        eprintln!("\n*** SKIPPED: PostgreSQL is not installed (scripts/test installs it) ***\n");
        return;
    }
    let (svc, edge) = up();
    let log = svc.proc.log();
    assert!(log.contains("a private PostgreSQL under"), "{log}");
    let pg = svc.dir.path().join("postgres");
    let read = |f: &str| std::fs::read_to_string(pg.join(f)).unwrap().trim().to_string();
    let db = format!(
        "postgres://portico:{}@127.0.0.1:{}/portico_jobs",
        read("password"),
        read("port")
    );
    // A demo shop under up's customers root; its database is the jobs one.
    let tree = svc.dir.path().join("customers/shop.example.com");
    for (path, content) in [
        ("backend/package.json", "{\"version\": \"1.0.0\"}"),
        ("backend/src/app.js", "app"),
        ("backend/.env", "SECRET=1"),
        ("backend/uploads/a.png", "PNG"),
        ("admin/index.js", "admin"),
        ("store/index.js", "store"),
    ] {
        let p = tree.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let http = https_client(&svc.certificate("localhost"));
    let base = format!("https://localhost:{}", edge.https);
    let staff = token_with_roles("ops", &["super_admin"]);
    let r = http
        .post(format!("{base}/api/customers"))
        .bearer_auth(&staff)
        .json(&json!({"id": "shop", "domain": "shop.example.com", "database_url": db}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r: serde_json::Value = http
        .post(format!("{base}/api/customers/shop/backups"))
        .bearer_auth(&staff)
        .json(&json!({"type": "fast"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task = r["task"].as_i64().unwrap_or_else(|| panic!("{r}"));
    let t = portico_tests::eventually(Duration::from_secs(60), "the backup", || {
        let (http, staff, base) = (http.clone(), staff.clone(), base.clone());
        async move {
            let t: serde_json::Value = http
                .get(format!("{base}/api/customers/shop/tasks/{task}"))
                .bearer_auth(&staff)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            matches!(t["state"].as_str(), Some("succeeded" | "failed")).then_some(t)
        }
    })
    .await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let backups: serde_json::Value = http
        .get(format!("{base}/api/customers/shop/backups"))
        .bearer_auth(&staff)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backups["backups"].as_array().map(Vec::len), Some(1), "{backups}");
}

/// The README's first command runs from a checkout with the data
/// directory `data` (relative): its private PostgreSQL must start there
/// too (it runs in its own directory, where a relative socket directory
/// used to fail), so the jobs API has its database.
#[tokio::test]
async fn a_relative_data_dir_still_gets_its_private_postgres() {
    if !portico_tests::servers::pg_bin("initdb").is_file() {
        eprintln!("\n*** SKIPPED: PostgreSQL is not installed (scripts/test installs it) ***\n");
        return;
    }
    let (env, edge) = up_env(&[]);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut svc = portico_tests::servers::Service::start_relative(
        dir,
        &portico_tests::bins::portico(),
        &["up"],
        &env,
        edge.admin,
    );
    edge.wait_listening(&mut svc.proc);
    assert!(root.join("data/postgres/data/PG_VERSION").is_file());
    let log = svc.proc.log();
    assert!(!log.contains("did not start"), "{log}");
    let http = https_client(&std::fs::read(root.join("data/certs/localhost.crt")).unwrap());
    let token = token_with_roles("ops", &["super_admin"]);
    let r = http
        .get(format!("https://localhost:{}/api/customers", edge.https))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// One `up` per data directory: a second one on the same directory is
/// refused at once with a message naming the directory and the running
/// process (it used to start without its PostgreSQL, whose files were in
/// use), and the first one keeps serving.
#[tokio::test]
async fn a_second_up_on_the_same_data_dir_is_refused() {
    let (svc, edge) = up();
    let (env, _) = up_env(&[]);
    let out = std::process::Command::new(portico_tests::bins::portico())
        .arg("up")
        .env_remove("PORTICO_CONFIG")
        .env("PORTICO_AUTH__JWT_SECRET", portico_tests::TEST_SECRET)
        .env("PORTICO_DATA_DIR", svc.dir.path())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("portico runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `portico up`"), "{err}");
    assert!(err.contains(&svc.dir.path().display().to_string()), "{err}");
    assert_eq!(
        portico_tests::servers::http_status(edge.admin, "/healthz"),
        Some(200),
        "the first one still serves"
    );
}
