//! Plain requests the gateway forwards itself (gateway/src/forward.rs),
//! against a scripted real upstream whose answer each path chooses: every
//! body framing (length, chunked, until close; none for HEAD, 204, 304;
//! interim 1xx skipped) reaches the client whole, one upstream connection
//! carries request after request, an upstream that closes its idle
//! connections costs the client nothing, and answers that break HTTP/1.1
//! or come too late end in the edge's own 502 or 504, never a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use portico_tests::servers::{EdgePorts, Service};
use portico_tests::upstream::read_request;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The upstream's answer to a path, and whether it closes the connection
/// after it (without saying so, for `/closes`).
fn answer(method: &str, path: &str) -> (&'static [u8], bool) {
    match path {
        "/length" => (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nkeep-alive: timeout=5\r\n\r\n\
              5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            false,
        ),
        "/until-close" => (b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end", true),
        "/early-hints" => (
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        "/not-modified" => (b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n", false),
        "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/head" if method == "HEAD" => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", false),
        "/closes" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
        "/both-framings" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
        "/bad-length" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello", false),
        "/not-http" => (b"SSH-2.0-OpenSSH\r\n\r\n", true),
        "/bad-chunk" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", false),
        "/short" => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nnot 100 bytes", true),
        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", false),
    }
}

/// A scripted upstream: answers each request (head and Content-Length body)
/// by its path; `/slow` never answers. Counts connections and requests.
struct Scripted {
    port: u16,
    connections: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, b) = (connections.clone(), bodies.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp, b.clone()));
            }
        });
        Scripted {
            port,
            connections,
            bodies,
        }
    }
}

async fn serve(mut tcp: TcpStream, bodies: Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    while let Some((head, body)) = read_request(&mut tcp, &mut buf).await {
        bodies.lock().unwrap().push(body);
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if path == "/slow" {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        if path == "/echo-head" {
            let echo = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}", head.len());
            let _ = tcp.write_all(echo.as_bytes()).await;
            continue;
        }
        let (bytes, close) = answer(method, path);
        if tcp.write_all(bytes).await.is_err() || close {
            return;
        }
    }
}

