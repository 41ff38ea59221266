//! PaaS against the real Docker engine, real PostgreSQL, the jobs service
//! and the gateway: deploy a static site from a local git repository and
//! fetch it through the gateway by hostname (`/paas/<app>/` redirects there); the
//! container's limits and restart policy as `docker inspect` reads them; a
//! broken build and an unhealthy container leave the old version serving;
//! stop/start; delete removes container, image and route; a crashing
//! container is restarted three times and the app shows as failed; a jobs
//! process killed mid-deploy leaves nothing behind once its task re-runs.
//!
//! Images come from Debian's static busybox (`FROM scratch`): no registry.
//! Each test uses its own `paas.instance` and app names, so tests run in
//! parallel on one engine without touching each other's containers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use portico_tests::client::{Ws, api_call, token_with_roles};
use portico_tests::docker::{self, containers_of, images_of};
use portico_tests::servers::{EdgePorts, Postgres, Service};
use portico_tests::{bins, eventually, free_port};
use serde_json::{Value, json};

const DOMAIN: &str = "paas.test";

struct Stack {
    _chat: Service,
    chat_port: u16,
    pg: Postgres,
    jobs: Service,
    jobs_port: u16,
    gw: Service,
    edge: EdgePorts,
    repos: tempfile::TempDir,
    instance: String,
    apps: Vec<String>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for a in &self.apps {
            docker::purge(a);
        }
    }
}

fn jobs_env(
    pg: &Postgres,
    port: u16,
    repos: &Path,
    instance: &str,
    chat: u16,
) -> Vec<(&'static str, String)> {
    vec![
        ("PORTICO_JOBS__CHAT_URL", format!("http://127.0.0.1:{chat}")),
        ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}")),
        ("PORTICO_JOBS__POSTGRES_URL", pg.url()),
        ("PORTICO_JOBS__LEASE_SECS", "3".into()),
        ("PORTICO_JOBS__REAP_SECS", "1".into()),
        ("PORTICO_PAAS__LOCAL_REPOS_ROOT", repos.display().to_string()),
        ("PORTICO_PAAS__IMAGES__STATIC", docker::TEST_IMAGE.into()),
        ("PORTICO_PAAS__HEALTH__DEADLINE_SECS", "8".into()),
        ("PORTICO_PAAS__DOMAIN", DOMAIN.into()),
        ("PORTICO_PAAS__INSTANCE", instance.into()),
        ("PORTICO_PAAS__ROUTES_POLL_MS", "1000".into()),
    ]
}

