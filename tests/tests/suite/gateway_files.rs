//! File routes served by the gateway itself: types, `ETag`/`Last-Modified`
//! and 304s, ranges (206/416), precompressed `.br`/`.gz` siblings, the
//! cache policy of each route, HEAD, no listings, and every way out of the
//! root refused (`..`, `%2e%2e`, `%2f`, a symlink out, hidden files); a
//! file changed on disk is served fresh with a new `ETag`.

use std::io::Read;
use std::time::Duration;

use portico_tests::client::{metrics, sample, tls_connect};
use portico_tests::servers::{EdgePorts, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Files {
    gw: Service,
    edge: EdgePorts,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// A gateway with two file routes on one root, and a client that speaks
/// HTTP/1.1 only (the gateway's own loop, `h1`) or, with `h2`, HTTP/2
/// (Pingora's session).
fn start(h2: bool) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("css")).unwrap();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("css/app.css"), "body { color: red }\n").unwrap();
    std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(root.join("logo.png"), b"\x89PNG\r\n\x1a\nfake").unwrap();
    std::fs::write(root.join("app.js"), "console.log('plain');".repeat(20)).unwrap();
    std::fs::write(root.join("app.js.br"), "BROTLI-BYTES").unwrap();
    std::fs::write(root.join("app.js.gz"), "GZIP-BYTES").unwrap();
    std::fs::write(root.join(".env"), "SECRET=1").unwrap();
    let mut big = Vec::new();
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(300 * 1024)
        .read_to_end(&mut big)
        .unwrap();
    std::fs::write(root.join("video.bin"), &big).unwrap();
    std::fs::write(outside.join("secret.txt"), "outside the root").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(root.join("css/app.css"), root.join("alias.css")).unwrap();

    let routes = format!(
        "[[gateway.routes]]\nname = \"static\"\npath_prefix = \"/static\"\nroot = \"{r}\"\ncache = \"immutable\"\n\
         [[gateway.routes]]\nname = \"media\"\npath_prefix = \"/media\"\nroot = \"{r}\"\ncache = \"max-age=60\"\n",
        r = root.display()
    );
    let (gw, edge) = Service::gateway_with_routes(&routes, &[]);
    let ca = reqwest::Certificate::from_pem(&gw.certificate("localhost")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10));
    let http = if h2 {
        http.http2_prior_knowledge()
    } else {
        http.http1_only()
    };
    let http = http.build().unwrap();
    Files {
        gw,
        edge,
        root,
        _dir: dir,
        http,
    }
}

impl Files {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.edge.https)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self.http.get(self.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.unwrap()
    }

    /// A raw request (no client-side path normalization); the status and
    /// the whole response.
    async fn raw(&self, path: &str) -> (u16, String) {
        let ca = self.gw.certificate("localhost");
        let mut tls = tls_connect(self.edge.https, &ca, [127, 0, 0, 1].into())
            .await
            .unwrap();
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status for {path}: {text:?}"));
        (status, text)
    }
}

fn h<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

#[tokio::test]
async fn files_are_served_with_types_validators_and_each_routes_cache_policy() {
    for h2 in [false, true] {
        served_with_types_validators_and_cache_policy(h2).await;
    }
}

async fn served_with_types_validators_and_cache_policy(h2: bool) {
    let f = start(h2);
    let r = f.get("/static/css/app.css", &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "content-type"), "text/css; charset=utf-8");
    assert_eq!(h(&r, "cache-control"), "public, max-age=31536000, immutable");
    assert_eq!(h(&r, "x-content-type-options"), "nosniff");
    assert_eq!(h(&r, "accept-ranges"), "bytes");
    assert!(h(&r, "strict-transport-security").contains("max-age"));
    let etag = h(&r, "etag").to_string();
    let modified = h(&r, "last-modified").to_string();
    assert!(etag.starts_with('"') && !modified.is_empty());
    assert_eq!(r.text().await.unwrap(), "body { color: red }\n");

    // The same file on the other route: its own cache policy.
    let r = f.get("/media/css/app.css", &[]).await;
    assert_eq!(h(&r, "cache-control"), "public, max-age=60");
    assert_eq!(
        f.get("/static/logo.png", &[]).await.headers()["content-type"],
        "image/png"
    );
    let r = f.get("/static/", &[]).await;
    assert_eq!(
        (r.status().as_u16(), h(&r, "content-type")),
        (200, "text/html; charset=utf-8")
    );

    // Validators: 304 without a body, by ETag or by date.
    let r = f.get("/static/css/app.css", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status(), 304);
    assert_eq!(h(&r, "etag"), etag);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = f
        .get("/static/css/app.css", &[("if-none-match", "\"other\", W/\"x\"")])
        .await;
    assert_eq!(r.status(), 200);
    let r = f
        .get("/static/css/app.css", &[("if-modified-since", &modified)])
        .await;
    assert_eq!(r.status(), 304);
    let r = f
        .get(
            "/static/css/app.css",
            &[("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")],
        )
        .await;
    assert_eq!(r.status(), 200);

    // HEAD: the headers, no body.
    let r = f.http.head(f.url("/static/video.bin")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), h(&r, "content-length")), (200, "307200"));
    assert!(r.bytes().await.unwrap().is_empty());
    // Other methods: 405.
    let r = f.http.post(f.url("/static/css/app.css")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), h(&r, "allow")), (405, "GET, HEAD"));

    // A change on disk: served fresh, with a new ETag.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(f.root.join("css/app.css"), "body { color: blue }\n").unwrap();
    let r = f.get("/static/css/app.css", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status(), 200, "the old ETag no longer matches");
    assert_ne!(h(&r, "etag"), etag);
    assert_eq!(r.text().await.unwrap(), "body { color: blue }\n");
}