/// An HTTPS client trusting `ca`, speaking HTTP/2 or HTTP/1.1 only.
fn client(ca: &[u8], h2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
        .timeout(Duration::from_secs(10));
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

fn gateway(port: u16) -> (Service, EdgePorts) {
    let routes = format!(
        "[[gateway.routes]]\nname = \"impatient\"\npath_prefix = \"/slow\"\n\
         upstream = \"127.0.0.1:{port}\"\ntimeout_secs = 1\n\
         [[gateway.routes]]\nname = \"site\"\npath_prefix = \"/\"\nupstream = \"127.0.0.1:{port}\"\n"
    );
    Service::gateway_with_routes(&routes, &[])
}

#[tokio::test]
async fn every_body_framing_reaches_the_client_whole_over_one_upstream_connection() {
    for h2 in [false, true] {
        framings_reach_the_client(h2).await;
    }
}

async fn framings_reach_the_client(h2: bool) {
    let up = Scripted::start().await;
    let port = up.port;
    let (svc, edge) = tokio::task::spawn_blocking(move || gateway(port)).await.unwrap();
    let client = client(&svc.certificate("localhost"), h2);
    let first = client
        .get(format!("https://localhost:{}/length", edge.https))
        .send()
        .await
        .unwrap();
    let version = if h2 {
        reqwest::Version::HTTP_2
    } else {
        reqwest::Version::HTTP_11
    };
    assert_eq!(first.version(), version);
    assert_eq!(first.text().await.unwrap(), "hello");
    let url = |p: &str| format!("https://localhost:{}{p}", edge.https);

    let cases: &[(&str, u16, &str)] = &[
        ("/length", 200, "hello"),
        ("/chunked", 200, "hello world"),
        ("/early-hints", 200, "ok"),
        ("/not-modified", 304, ""),
        ("/empty", 204, ""),
        ("/length", 200, "hello"),
    ];
    for (path, want, body) in cases {
        let r = client.get(url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), *want, "{path}");
        assert!(
            r.headers().get("keep-alive").is_none(),
            "{path}: hop-by-hop header passed on"
        );
        assert_eq!(
            r.headers()["x-content-type-options"],
            "nosniff",
            "{path}: the edge's headers"
        );
        assert_eq!(r.text().await.unwrap(), *body, "{path}");
    }
    let head = client.head(url("/head")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "100");
    // Pingora serves each HTTP/2 stream on a thread of its choosing, and
    // the pools are per thread: one connection per gateway thread at most.
    let most = if h2 { 2 } else { 1 };
    let used = up.connections.load(Ordering::SeqCst);
    assert!(
        used <= most,
        "{used} upstream connections for sequential requests"
    );

    // A body read whole before the upstream is asked goes with the head.
    let r = client
        .post(url("/length"))
        .body("a small form")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.bodies.lock().unwrap().last().unwrap(), b"a small form");

    // Until the connection's end: passed on whole, and that upstream
    // connection is not used again.
    let r = client.get(url("/until-close")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "until the end");
    let r = client.get(url("/length")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    if !h2 {
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }

    // What the upstream sees: the client's connection headers are not its
    // business; the edge's forwarded headers are.
    let r = client
        .get(url("/echo-head"))
        .header("te", "trailers")
        .header("keep-alive", "timeout=99")
        .send()
        .await
        .unwrap();
    let seen = r.text().await.unwrap().to_ascii_lowercase();
    assert!(seen.starts_with("get /echo-head http/1.1\r\n"), "{seen}");
    assert!(
        seen.contains(&format!("\r\nhost: localhost:{}\r\n", edge.https)),
        "{seen}"
    );
    for gone in ["\r\nte:", "\r\nkeep-alive:", "\r\nconnection:"] {
        assert!(!seen.contains(gone), "{gone} reached the upstream:\n{seen}");
    }
    assert!(seen.contains("\r\nx-forwarded-proto: https\r\n"), "{seen}");
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_costs_the_client_nothing() {
    let up = Scripted::start().await;
    let port = up.port;
    let (svc, edge) = tokio::task::spawn_blocking(move || gateway(port)).await.unwrap();
    let client = client(&svc.certificate("localhost"), false);
    let url = format!("https://localhost:{}/closes", edge.https);
    // Each answer leaves a connection the upstream then closes: the next
    // request finds it closed in the pool, or fails on it silently and
    // goes again on a new one.
    for i in 0..50 {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok", "request {i}");
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 50);
}

#[tokio::test]
async fn answers_that_break_http_end_in_502_and_silence_in_504() {
    let up = Scripted::start().await;
    let port = up.port;
    let (svc, edge) = tokio::task::spawn_blocking(move || gateway(port)).await.unwrap();
    let client = client(&svc.certificate("localhost"), false);
    let url = |p: &str| format!("https://localhost:{}{p}", edge.https);
    for path in ["/both-framings", "/bad-length", "/not-http"] {
        let r = client.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 502, "{path}");
        assert!(
            r.headers().get("server").is_none(),
            "{path}: the edge's own answer"
        );
    }
    // Broken after the head: the client's response ends unfinished (or
    // not at all), never as a complete body.
    for path in ["/bad-chunk", "/short"] {
        let complete = match client.get(url(path)).send().await {
            Ok(r) => r.bytes().await.is_ok(),
            // Nothing had left for the client yet.
            Err(_) => false,
        };
        assert!(!complete, "{path}: a broken body passed for complete");
    }
    let started = std::time::Instant::now();
    let r = client.get(url("/slow")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // And the edge still serves.
    let r = client.get(url("/length")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    let metrics = portico_tests::client::metrics(edge.admin).await;
    assert!(
        metrics.contains("portico_gateway_upstream_errors_total{route=\"impatient\",kind=\"timeout\"} 1"),
        "{metrics}"
    );
}

/// Reads `n` responses with `Content-Length` bodies (none after `HEAD`
/// when `head` is set) from `r`, or what came before EOF or 10 s.
async fn responses(r: &mut (impl tokio::io::AsyncRead + Unpin), n: usize, head: bool) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        while out.len() < n {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&raw[..end + 4]).to_ascii_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0);
                let len = if head { 0 } else { len };
                if raw.len() >= end + 4 + len {
                    out.push(String::from_utf8_lossy(&raw[..end + 4 + len]).into_owned());
                    raw.drain(..end + 4 + len);
                    continue;
                }
            }
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(k) => raw.extend_from_slice(&chunk[..k]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    out
}

/// Sends `request` on `s`: its one answer, which must say `connection:
/// close` and be followed by the connection's end.
async fn last_answer(
    s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    request: &[u8],
) -> String {
    s.write_all(request).await.unwrap();
    let got = responses(s, 2, false).await;
    assert_eq!(got.len(), 1, "not one answer and the end: {got:?}");
    assert!(
        got[0].to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
        "{got:?}"
    );
    got[0].clone()
}