impl Stack {
    /// None (after a loud message) when no Docker engine answers.
    fn start(instance: &str, apps: &[&str]) -> Option<Stack> {
        if !docker::available() {
            return None;
        }
        docker::test_image();
        for a in apps {
            docker::purge(a);
        }
        let (chat, chat_port) = Service::chat(&[]);
        let pg = Postgres::start();
        let repos = tempfile::tempdir().unwrap();
        let jobs_port = free_port();
        let env = jobs_env(&pg, jobs_port, repos.path(), instance, chat_port);
        let jobs = Service::start(&bins::jobs(), &[], &env, jobs_port);
        let edge = EdgePorts::free();
        let mut env = edge.env();
        env.extend(EdgePorts::unlimited());
        env.push((
            "PORTICO_GATEWAY__CHAT_SHARDS",
            format!("[\"127.0.0.1:{chat_port}\"]"),
        ));
        env.push(("PORTICO_GATEWAY__JOBS_UPSTREAM", format!("127.0.0.1:{jobs_port}")));
        env.push(("PORTICO_PAAS__DOMAIN", DOMAIN.into()));
        env.push(("PORTICO_PAAS__ROUTES_POLL_MS", "1000".into()));
        let gw = Service::gateway(&[], &env, &edge);
        Some(Stack {
            _chat: chat,
            chat_port,
            pg,
            jobs,
            jobs_port,
            gw,
            edge,
            repos,
            instance: instance.to_string(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
        })
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.repos.path().join(name)
    }

    async fn call(&self, method: &str, path: &str, roles: &[&str], body: Option<Value>) -> (u16, Value) {
        api_call(self.jobs_port, method, path, roles, body).await
    }

    /// An HTTPS client for the gateway that trusts its certificates and
    /// resolves `app.paas.test` (for each of `apps`) and localhost to it.
    fn edge(&self, apps: &[&str]) -> reqwest::Client {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.edge.https));
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.gw.certificate("localhost")).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(&self.gw.certificate(DOMAIN)).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .timeout(Duration::from_secs(10));
        for a in apps {
            b = b.resolve(&format!("{a}.{DOMAIN}"), addr);
        }
        b.build().unwrap()
    }

    fn app_url(&self, app: &str, path: &str) -> String {
        format!("https://{app}.{DOMAIN}:{}{path}", self.edge.https)
    }

    fn prefix_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.edge.https)
    }

    /// Creates `name` from `repo` (deploying it) and returns the task id.
    async fn create(&self, name: &str, repo: &Path) -> i64 {
        let (s, body) = self
            .call(
                "POST",
                "/api/apps",
                &["ops_lead"],
                Some(json!({ "name": name, "repo": repo })),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        body["task"].as_i64().expect("a deploy task")
    }

    async fn redeploy(&self, name: &str) -> i64 {
        let (s, body) = self
            .call("POST", &format!("/api/apps/{name}/deploy"), &["technician"], None)
            .await;
        assert_eq!(s, 202, "{body}");
        body["task"].as_i64().unwrap()
    }

    /// Waits for a task to end; returns its record.
    async fn finished(&self, app: &str, task: i64) -> Value {
        eventually(
            Duration::from_secs(180),
            "the deploy task to end",
            || async move {
                let (_, t) = self
                    .call(
                        "GET",
                        &format!("/api/apps/{app}/tasks/{task}"),
                        &["technician"],
                        None,
                    )
                    .await;
                ["succeeded", "failed", "cancelled"]
                    .contains(&t["state"].as_str().unwrap_or(""))
                    .then_some(t)
            },
        )
        .await
    }

    async fn deployed(&self, app: &str, task: i64) -> Value {
        let t = self.finished(app, task).await;
        assert_eq!(
            t["state"],
            "succeeded",
            "deploy of {app} failed: {t}\njobs log:\n{}",
            self.jobs.proc.log()
        );
        t
    }

    async fn app(&self, name: &str) -> Value {
        let (s, body) = self
            .call("GET", &format!("/api/apps/{name}"), &["technician"], None)
            .await;
        assert_eq!(s, 200, "{body}");
        body
    }

    /// GETs through the gateway until the body contains `want`.
    async fn serves(&self, http: &reqwest::Client, url: &str, want: &str) {
        let (http, url) = (http.clone(), url.to_string());
        eventually(
            Duration::from_secs(10),
            &format!("{url} to serve {want:?}"),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let r = http.get(&url).send().await.ok()?;
                    let status = r.status().as_u16();
                    let body = r.text().await.ok()?;
                    (status == 200 && body.contains(want)).then_some(())
                }
            },
        )
        .await;
    }
}

fn site(version: &str) -> Vec<(&'static str, String)> {
    vec![
        ("index.html", format!("<h1>hello {version}</h1>")),
        ("docs/index.html", format!("docs {version}")),
        (".dockerignore", "secret.txt\n".into()),
        ("secret.txt", "must not be copied".into()),
    ]
}

fn files<'a>(f: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    f.iter().map(|(p, c)| (*p, c.as_str())).collect()
}

/// A busybox httpd app with its own Dockerfile, serving `www/`.
fn dockerfile_app(body: &str, cmd: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "Dockerfile",
            format!(
                "FROM {}\nCOPY www /www\nEXPOSE 8080\nCMD {cmd}\n",
                docker::TEST_IMAGE
            ),
        ),
        ("www/index.html", body.to_string()),
    ]
}

