//! A real browser for page tests: Debian's headless Chromium driven
//! through chromedriver (WebDriver, fantoccini), with helpers to wait for
//! text, collect script errors and keep screenshots under
//! `target/screenshots/`.

use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::free_port;
use crate::proc::Proc;

/// chromedriver on a free port, or `None` (loudly) where it is missing.
pub fn chromedriver() -> Option<(Proc, u16)> {
    if std::process::Command::new("chromedriver")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "\n*** SKIPPED: no chromedriver (apt-get install chromium chromium-driver; scripts/test does) ***\n"
        );
        return None;
    }
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("chromedriver-{port}.log"));
    let mut cmd = std::process::Command::new("chromedriver");
    cmd.arg(format!("--port={port}"));
    let proc = Proc::spawn("chromedriver", cmd, &dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start: {}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((proc, port))
}

pub async fn browser(driver: u16, profile: &std::path::Path) -> Client {
    // Two providers are linked into this test (ring, aws-lc): pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--ignore-certificate-errors", "--window-size=1000,800",
            format!("--user-data-dir={}", profile.display()),
        ]}),
    );
    ClientBuilder::rustls()
        .expect("rustls")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver}"))
        .await
        .expect("a browser session")
}

/// Records uncaught errors and `console.error` calls in `window.__errors`.
pub const WATCH_ERRORS: &str = r#"
  if (!window.__errors) {
    window.__errors = [];
    window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
    window.addEventListener("unhandledrejection", (e) => window.__errors.push(String(e.reason)));
    const orig = console.error;
    console.error = (...a) => { window.__errors.push(a.map(String).join(" ")); orig.apply(console, a); };
  }
"#;

/// Waits until the element's text contains `want`; returns the text.
pub async fn text_of(c: &Client, css: &str, want: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = match c.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "waited 30 s for {what}: `{css}` shows {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn screenshot(c: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

pub async fn errors(c: &Client) -> Vec<String> {
    let v = c.execute("return window.__errors || []", vec![]).await.unwrap();
    serde_json::from_value(v).unwrap()
}
