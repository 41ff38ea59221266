//! The ops console in a real browser (Debian's headless Chromium through
//! chromedriver) and its sessions over raw HTTPS, against `portico up`
//! with its private PostgreSQL: a super admin logs in with the password
//! `up` generated, backs a customer up and watches the progress live,
//! downloads the archive, adds a technician; the technician is offered no
//! delete and a forged one is refused; logins are throttled and audited,
//! logout, password changes, disabling and a replayed refresh token end
//! sessions at once; the apps page deploys a repository and shows its
//! logs; the mail page shows a job's gate as the API reports it.
//! Screenshots go to `target/screenshots/console-*.png`.

use std::io::Read;
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use portico_tests::browser::{WATCH_ERRORS, browser, chromedriver, errors, screenshot, text_of};
use portico_tests::client::token_with_roles;
use portico_tests::servers::{EdgePorts, Service, pg_bin, up_with};
use serde_json::{Value, json};

struct Up {
    svc: Service,
    edge: EdgePorts,
    http: reqwest::Client,
    base: String,
    admin_password: String,
    staff: String,
}

impl Up {
    /// `portico up` with its private PostgreSQL, or `None` (loudly) where
    /// PostgreSQL is not installed.
    fn start(extra: &[(&'static str, String)]) -> Option<Up> {
        if !pg_bin("initdb").is_file() {
            eprintln!("\n*** SKIPPED: PostgreSQL is not installed (scripts/test installs it) ***\n");
            return None;
        }
        let mut env = extra.to_vec();
        env.extend(EdgePorts::unlimited());
        let (svc, edge) = up_with(&env);
        let log = svc.proc.log();
        assert!(log.contains("ops console: https://"), "{log}");
        let file =
            std::fs::read_to_string(svc.dir.path().join("console-admin.txt")).expect("up keeps the password");
        let admin_password = file
            .lines()
            .find_map(|l| l.strip_prefix("password: "))
            .expect("a password line")
            .to_string();
        assert!(
            log.contains(&admin_password),
            "the first start prints the password once"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(svc.dir.path().join("console-admin.txt"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the password file is private");
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&svc.certificate("localhost")).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let base = format!("https://localhost:{}", edge.https);
        Some(Up {
            svc,
            edge,
            http,
            base,
            admin_password,
            staff: token_with_roles("ops-bot", &["super_admin"]),
        })
    }

    fn jobs_db(&self) -> String {
        let pg = self.svc.dir.path().join("postgres");
        let read = |f: &str| std::fs::read_to_string(pg.join(f)).unwrap().trim().to_string();
        format!(
            "postgres://portico:{}@127.0.0.1:{}/portico_jobs",
            read("password"),
            read("port")
        )
    }

    /// A bearer (machine) API call.
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(&self.staff);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A customer `shop` with a database (the jobs one) and `upload_mb`
    /// of incompressible uploads, so that a backup takes a few seconds.
    async fn shop(&self, upload_mb: u64) {
        let tree = self.svc.dir.path().join("customers/shop.example.com");
        for (path, content) in [
            ("backend/package.json", "{\"version\": \"1.0.0\"}"),
            ("backend/src/app.js", "app"),
            ("backend/.env", "SECRET=1"),
            ("admin/index.js", "admin"),
            ("store/index.js", "store"),
        ] {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        std::fs::create_dir_all(tree.join("backend/uploads")).unwrap();
        let mut noise = Vec::new();
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .take(upload_mb << 20)
            .read_to_end(&mut noise)
            .unwrap();
        std::fs::write(tree.join("backend/uploads/video.bin"), noise).unwrap();
        let (s, b) = self
            .api(
                "POST",
                "/api/customers",
                Some(json!({"id": "shop", "domain": "shop.example.com", "database_url": self.jobs_db()})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }

    /// Logs in over HTTPS; the session's cookie header and CSRF token.
    async fn login(&self, account: &str, password: &str) -> Result<(String, String), (u16, Value)> {
        let r = self
            .http
            .post(format!("{}/api/auth/login", self.base))
            .json(&json!({"account": account, "password": password}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let cookies = set_cookies(&r);
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status != 200 {
            return Err((status, body));
        }
        Ok((cookies, body["csrf"].as_str().unwrap().to_string()))
    }

    /// A call with session cookies (and a CSRF token when given).
    async fn with_cookies(
        &self,
        method: &str,
        path: &str,
        cookies: &str,
        csrf: Option<&str>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("cookie", cookies);
        if let Some(t) = csrf {
            r = r.header("x-csrf-token", t);
        }
        if method == "POST" {
            r = r.json(&json!({"type": "fast"}));
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// The `name=value` pairs a response sets, as one `Cookie` header.
fn set_cookies(r: &reqwest::Response) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_string))
        .collect::<Vec<_>>()
        .join("; ")
}

fn cookie_value<'a>(cookies: &'a str, name: &str) -> &'a str {
    cookies
        .split("; ")
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {cookies}"))
}

/// The browser's cookies for the current page, as one `Cookie` header.
async fn browser_cookies(c: &Client) -> String {
    c.get_all_cookies()
        .await
        .unwrap()
        .iter()
        .map(|k| format!("{}={}", k.name(), k.value()))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn goto(c: &Client, url: &str) {
    // Docker adding a container's network interface makes Chromium abort
    // a load in flight (ERR_NETWORK_CHANGED): load again, a few times.
    for _ in 0..5 {
        c.goto(url).await.unwrap();
        let interrupted = c
            .execute("return document.body ? document.body.innerText : ''", vec![])
            .await
            .unwrap()
            .as_str()
            .is_some_and(|t| t.contains("ERR_NETWORK_CHANGED") || t.contains("connection was interrupted"));
        if !interrupted {
            wait_ready(c).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.execute(WATCH_ERRORS, vec![]).await.unwrap();
}

/// Waits until the page's script has wired its forms.
async fn wait_ready(c: &Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = c
            .execute("return document.documentElement.dataset.ready === '1'", vec![])
            .await
            .is_ok_and(|v| v == json!(true));
        if ready {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the console script never got ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every form field of the page has a label, and no script failed.
async fn page_is_clean(c: &Client, what: &str) {
    let unlabelled = c
        .execute(
            r#"return [...document.querySelectorAll("input, select, textarea")]
                .filter((e) => e.type !== "hidden" && e.type !== "submit")
                .filter((e) => !e.closest("label") && !(e.id && document.querySelector(`label[for="${e.id}"]`))
                               && !e.getAttribute("aria-label"))
                .map((e) => e.outerHTML)"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unlabelled, json!([]), "{what}: fields without a label");
    let errs = errors(c).await;
    assert!(errs.is_empty(), "{what}: script errors {errs:?}");
}

async fn log_in_browser(c: &Client, base: &str, account: &str, password: &str) {
    goto(c, &format!("{base}/console/")).await;
    text_of(c, "h1", "Portico console", "the login page").await;
    wait_ready(c).await;
    assert!(
        c.current_url()
            .await
            .unwrap()
            .as_str()
            .contains("/console/login?next="),
        "a page without a session leads to the login"
    );
    page_is_clean(c, "login page").await;
    c.find(Locator::Id("account"))
        .await
        .unwrap()
        .send_keys(account)
        .await
        .unwrap();
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(password)
        .await
        .unwrap();
    // Docker adding a container's interface (other tests) makes Chromium
    // drop requests in flight; the page then says so, and one tries again.
    for attempt in 1.. {
        c.find(Locator::Css("#login button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut dropped = false;
        while std::time::Instant::now() < deadline && !dropped {
            let h1 = match c.find(Locator::Css("h1")).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if h1.contains("Customers") {
                break;
            }
            dropped = match c.find(Locator::Id("login-error")).await {
                Ok(e) => e.text().await.unwrap_or_default().contains("did not get through"),
                Err(_) => false,
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !dropped || attempt == 3 {
            break;
        }
    }
    text_of(c, "h1", "Customers", "the customer list after login").await;
    c.execute(WATCH_ERRORS, vec![]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_super_admin_backs_up_live_and_a_technician_cannot_delete() {
    let Some((_driver, driver)) = chromedriver() else {
        return;
    };
    let Some(up) = Up::start(&[]) else { return };
    up.shop(64).await;
    let profiles = tempfile::tempdir().unwrap();
    let c = browser(driver, &profiles.path().join("admin")).await;

    log_in_browser(&c, &up.base, "admin", &up.admin_password).await;
    text_of(&c, "table", "shop.example.com", "the customer in the list").await;
    page_is_clean(&c, "customer list").await;
    screenshot(&c, "console-1-customers").await;

    // A fast backup, followed live: the bar moves and reaches "completed"
    // on the same page (a marker set now survives: no reload).
    c.find(Locator::LinkText("shop"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&c, "main", "New backup", "the backups tab").await;
    wait_ready(&c).await;
    c.execute(WATCH_ERRORS, vec![]).await.unwrap();
    page_is_clean(&c, "backups tab").await;
    c.execute("window.__sameDocument = true", vec![]).await.unwrap();
    c.find(Locator::Css("form.backup button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut shot = false;
    let result = loop {
        let v = c
            .execute(
                "return [document.querySelector('#live-bar').value, document.querySelector('#live-result').textContent]",
                vec![],
            )
            .await
            .unwrap();
        let (value, text) = (
            v[0].as_f64().unwrap_or(0.0),
            v[1].as_str().unwrap_or("").to_string(),
        );
        if seen.last() != Some(&value) {
            seen.push(value);
        }
        if !shot && value > 0.0 && value < 100.0 {
            screenshot(&c, "console-2-backup-progress").await;
            shot = true;
        }
        if text == "completed" || text.starts_with("failed") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no end of the backup on the page; bar went {seen:?}, text {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(result, "completed");
    assert!(
        seen.iter().any(|v| *v > 0.0 && *v < 100.0) && seen.last() == Some(&100.0),
        "the bar moved and ended full: {seen:?}"
    );
    text_of(&c, "#history", "succeeded", "the new row in the history").await;
    assert_eq!(
        c.execute("return window.__sameDocument === true", vec![])
            .await
            .unwrap(),
        json!(true),
        "the page was not reloaded"
    );
    screenshot(&c, "console-3-backup-completed").await;

    // Download: signed links for each file; the archive is a gzip stream.
    c.find(Locator::Css("#history button.download"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&c, "#history ul.links", ".tar.gz", "the download links").await;
    let hrefs = c
        .execute(
            "return [...document.querySelectorAll('#history ul.links a')].map((a) => a.href)",
            vec![],
        )
        .await
        .unwrap();
    let archive = hrefs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|h| h.contains(".tar.gz"))
        .expect("an archive link")
        .to_string();
    let r = up.http.get(&archive).send().await.unwrap();
    assert_eq!(r.status(), 200, "{archive}");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "a gzip archive");
    screenshot(&c, "console-4-download").await;
    page_is_clean(&c, "after the backup").await;
    // A phone's width: nothing runs off the side of the page.
    c.set_window_size(390, 844).await.unwrap();
    let overflow = c
        .execute(
            r##"const w = document.documentElement.clientWidth;
               return [document.documentElement.scrollWidth - w,
                       [...document.querySelectorAll("body *")].filter((e) => e.getBoundingClientRect().right > w + 1)
                         .map((e) => e.tagName + "." + e.className + "#" + e.id).slice(0, 5)]"##,
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow[0].as_i64().unwrap_or(0) <= 0,
        "the page is wider than a phone: {overflow}"
    );
    screenshot(&c, "console-4b-phone").await;
    c.set_window_size(1000, 800).await.unwrap();
    let delete_buttons = c.find_all(Locator::Css("#history button.danger")).await.unwrap();
    assert_eq!(delete_buttons.len(), 1, "a super admin may delete");

    // A technician, added on the staff page (the password is shown once).
    goto(&c, &format!("{}/console/users", up.base)).await;
    page_is_clean(&c, "staff page").await;
    for (name, value) in [
        ("id", "tina"),
        ("name", "Tina Tech"),
        ("email", "tina@shop.example.com"),
    ] {
        c.find(Locator::Css(&format!("form[data-api] input[name={name}]")))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    c.find(Locator::Css("form[data-api='POST /api/staff/users'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let v = c
            .execute(
                "return [document.querySelector('#answer').textContent, document.querySelector('#flash').textContent]",
                vec![],
            )
            .await
            .unwrap();
        if let Some(a) = v[0].as_str().filter(|a| a.contains("password")) {
            break a.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no generated password shown; the page says {:?}",
            v[1]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let tina_password = answer["password"].as_str().unwrap().to_string();
    text_of(&c, "#users", "tina", "tina in the staff list").await;
    screenshot(&c, "console-5-staff").await;

    // Logout ends the session: the old cookies get 401.
    let old = browser_cookies(&c).await;
    assert!(old.contains("__Host-portico_access="), "{old}");
    c.find(Locator::Id("logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&c, "h1", "Portico console", "the login page after logout").await;
    let (s, b) = up.with_cookies("GET", "/api/auth/me", &old, None).await;
    assert_eq!(s, 401, "old cookies after logout: {b}");
    let (s, _) = up.with_cookies("GET", "/api/customers", &old, None).await;
    assert_eq!(s, 401);

    // The technician: no delete offered, and a forged one is refused.
    log_in_browser(&c, &up.base, "tina@shop.example.com", &tina_password).await;
    assert!(
        c.find(Locator::LinkText("Users")).await.is_err()
            && c.find(Locator::LinkText("Audit")).await.is_err(),
        "a technician's menu has no staff or audit page"
    );
    goto(&c, &format!("{}/console/customers/shop", up.base)).await;
    text_of(&c, "#history", "succeeded", "the history for the technician").await;
    assert!(
        c.find_all(Locator::Css("#history button.danger"))
            .await
            .unwrap()
            .is_empty(),
        "no delete button for a technician"
    );
    assert!(
        !c.find_all(Locator::Css("#history button.download"))
            .await
            .unwrap()
            .is_empty()
    );
    screenshot(&c, "console-6-technician").await;
    let backup_id = up.api("GET", "/api/customers/shop/backups", None).await.1["backups"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let forged = c
        .execute_async(
            r#"const [url, done] = arguments;
               fetch(url, { method: "DELETE", headers: { "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content } })
                 .then((r) => done(r.status));"#,
            vec![json!(format!("/api/customers/shop/backups/{backup_id}"))],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403), "a technician's forged delete");
    let (s, b) = up.api("GET", "/api/customers/shop/backups", None).await;
    assert_eq!(
        (s, b["backups"].as_array().unwrap().len()),
        (200, 1),
        "the backup is still there"
    );
    goto(&c, &format!("{}/console/audit", up.base)).await;
    text_of(&c, "h1", "Forbidden", "the audit page refused to a technician").await;
    screenshot(&c, "console-7-forbidden").await;
    let _ = c.close().await;
}

#[tokio::test]
async fn logins_are_throttled_and_audited_and_sessions_end_at_once() {
    let Some(up) = Up::start(&[]) else { return };
    up.shop(0).await;
    // Five wrong passwords in a row: each 401, then even the right one
    // waits (429 with Retry-After); every failure is in the audit log.
    for _ in 0..5 {
        let e = up.login("admin", "wrong password!!").await.unwrap_err();
        assert_eq!(e.0, 401, "{e:?}");
        assert_eq!(e.1["error"], "login_failed");
    }
    let r = up
        .http
        .post(format!("{}/api/auth/login", up.base))
        .json(&json!({"account": "admin", "password": up.admin_password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=900).contains(&wait), "{wait}");
    // An unknown account answers like a wrong password.
    let e = up.login("nobody", "whatever password").await.unwrap_err();
    assert_eq!((e.0, e.1["error"].as_str()), (401, Some("login_failed")));
    let (_, audit) = up.api("GET", "/api/audit?action=auth.login&limit=50", None).await;
    let results: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "admin")
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| **r == "failed").count(), 5, "{audit}");
    assert_eq!(
        results.iter().filter(|r| **r == "throttled").count(),
        1,
        "{audit}"
    );

    // A second account made with the CLI (the recovery path).
    let jobs = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = std::process::Command::new(portico_tests::bins::jobs());
        cmd.args(args)
            .env_remove("PORTICO_CONFIG")
            .env("PORTICO_AUTH__JWT_SECRET", portico_tests::TEST_SECRET)
            .env("PORTICO_JOBS__POSTGRES_URL", up.jobs_db())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(s) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let out = jobs(
        &[
            "user",
            "add",
            "olga",
            "--email",
            "olga@ops.example",
            "--name",
            "Olga",
            "--role",
            "ops_lead",
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let olga_pw = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(olga_pw.len(), 20);
    let bad = jobs(
        &["user", "add", "Bad Id", "--email", "x@y.z", "--name", "X"],
        None,
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("user id must be"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let (cookies, csrf) = up.login("olga", &olga_pw).await.unwrap();
    let (s, me) = up.with_cookies("GET", "/api/auth/me", &cookies, None).await;
    assert_eq!((s, me["roles"].clone()), (200, json!(["ops_lead"])));
    // A change without the CSRF token is refused; with it, it goes.
    let (s, b) = up
        .with_cookies("POST", "/api/customers/shop/backups", &cookies, None)
        .await;
    assert_eq!((s, b["error"].as_str()), (403, Some("csrf")), "{b}");
    let (s, b) = up
        .with_cookies(
            "POST",
            "/api/customers/shop/backups",
            &cookies,
            Some("not the token"),
        )
        .await;
    assert_eq!(s, 403, "{b}");
    let (s, b) = up
        .with_cookies("POST", "/api/customers/shop/backups", &cookies, Some(&csrf))
        .await;
    assert_eq!(s, 202, "{b}");

    // Refresh rotates both tokens; replaying the old refresh token revokes
    // the session (the new tokens die with it).
    let refresh = |c: String| {
        let http = up.http.clone();
        let url = format!("{}/api/auth/refresh", up.base);
        async move {
            let r = http.post(url).header("cookie", c).send().await.unwrap();
            (
                r.status().as_u16(),
                set_cookies(&r),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let first_refresh = format!(
        "__Secure-portico_refresh={}",
        cookie_value(&cookies, "__Secure-portico_refresh")
    );
    let (s, rotated, _) = refresh(first_refresh.clone()).await;
    assert_eq!(s, 200);
    assert_ne!(
        cookie_value(&rotated, "__Host-portico_access"),
        cookie_value(&cookies, "__Host-portico_access")
    );
    let (s, _) = up.with_cookies("GET", "/api/auth/me", &cookies, None).await;
    assert_eq!(s, 401, "the access token before the rotation is gone");
    let (s, _) = up.with_cookies("GET", "/api/auth/me", &rotated, None).await;
    assert_eq!(s, 200);
    let (s, _, b) = refresh(first_refresh).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("session_revoked")), "{b}");
    let (s, _) = up.with_cookies("GET", "/api/auth/me", &rotated, None).await;
    assert_eq!(s, 401, "the replay revoked the session");
    let second = format!(
        "__Secure-portico_refresh={}",
        cookie_value(&rotated, "__Secure-portico_refresh")
    );
    assert_eq!(refresh(second).await.0, 401, "the family is revoked");
    let (_, audit) = up.api("GET", "/api/audit?action=auth.refresh_reuse", None).await;
    assert_eq!(audit["entries"].as_array().map(Vec::len), Some(1), "{audit}");

    // A new password (CLI, from stdin) ends sessions; disabling does too.
    let (cookies, _) = up.login("olga", &olga_pw).await.unwrap();
    let out = jobs(
        &["user", "passwd", "olga", "--password-stdin"],
        Some("a much better passphrase\n"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        up.with_cookies("GET", "/api/auth/me", &cookies, None).await.0,
        401
    );
    assert_eq!(up.login("olga", &olga_pw).await.unwrap_err().0, 401);
    let (cookies, _) = up.login("olga", "a much better passphrase").await.unwrap();
    let (s, _) = up
        .api("POST", "/api/staff/users/olga/disable", Some(json!({})))
        .await;
    assert_eq!(s, 204);
    assert_eq!(
        up.with_cookies("GET", "/api/auth/me", &cookies, None).await.0,
        401
    );
    assert_eq!(
        up.login("olga", "a much better passphrase").await.unwrap_err().0,
        401
    );
    // Machines keep their bearer tokens; a technician's token cannot
    // manage staff.
    let tech = token_with_roles("t1", &["technician"]);
    let r = up
        .http
        .get(format!("{}/api/staff/users", up.base))
        .bearer_auth(tech)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let _ = &up.edge;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_apps_page_deploys_and_shows_logs_and_the_mail_page_shows_the_gate() {
    let Some((_driver, driver)) = chromedriver() else {
        return;
    };
    if !portico_tests::docker::available() {
        return;
    }
    portico_tests::docker::test_image();
    let repos = tempfile::tempdir().unwrap();
    let app = "pt-console-app";
    portico_tests::docker::purge(app);
    let key = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    };
    let Some(up) = Up::start(&[
        (
            "PORTICO_PAAS__LOCAL_REPOS_ROOT",
            repos.path().display().to_string(),
        ),
        (
            "PORTICO_PAAS__IMAGES__STATIC",
            portico_tests::docker::TEST_IMAGE.into(),
        ),
        ("PORTICO_PAAS__INSTANCE", "pt-console".into()),
        ("PORTICO_PAAS__HEALTH__DEADLINE_SECS", "8".into()),
        ("PORTICO_JOBS__MAIL__KEYS__K1", key),
        ("PORTICO_JOBS__MAIL__ACTIVE_KEY", "k1".into()),
    ]) else {
        return;
    };
    let _purge = Purge(app);
    up.shop(0).await;
    let repo = repos.path().join("site");
    let dockerfile = format!(
        "FROM {}\nCOPY www /www\nEXPOSE 8080\nCMD [\"sh\", \"-c\", \"echo console-log-line; exec httpd -f -v -p 8080 -h /www\"]\n",
        portico_tests::docker::TEST_IMAGE
    );
    portico_tests::docker::git_repo(
        &repo,
        &[
            ("Dockerfile", dockerfile.as_str()),
            ("www/index.html", "hello from the console"),
        ],
    );
    let profiles = tempfile::tempdir().unwrap();
    let c = browser(driver, &profiles.path().join("apps")).await;
    log_in_browser(&c, &up.base, "admin", &up.admin_password).await;

    goto(&c, &format!("{}/console/apps", up.base)).await;
    text_of(&c, "#apps", "No apps yet", "the empty apps page").await;
    page_is_clean(&c, "apps page").await;
    c.find(Locator::Css("input[name=name]"))
        .await
        .unwrap()
        .send_keys(app)
        .await
        .unwrap();
    c.find(Locator::Css("input[name=repo]"))
        .await
        .unwrap()
        .send_keys(&repo.display().to_string())
        .await
        .unwrap();
    c.find(Locator::Css("form[data-api='POST /api/apps'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&c, "#apps", app, "the new app in the list").await;
    screenshot(&c, "console-8-apps").await;
    // The deploy runs as a task; the app page shows it and its logs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, b) = up.api("GET", &format!("/api/apps/{app}"), None).await;
        if b["status"]["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the app never ran: {b}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    goto(&c, &format!("{}/console/apps/{app}", up.base)).await;
    text_of(&c, "h1", "running", "the app's state").await;
    page_is_clean(&c, "app page").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.find(Locator::Id("logs-load"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let logs = c.find(Locator::Id("logs")).await.unwrap().text().await.unwrap();
        if logs.contains("console-log-line") {
            break;
        }
        assert!(Instant::now() < deadline, "no logs on the page: {logs:?}");
    }
    text_of(&c, "#tasks", "succeeded", "the deploy task").await;
    screenshot(&c, "console-9-app-logs").await;

    // A mail migration job: the page's badge is the API's gate.
    let (s, job) = up
        .api(
            "POST",
            "/api/migration/jobs",
            Some(
                json!({"customer": "shop", "domain": "shop.example.com", "source_type": "pst",
                        "destination": {"host": "127.0.0.1", "port": 1143, "tls": false}}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let id = job["id"].as_i64().unwrap_or_else(|| panic!("{job}"));
    let (_, gate) = up
        .api("GET", "/api/migration/gate?domain=shop.example.com", None)
        .await;
    let state = gate["gate"]
        .as_str()
        .unwrap_or_else(|| panic!("{gate}"))
        .to_string();
    goto(&c, &format!("{}/console/mail", up.base)).await;
    page_is_clean(&c, "mail list").await;
    let badge = c.find(Locator::Css("td .badge")).await.unwrap();
    assert_eq!(
        badge.attr("data-gate").await.unwrap().as_deref(),
        Some(state.as_str())
    );
    goto(&c, &format!("{}/console/mail/{id}", up.base)).await;
    page_is_clean(&c, "mail job page").await;
    let badge = c.find(Locator::Css("#gate .badge")).await.unwrap();
    assert_eq!(
        badge.attr("data-gate").await.unwrap().as_deref(),
        Some(state.as_str())
    );
    screenshot(&c, "console-10-mail").await;
    let _ = c.close().await;
}

/// Removes the test app's containers and images at the end.
struct Purge(&'static str);

impl Drop for Purge {
    fn drop(&mut self) {
        portico_tests::docker::purge(self.0);
    }
}