const HTTPD: &str = r#"["httpd", "-f", "-p", "8080", "-h", "/www"]"#;

#[tokio::test]
async fn static_site_is_deployed_capped_and_served_by_name_and_prefix() {
    let Some(s) = Stack::start("pt-static", &["site"]) else {
        return;
    };
    let repo = s.repo("site");
    docker::git_repo(&repo, &files(&site("v1")));
    let task = s.create("site", &repo).await;
    let t = s.deployed("site", task).await;
    assert_eq!(t["result"]["type"], "static (.)", "{t}");
    assert!(
        t["progress"]["log"].as_array().is_some_and(|l| !l.is_empty()),
        "build log in progress: {t}"
    );

    let http = s.edge(&["site", "nope"]);
    s.serves(&http, &s.app_url("site", "/"), "hello v1").await;
    let r = http.get(s.app_url("site", "/")).send().await.unwrap();
    assert!(
        r.headers().get("strict-transport-security").is_some(),
        "security headers on app responses"
    );
    assert!(
        s.gw.proc.log().contains("\"app\":\"site\""),
        "the access log names the app"
    );
    // .dockerignore'd files never reach the image.
    let r = http.get(s.app_url("site", "/secret.txt")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // An app lives only on its own origin: the path prefix on a shared
    // host redirects there (any case of the name), never serves the app.
    for (path, to) in [
        ("/paas/site/", "/"),
        ("/paas/site", "/"),
        ("/paas/site/docs/?x=1", "/docs/?x=1"),
        ("/paas/SITE/docs/", "/docs/"),
    ] {
        let r = http.get(s.prefix_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 308, "{path}");
        assert_eq!(r.headers()["location"], s.app_url("site", to), "{path}");
    }
    s.serves(&http, &s.app_url("site", "/docs/"), "docs v1").await;

    // Unknown apps get a clean 404 page, by name and by prefix.
    let r = http.get(s.app_url("nope", "/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("No app"));
    assert_eq!(
        http.get(s.prefix_url("/paas/nope/"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let (st, list) = s.call("GET", "/api/apps", &["technician"], None).await;
    assert_eq!(st, 200);
    assert_eq!(list["apps"][0]["name"], "site", "{list}");
    assert_eq!(list["apps"][0]["kind"], "static", "{list}");
    // The limits, as Docker itself reports them.
    let app = s.app("site").await;
    let id = app["app"]["container"].as_str().unwrap().to_string();
    let host = docker::inspect(&id)["HostConfig"].clone();
    assert_eq!(host["Memory"], 256 * 1024 * 1024);
    assert_eq!(host["MemorySwap"], 256 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["RestartPolicy"]["Name"], "on-failure");
    assert_eq!(host["RestartPolicy"]["MaximumRetryCount"], 3);
    assert_eq!(host["PortBindings"]["8080/tcp"][0]["HostIp"], "127.0.0.1");
    let labels = &docker::inspect(&id)["Config"]["Labels"];
    assert_eq!(labels["portico.app"], "site");
    assert_eq!(labels["portico.instance"], s.instance);
    let image = app["app"]["image"].as_str().unwrap();
    assert_eq!(docker::inspect(image)["Config"]["Labels"]["portico.app"], "site");
    // Status with memory and CPU from Docker stats.
    assert_eq!(app["status"]["state"], "running", "{app}");
    assert!(
        app["status"]["stats"]["memory_bytes"].as_u64().unwrap() > 0,
        "{app}"
    );
    assert_eq!(app["status"]["stats"]["memory_limit_bytes"], 256 * 1024 * 1024);
    assert_eq!(app["url"], format!("https://site.{DOMAIN}/"));

    // Logs: httpd -vv logs each request.
    let logs = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/apps/site/logs?tail=50",
            s.jobs_port
        ))
        .bearer_auth(token_with_roles("ops-person", &["technician"]))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
    let text = logs.text().await.unwrap();
    assert!(
        text.contains("response:200"),
        "request lines in the container log: {text}"
    );

    // Follow: new lines arrive while the request stays open.
    let mut follow = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/apps/site/logs?tail=0&follow=true",
            s.jobs_port
        ))
        .bearer_auth(token_with_roles("ops-person", &["technician"]))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    http.get(s.app_url("site", "/docs/")).send().await.unwrap();
    let mut seen = String::new();
    while !seen.contains("url:/docs/") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), follow.chunk())
            .await
            .expect("a followed log line within 10 s")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(follow);

    let metrics = portico_tests::client::metrics(s.jobs_port).await;
    assert!(
        metrics.contains("portico_jobs_deploy_seconds_count{result=\"ok\"} 1"),
        "{metrics}"
    );
    portico_tests::client::promtool_check("jobs", &metrics);

    // Stop: a clean 503 page; start: served again.
    let (st, body) = s.call("POST", "/api/apps/site/stop", &["technician"], None).await;
    assert_eq!(st, 200, "{body}");
    eventually(Duration::from_secs(5), "503 for a stopped app", || {
        let (http, url) = (http.clone(), s.app_url("site", "/"));
        async move { (http.get(&url).send().await.ok()?.status() == 503).then_some(()) }
    })
    .await;
    let (st, body) = s
        .call("POST", "/api/apps/site/start", &["technician"], None)
        .await;
    assert_eq!(st, 200, "{body}");
    s.serves(&http, &s.app_url("site", "/"), "hello v1").await;
}