/// The gateway's own HTTP/1.1 loop (gateway/src/h1.rs) serves plain
/// requests on a kept-alive connection: pipelined ones in order, a body
/// that arrives in two pieces, `HEAD`, the edge's own refusals, and a
/// `Connection: close`. It hands each request it leaves to Pingora (here
/// a client that accepts gzip on a page) over with the bytes already
/// read, and takes the connection back after it.
#[tokio::test]
async fn the_gateways_own_loop_serves_plain_requests_and_hands_the_rest_over() {
    use portico_tests::client::{metrics, sample, tls_connect};
    let up = Scripted::start().await;
    let port = up.port;
    let (svc, edge) = tokio::task::spawn_blocking(move || gateway(port)).await.unwrap();
    let ca = svc.certificate("localhost");
    let handovers = |text: &str, why: &str| {
        sample(
            text,
            &format!("portico_gateway_handovers_total{{reason=\"{why}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let before = metrics(edge.admin).await;
    let mut tls = tls_connect(edge.https, &ca, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();

    // Two requests in one write: two answers, in order.
    tls.write_all(
        b"GET /length HTTP/1.1\r\nHost: localhost\r\n\r\nGET /echo-head HTTP/1.1\r\nHost: localhost\r\nx-n: 2\r\n\r\n",
    )
    .await
    .unwrap();
    let got = responses(&mut tls, 2, false).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].starts_with("HTTP/1.1 200 OK\r\n") && got[0].ends_with("\r\n\r\nhello"),
        "{}",
        got[0]
    );
    let lower = got[0].to_ascii_lowercase();
    for header in [
        "\r\nconnection: keep-alive\r\n",
        "\r\ndate: ",
        "\r\nx-content-type-options: nosniff\r\n",
    ] {
        assert!(lower.contains(header), "{header:?} missing: {}", got[0]);
    }
    assert!(
        got[1].to_ascii_lowercase().contains("\r\nx-n: 2\r\n"),
        "{}",
        got[1]
    );

    // A body in two writes reaches the upstream whole, with its head.
    tls.write_all(b"POST /length HTTP/1.1\r\nHost: localhost\r\ncontent-length: 11\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tls.write_all(b" world").await.unwrap();
    let got = responses(&mut tls, 1, false).await;
    assert!(got[0].ends_with("hello"), "{got:?}");
    assert_eq!(up.bodies.lock().unwrap().last().unwrap(), b"hello world");

    // HEAD: the upstream's length, no body; then the next request is
    // answered on the same connection.
    tls.write_all(b"HEAD /head HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let got = responses(&mut tls, 1, true).await;
    assert!(
        got[0].to_ascii_lowercase().contains("content-length: 100\r\n"),
        "{got:?}"
    );
    tls.write_all(b"GET /length HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(responses(&mut tls, 1, false).await[0].ends_with("hello"));
    // The edge's own page (no such app): its body to GET, none to HEAD.
    tls.write_all(b"GET /paas/nosuch/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let page = responses(&mut tls, 1, false).await;
    assert!(
        page[0].starts_with("HTTP/1.1 404 ") && page[0].ends_with("</html>\n"),
        "{page:?}"
    );
    tls.write_all(b"HEAD /paas/nosuch/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let head = responses(&mut tls, 1, true).await;
    let page_head = &page[0][..page[0].find("\r\n\r\n").unwrap() + 4];
    let without_date = |h: &str| {
        h.lines()
            .filter(|l| !l.starts_with("date:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(without_date(&head[0]), without_date(page_head));
    tls.write_all(b"GET /length HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(
        responses(&mut tls, 1, false).await[0].ends_with("hello"),
        "a body was sent to HEAD"
    );

    // The edge's own refusal, on a connection of its own: the answer, and
    // the connection closes.
    let mut other = tls_connect(edge.https, &ca, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let got = last_answer(&mut other, b"GET /length HTTP/1.1\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 400 "), "no Host: {got:?}");

    let middle = metrics(edge.admin).await;
    for why in [
        "compressible",
        "malformed",
        "body",
        "upgrade",
        "connection",
        "version",
        "target",
        "files",
    ] {
        assert_eq!(
            handovers(&middle, why),
            handovers(&before, why),
            "plain requests handed over ({why})"
        );
    }

    // A page for a client that accepts gzip is Pingora's (its compression
    // module): that request is handed over with its bytes, and the
    // connection comes back to the loop after it. A second such request
    // is handed over again, which it would not be if Pingora had kept the
    // connection.
    let gzip = b"GET /echo-head HTTP/1.1\r\nHost: localhost\r\naccept-encoding: gzip\r\n\r\n";
    for _ in 0..2 {
        tls.write_all(gzip).await.unwrap();
        let got = responses(&mut tls, 1, false).await;
        assert!(got[0].starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
        tls.write_all(b"GET /length HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert!(responses(&mut tls, 1, false).await[0].ends_with("hello"));
    }
    let got = last_answer(
        &mut tls,
        b"GET /length HTTP/1.1\r\nHost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(got.ends_with("hello"), "{got:?}");
    let after = metrics(edge.admin).await;
    assert_eq!(
        handovers(&after, "compressible"),
        handovers(&before, "compressible") + 2.0
    );

    // `Connection: close` on the gateway's own loop too.
    let mut third = tls_connect(edge.https, &ca, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let got = last_answer(
        &mut third,
        b"GET /length HTTP/1.1\r\nHost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(got.ends_with("hello"), "{got:?}");
    let last = metrics(edge.admin).await;
    assert_eq!(
        handovers(&last, "compressible"),
        handovers(&after, "compressible")
    );
}