#[tokio::test]
async fn ranges_and_precompressed_variants() {
    for h2 in [false, true] {
        ranges_and_variants(h2).await;
    }
}

async fn ranges_and_variants(h2: bool) {
    let f = start(h2);
    let whole = std::fs::read(f.root.join("video.bin")).unwrap();
    // A large file, streamed, whole and in ranges.
    let r = f.get("/static/video.bin", &[]).await;
    assert_eq!(h(&r, "content-type"), "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap(), whole);
    for (range, from, to) in [
        ("bytes=0-99", 0, 99),
        ("bytes=200000-", 200_000, 307_199),
        ("bytes=-10", 307_190, 307_199),
    ] {
        let r = f.get("/static/video.bin", &[("range", range)]).await;
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(h(&r, "content-range"), format!("bytes {from}-{to}/307200"));
        assert_eq!(r.bytes().await.unwrap(), whole[from..=to], "{range}");
    }
    let r = f.get("/static/video.bin", &[("range", "bytes=400000-")]).await;
    assert_eq!(
        (r.status().as_u16(), h(&r, "content-range")),
        (416, "bytes */307200")
    );
    // A small file's range comes from the cache.
    let r = f.get("/static/css/app.css", &[("range", "bytes=0-3")]).await;
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (206, "body".to_string())
    );
    // If-Range with a stale validator: the whole file.
    let r = f
        .get(
            "/static/video.bin",
            &[("range", "bytes=0-9"), ("if-range", "\"stale\"")],
        )
        .await;
    assert_eq!(r.status(), 200);

    // Precompressed siblings by Accept-Encoding (br first), never for a range.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&f.gw.certificate("localhost")).unwrap())
        .no_gzip()
        .no_brotli();
    let client = if h2 {
        client.http2_prior_knowledge()
    } else {
        client.http1_only()
    };
    let client = client.build().unwrap();
    let get = |enc: &'static str, range: Option<&'static str>| {
        let mut req = client.get(f.url("/static/app.js")).header("accept-encoding", enc);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        req.send()
    };
    let r = get("gzip, br", None).await.unwrap();
    assert_eq!(
        (h(&r, "content-encoding"), h(&r, "vary")),
        ("br", "Accept-Encoding")
    );
    assert_eq!(h(&r, "content-type"), "text/javascript; charset=utf-8");
    let br_etag = h(&r, "etag").to_string();
    assert_eq!(r.text().await.unwrap(), "BROTLI-BYTES");
    let r = get("gzip", None).await.unwrap();
    assert_eq!(h(&r, "content-encoding"), "gzip");
    assert_ne!(h(&r, "etag"), br_etag, "each variant has its own ETag");
    assert_eq!(r.text().await.unwrap(), "GZIP-BYTES");
    let r = get("identity", None).await.unwrap();
    assert_eq!(h(&r, "content-encoding"), "");
    assert!(r.text().await.unwrap().starts_with("console.log('plain');"));
    let r = get("br", Some("bytes=0-6")).await.unwrap();
    assert_eq!((r.status().as_u16(), h(&r, "content-encoding")), (206, ""));
    assert_eq!(r.text().await.unwrap(), "console");
    // A stale sibling (older than the file) is never served.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(f.root.join("app.js"), "console.log('new');").unwrap();
    let r = get("br", None).await.unwrap();
    assert_eq!(h(&r, "content-encoding"), "");
    assert_eq!(r.text().await.unwrap(), "console.log('new');");

    // A file the edge gzips itself (no sibling) is gzipped on either path:
    // over HTTP/1.1 the connection goes to Pingora, whose module that is.
    // Every other answer above came from the gateway's own loop.
    let r = client
        .get(f.url("/static/css/app.css"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(h(&r, "content-encoding"), "gzip");
    if !h2 {
        let text = metrics(f.edge.admin).await;
        let handed = |why: &str| {
            sample(
                &text,
                &format!("portico_gateway_handovers_total{{reason=\"{why}\"}}"),
            )
        };
        assert_eq!(handed("compressible"), Some(1.0));
        assert_eq!(handed("files"), None);
    }
}

#[tokio::test]
async fn nothing_outside_the_root_nor_hidden_nor_a_listing() {
    let f = start(false);
    assert_eq!(f.raw("/static/css/app.css").await.0, 200);
    // Doubled slashes are merged by the edge's normalization, as nginx does.
    assert_eq!(f.raw("/static/css//app.css").await.0, 200);
    assert_eq!(
        f.raw("/static/alias.css").await.0,
        200,
        "a symlink inside the root is fine"
    );
    for path in [
        "/static/../outside/secret.txt",
        "/static/%2e%2e/outside/secret.txt",
        "/static/%2E%2E%2Foutside%2Fsecret.txt",
        "/static/css%2fapp.css",
        "/static/css%5capp.css",
        "/static/leak.txt",
        "/static/.env",
        "/static/%2eenv",
        "/static/css/",
        "/static/css",
        "/static/missing.txt",
        "/static/%00",
    ] {
        // Refused (400, 404), or normalized out of the file route
        // (`/outside/…` goes to the chat shards, down here): never the file.
        let (s, text) = f.raw(path).await;
        assert!(
            s >= 400 && !text.contains("outside the root") && !text.contains("SECRET"),
            "{path}: {text}"
        );
        let dots = path.to_ascii_lowercase();
        if !dots.contains("..") && !dots.contains("%2e%2e") {
            assert!(s == 404 || s == 400, "{path}: {s}");
        }
    }
}