#[tokio::test]
async fn proxied_requests_and_redirects_never_reveal_the_private_port() {
    let Some(s) = Stack::start("pt-hide", &["echo"]) else {
        return;
    };
    let repo = s.repo("echo");
    let mut app = dockerfile_app("echo", HTTPD);
    // busybox httpd runs /cgi-bin scripts: one shows the request, one
    // redirects to the address the container believes it has.
    app.push((
        "www/cgi-bin/env",
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\nenv\n".into(),
    ));
    app.push((
        "www/cgi-bin/go",
        "#!/bin/sh\necho 'HTTP/1.1 302 Found'\necho 'Location: http://127.0.0.1:8080/landed?from=go'\necho\n"
            .into(),
    ));
    // Headers that would act beyond the app's origin, or name its address.
    app.push((
        "www/cgi-bin/reach",
        concat!(
            "#!/bin/sh\necho 'Content-Type: text/plain'\n",
            "echo 'Set-Cookie: s=1; Domain=paas.test; Path=/'\n",
            "echo 'Alt-Svc: h2=\"elsewhere.example:443\"'\n",
            "echo 'Refresh: 1; url=http://127.0.0.1:8080/next'\n",
            "echo 'Link: <http://127.0.0.1:8080/s.css>; rel=preload'\n",
            "echo\necho reach\n"
        )
        .into(),
    ));
    docker::git_repo(&repo, &files(&app[..2]));
    for (path, content) in &app[2..] {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    docker::commit(&repo, &[], "cgi scripts");
    let task = s.create("echo", &repo).await;
    s.deployed("echo", task).await;
    let host_port = s.app("echo").await["app"]["host_port"].as_u64().unwrap();
    let http = s.edge(&["echo"]);
    s.serves(&http, &s.app_url("echo", "/"), "echo").await;
    let public = format!("echo.{DOMAIN}:{}", s.edge.https);

    let by_name = http
        .get(s.app_url("echo", "/cgi-bin/env?x=1"))
        .send()
        .await
        .unwrap();
    let env = by_name.text().await.unwrap();
    assert!(env.contains("HTTP_X_FORWARDED_PROTO=https"), "{env}");
    assert!(env.contains(&format!("HTTP_X_FORWARDED_HOST={public}")), "{env}");
    assert!(
        env.contains(&format!("HTTP_HOST={public}")),
        "the app sees the public host: {env}"
    );
    assert!(!env.contains("HTTP_X_FORWARDED_PREFIX"), "{env}");

    let spoofed = http
        .get(s.app_url("echo", "/cgi-bin/env?x=1"))
        .header("x-forwarded-prefix", "/spoofed")
        .send()
        .await
        .unwrap();
    let env = spoofed.text().await.unwrap();
    assert!(!env.contains("spoofed"), "{env}");
    assert!(env.contains("QUERY_STRING=x=1"), "{env}");

    // The app's response cannot reach beyond its origin.
    let r = http
        .get(s.app_url("echo", "/cgi-bin/reach"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["set-cookie"], "s=1; Path=/", "host-only cookie");
    assert!(h.get("alt-svc").is_none());
    assert_eq!(h["refresh"], format!("1; url=https://{public}/next"));
    assert_eq!(h["link"], format!("<https://{public}/s.css>; rel=preload"));

    let r = http.get(s.app_url("echo", "/cgi-bin/go")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("https://{public}/landed?from=go")
    );
    for url in [
        s.app_url("echo", "/cgi-bin/go"),
        s.app_url("echo", "/cgi-bin/reach"),
        s.app_url("echo", "/"),
        s.app_url("echo", "/missing"),
    ] {
        let r = http.get(&url).send().await.unwrap();
        for (name, value) in r.headers() {
            let v = value.to_str().unwrap_or_default();
            assert!(
                !v.contains(&host_port.to_string()),
                "{url}: header {name}: {v} reveals port {host_port}"
            );
        }
    }
}

#[tokio::test]
async fn broken_redeploys_keep_the_old_version_serving() {
    let Some(s) = Stack::start("pt-broken", &["keep"]) else {
        return;
    };
    let repo = s.repo("keep");
    docker::git_repo(&repo, &files(&dockerfile_app("keep v1", HTTPD)));
    let task = s.create("keep", &repo).await;
    s.deployed("keep", task).await;
    let http = s.edge(&["keep"]);
    s.serves(&http, &s.app_url("keep", "/"), "keep v1").await;
    let v1 = s.app("keep").await["app"]["container"]
        .as_str()
        .unwrap()
        .to_string();

    // A build that fails: the task fails with the build output.
    let mut broken = dockerfile_app("keep v2", HTTPD);
    broken[0].1 = format!("FROM {}\nRUN echo about-to-fail && false\n", docker::TEST_IMAGE);
    docker::commit(&repo, &files(&broken), "broken build");
    let t = s.finished("keep", s.redeploy("keep").await).await;
    assert_eq!(t["state"], "failed", "{t}");
    let err = t["error"].as_str().unwrap();
    assert!(
        err.contains("image build failed") && err.contains("about-to-fail"),
        "{err}"
    );
    s.serves(&http, &s.app_url("keep", "/"), "keep v1").await;

    // A container that never answers: fails after the health deadline
    // with its last log lines; the old one still serves, the new is gone.
    docker::commit(
        &repo,
        &files(&dockerfile_app(
            "keep v3",
            r#"["sh", "-c", "echo starting-but-never-serving; sleep 3600"]"#,
        )),
        "never healthy",
    );
    let t = s.finished("keep", s.redeploy("keep").await).await;
    assert_eq!(t["state"], "failed", "{t}");
    let err = t["error"].as_str().unwrap();
    assert!(err.contains("never became healthy"), "{err}");
    assert!(
        err.contains("starting-but-never-serving"),
        "last log lines in the error: {err}"
    );
    s.serves(&http, &s.app_url("keep", "/"), "keep v1").await;
    assert_eq!(s.app("keep").await["app"]["container"], v1.as_str());
    assert_eq!(
        containers_of("keep"),
        vec![v1.clone()],
        "only the serving container is left"
    );

    // Cancelled while waiting for health: the new container goes, the old
    // one stays.
    let task = s.redeploy("keep").await;
    eventually(
        Duration::from_secs(60),
        "the deploy to wait for health",
        || async {
            let (_, t) = s
                .call(
                    "GET",
                    &format!("/api/apps/keep/tasks/{task}"),
                    &["technician"],
                    None,
                )
                .await;
            (t["progress"]["step"] == "health").then_some(())
        },
    )
    .await;
    let (st, body) = s
        .call(
            "POST",
            &format!("/api/apps/keep/tasks/{task}/cancel"),
            &["technician"],
            None,
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let t = s.finished("keep", task).await;
    assert_eq!(t["state"], "cancelled", "{t}");
    assert_eq!(containers_of("keep"), vec![v1.clone()]);
    s.serves(&http, &s.app_url("keep", "/"), "keep v1").await;

    // A good redeploy moves traffic and removes the old container, while
    // a client requesting all along never sees a failure.
    docker::commit(&repo, &files(&dockerfile_app("keep v4", HTTPD)), "fixed");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (http, url, stop) = (http.clone(), s.app_url("keep", "/"), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut bad) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => bad.push(r.status().to_string()),
                    Err(e) => bad.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, bad)
        })
    };
    s.deployed("keep", s.redeploy("keep").await).await;
    s.serves(&http, &s.app_url("keep", "/"), "keep v4").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad) = hammer.await.unwrap();
    assert!(ok > 50, "{ok} requests served during the redeploy");
    assert!(bad.is_empty(), "failed requests during the switch: {bad:?}");
    let v4 = s.app("keep").await["app"]["container"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(v4, v1);
    assert_eq!(
        containers_of("keep"),
        vec![v4],
        "{}",
        docker::docker(&[
            "ps",
            "-a",
            "--filter",
            "label=portico.app=keep",
            "--format",
            "{{.ID}} {{.Names}} {{.Status}} {{.Labels}}"
        ])
    );
    assert_eq!(images_of("keep").len(), 1, "the old image is removed too");
}

#[tokio::test]
async fn delete_removes_container_image_and_route() {
    let Some(s) = Stack::start("pt-delete", &["gone"]) else {
        return;
    };
    let repo = s.repo("gone");
    docker::git_repo(&repo, &files(&site("gone")));
    // Deploy events reach the app's conversation (its creator is a member).
    let (st, body) = s
        .call(
            "POST",
            "/api/apps",
            &["ops_lead"],
            Some(json!({ "name": "gone", "repo": repo, "deploy": false })),
        )
        .await;
    assert_eq!((st, &body["task"]), (201, &Value::Null), "{body}");
    let mut creator = Ws::joined(s.chat_port, "ops-person", "paas-gone").await;
    let task = s.redeploy("gone").await;
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["event"] == "deploy-completed") {
        let frame = creator.recv_type("message").await;
        let event: Value = serde_json::from_str(frame["body"].as_str().unwrap()).unwrap();
        assert_eq!(event["task"], task);
        assert_ne!(event["event"], "deploy-failed", "{event}");
        seen.push(event);
    }
    assert!(
        seen.iter()
            .any(|e| e["event"] == "deploy-progress"
                && e["data"]["log"].as_array().is_some_and(|l| !l.is_empty())),
        "progress with build lines: {seen:?}"
    );
    s.deployed("gone", task).await;
    let http = s.edge(&["gone"]);
    s.serves(&http, &s.app_url("gone", "/"), "hello gone").await;
    assert_eq!(containers_of("gone").len(), 1);
    assert_eq!(images_of("gone").len(), 1);

    let (st, body) = s.call("DELETE", "/api/apps/gone", &["technician"], None).await;
    assert_eq!(st, 403, "technicians cannot delete: {body}");
    let (st, body) = s.call("DELETE", "/api/apps/gone", &["ops_lead"], None).await;
    assert_eq!(st, 204, "{body}");
    assert!(containers_of("gone").is_empty());
    assert!(images_of("gone").is_empty());
    eventually(Duration::from_secs(5), "404 for a deleted app", || {
        let (http, url) = (http.clone(), s.app_url("gone", "/"));
        async move { (http.get(&url).send().await.ok()?.status() == 404).then_some(()) }
    })
    .await;
    let (st, _) = s.call("GET", "/api/apps/gone", &["technician"], None).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn a_crashing_container_is_restarted_three_times_then_shown_failed() {
    let Some(s) = Stack::start("pt-crash", &["crash"]) else {
        return;
    };
    let repo = s.repo("crash");
    // Serves for 3 s (long enough for the health gate), then exits 3.
    let cmd = r#"["sh", "-c", "httpd -p 8080 -h /www; sleep 3; echo crashing; exit 3"]"#;
    docker::git_repo(&repo, &files(&dockerfile_app("crash v1", cmd)));
    let task = s.create("crash", &repo).await;
    s.deployed("crash", task).await;
    let status = eventually(Duration::from_secs(90), "the app to show as failed", || async {
        let app = s.app("crash").await;
        (app["status"]["state"] == "failed").then_some(app)
    })
    .await;
    assert_eq!(status["status"]["container"]["restart_count"], 3, "{status}");
    assert_eq!(status["status"]["container"]["exit_code"], 3, "{status}");
    let id = status["app"]["container"].as_str().unwrap();
    let state = docker::inspect(id);
    assert_eq!(state["RestartCount"], 3);
    assert_eq!(state["State"]["Running"], false);
    // Visitors get a page, not a connection error.
    let http = s.edge(&["crash"]);
    let r = http.get(s.app_url("crash", "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("not answering"));
}

#[tokio::test]
async fn a_deploy_killed_half_way_is_rerun_and_leaves_no_orphans() {
    let Some(mut s) = Stack::start("pt-kill", &["slow"]) else {
        return;
    };
    let repo = s.repo("slow");
    // Answers only after 4 s: the worker is killed while it waits.
    let cmd = r#"["sh", "-c", "sleep 4; exec httpd -f -p 8080 -h /www"]"#;
    docker::git_repo(&repo, &files(&dockerfile_app("slow v1", cmd)));
    let task = s.create("slow", &repo).await;
    eventually(Duration::from_secs(120), "the deploy's container", || async {
        (!containers_of("slow").is_empty()).then_some(())
    })
    .await;
    s.jobs.proc.stop("KILL", Duration::from_secs(5));
    let orphan = containers_of("slow");
    assert_eq!(orphan.len(), 1);

    let env = jobs_env(&s.pg, s.jobs_port, s.repos.path(), &s.instance, s.chat_port);
    s.jobs = Service::start(&bins::jobs(), &[], &env, s.jobs_port);
    let t = s.deployed("slow", task).await;
    assert_eq!(t["attempt"], 2, "{t}");
    let serving = s.app("slow").await["app"]["container"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        containers_of("slow"),
        vec![serving.clone()],
        "the killed attempt's container is gone"
    );
    assert_ne!(orphan[0], serving);
    let http = s.edge(&["slow"]);
    s.serves(&http, &s.app_url("slow", "/"), "slow v1").await;

    // Leftovers of an ended task are swept when jobs starts; a container
    // of a task this database does not know is never touched.
    let fake = |task: &str| {
        docker::docker(&[
            "run",
            "-d",
            "--label",
            &format!("portico.instance={}", s.instance),
            "--label",
            "portico.app=slow",
            "--label",
            &format!("portico.task={task}"),
            docker::TEST_IMAGE,
            "sleep",
            "600",
        ])
        .trim()
        .to_string()
    };
    let leftover = fake(&task.to_string());
    let foreign = fake("999999");
    s.jobs.proc.stop("TERM", Duration::from_secs(10));
    s.jobs = Service::start(&bins::jobs(), &[], &env, s.jobs_port);
    eventually(Duration::from_secs(20), "the leftover to be swept", || async {
        (!containers_of("slow").contains(&leftover)).then_some(())
    })
    .await;
    let left = containers_of("slow");
    assert!(left.contains(&foreign) && left.contains(&serving), "{left:?}");
    s.serves(&http, &s.app_url("slow", "/"), "slow v1").await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_reasons() {
    let Some(s) = Stack::start("pt-bad", &["twice"]) else {
        return;
    };
    let outside = tempfile::tempdir().unwrap();
    docker::git_repo(outside.path(), &files(&site("x")));
    let inside = s.repo("ok");
    docker::git_repo(&inside, &files(&site("x")));
    let traversal = format!("{}/../../etc", s.repos.path().display());
    for (body, code) in [
        (json!({ "name": "Bad_Name", "repo": inside }), "invalid_name"),
        (json!({ "name": "-x", "repo": inside }), "invalid_name"),
        (json!({ "name": "a".repeat(64), "repo": inside }), "invalid_name"),
        (json!({ "name": "ok", "repo": outside.path() }), "invalid_repo"),
        (json!({ "name": "ok", "repo": traversal }), "invalid_repo"),
        (
            json!({ "name": "ok", "repo": "https://u:p@git.example.com/x.git" }),
            "invalid_repo",
        ),
        (json!({ "name": "ok", "repo": "ext::sh -c id" }), "invalid_repo"),
        (
            json!({ "name": "ok", "repo": "--upload-pack=id" }),
            "invalid_repo",
        ),
        (
            json!({ "name": "ok", "repo": inside, "ref": "$(id)" }),
            "invalid_ref",
        ),
        (
            json!({ "name": "ok", "repo": inside, "ref": "--help" }),
            "invalid_ref",
        ),
        (
            json!({ "name": "ok", "repo": inside, "health_path": "no-slash" }),
            "invalid_health_path",
        ),
        (json!({ "name": "ok", "repo": inside, "port": 0 }), "invalid_port"),
        (
            json!({ "name": "ok", "repo": inside, "extra": 1 }),
            "invalid_body",
        ),
    ] {
        let (st, resp) = s
            .call("POST", "/api/apps", &["super_admin"], Some(body.clone()))
            .await;
        assert_eq!((st, resp["error"].as_str()), (400, Some(code)), "{body} → {resp}");
    }
    let (st, _) = s
        .call(
            "POST",
            "/api/apps",
            &[],
            Some(json!({ "name": "ok", "repo": inside })),
        )
        .await;
    assert_eq!(st, 401);
    let (st, _) = s
        .call(
            "POST",
            "/api/apps",
            &["technician"],
            Some(json!({ "name": "ok", "repo": inside })),
        )
        .await;
    assert_eq!(st, 403);
    let (st, body) = s.call("GET", "/api/apps/NOPE", &["technician"], None).await;
    assert_eq!((st, body["error"].as_str()), (400, Some("invalid_name")));
    let (st, _) = s.call("GET", "/api/apps/nope", &["technician"], None).await;
    assert_eq!(st, 404);
    let (st, body) = s
        .call("GET", "/api/apps/nope/logs?tail=999999", &["technician"], None)
        .await;
    assert_eq!((st, body["error"].as_str()), (400, Some("invalid_tail")));
    // The routes the gateway reads are for services, not staff.
    let (st, _) = s.call("GET", "/api/paas/routes", &["technician"], None).await;
    assert_eq!(st, 403);
    // One active task per app.
    let (st, body) = s
        .call(
            "POST",
            "/api/apps",
            &["super_admin"],
            Some(json!({ "name": "twice", "repo": inside, "deploy": false })),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = s
        .call("POST", "/api/apps/twice/deploy", &["technician"], None)
        .await;
    assert_eq!(st, 202);
    let task = body["task"].as_i64().unwrap();
    let (st, body) = s
        .call("POST", "/api/apps/twice/deploy", &["technician"], None)
        .await;
    assert_eq!((st, body["error"].as_str()), (409, Some("app_busy")), "{body}");
    let (st, body) = s
        .call(
            "POST",
            "/api/apps",
            &["super_admin"],
            Some(json!({ "name": "twice", "repo": inside })),
        )
        .await;
    assert_eq!((st, body["error"].as_str()), (409, Some("exists")), "{body}");
    s.deployed("twice", task).await;
}
