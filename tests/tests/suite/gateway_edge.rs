//! What the edge refuses and rewrites before anything reaches an upstream,
//! probed with raw requests (clients normalize what we need to send
//! crooked) against a real upstream that echoes what it received: dot
//! segments cannot dodge a route's policy, spoofable identity headers never
//! pass, malformed requests get our own answer (with our headers, never
//! `Server: Pingora`), slow bodies hold no upstream connection and end in
//! 408, and the port-80 redirect never names a host an attacker chose.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use portico_tests::client::{metrics, tls_connect};
use portico_tests::free_port;
use portico_tests::servers::{EdgePorts, Service};
use portico_tests::upstream::Upstream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A gateway whose routes `/admin` (bodies of at most 4 bytes) and `/` go
/// to `upstream`; `/down` to a closed port.
fn gateway(upstream: u16, extra: &[(&'static str, String)]) -> (Service, EdgePorts, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[[gateway.routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\n\
             upstream = \"127.0.0.1:{upstream}\"\nmax_body_bytes = 4\n\
             [[gateway.routes]]\nname = \"down\"\npath_prefix = \"/down\"\n\
             upstream = \"127.0.0.1:{}\"\n\
             [[gateway.routes]]\nname = \"site\"\npath_prefix = \"/\"\n\
             upstream = \"127.0.0.1:{upstream}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{}\"]", free_port()),
    ));
    env.extend(extra.iter().cloned());
    let svc = Service::gateway(&["--config", file.to_str().unwrap()], &env, &edge);
    (svc, edge, dir)
}

/// Reads one response (head and a Content-Length body) or until EOF/10 s.
async fn read_response(r: &mut (impl AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0);
                if out.len() >= end + 4 + len {
                    break;
                }
            }
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` raw over TLS from 127.0.0.`last`; the response.
async fn raw(edge: &EdgePorts, ca: &[u8], last: u8, request: &str) -> String {
    let mut tls = tls_connect(edge.https, ca, ip(last)).await.expect("TLS");
    tls.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut tls).await
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
}

/// The edge's own answer: our security headers, no `Server`.
fn assert_ours(response: &str) {
    let lower = response.to_ascii_lowercase();
    assert!(!lower.contains("\r\nserver:"), "a Server header: {response}");
    assert!(
        lower.contains("\r\nx-content-type-options: nosniff"),
        "{response}"
    );
    assert!(lower.contains("\r\nstrict-transport-security:"), "{response}");
}

#[tokio::test]
async fn dot_segments_cannot_dodge_a_route_and_go_upstream_normalized() {
    let up = Upstream::start(&[]).await;
    let (svc, edge, _dir) = gateway(up.port, &[]);
    let ca = svc.certificate("localhost");
    let post =
        |path: &str| format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(status(&raw(&edge, &ca, 1, &post("/public/panel")).await), 200);
    // The admin route takes 4 bytes at most: every spelling of it is it.
    for sneaky in [
        "/admin/panel",
        "/public/../admin/panel",
        "/public/%2e%2e/admin/panel",
        "/public/.%2E/admin/panel",
        "//admin/panel",
        "/./admin/panel",
    ] {
        assert_eq!(status(&raw(&edge, &ca, 1, &post(sneaky)).await), 413, "{sneaky}");
    }
    // The upstream sees the normal form.
    let r = raw(&edge, &ca, 2, &get("/public/%2E%2E/admin/x?q=%2e%2e")).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains("GET /admin/x?q=%2e%2e HTTP/1.1"), "{r}");
    // Paths that would still climb in a decoding upstream are refused.
    for bad in [
        "/public/..%2fadmin",
        "/public%2f..%2fadmin",
        "/a\\..\\admin",
        "/a%00",
        "/a%zz",
    ] {
        let r = raw(&edge, &ca, 3, &get(bad)).await;
        assert_eq!(status(&r), 400, "{bad}: {r}");
        assert_ours(&r);
    }
    assert!(
        up.heads().iter().all(|h| !h.contains("..") && !h.contains("//")),
        "{:?}",
        up.heads()
    );
}

#[tokio::test]
async fn spoofable_client_headers_never_reach_the_upstream() {
    let up = Upstream::start(&[]).await;
    let (svc, edge, _dir) = gateway(up.port, &[]);
    let ca = svc.certificate("localhost");
    let spoofed = [
        "X-Forwarded-For: 6.6.6.1",
        "X_Forwarded_For: 6.6.6.2",
        "True-Client-IP: 6.6.6.3",
        "X-Client-IP: 6.6.6.4",
        "CF-Connecting-IP: 6.6.6.5",
        "X-Forwarded-Port: 6666",
        "X-Original-URL: /admin/6666",
        "X-Rewrite-URL: /admin/6667",
        "X-Real-IP: 6.6.6.6",
        "Forwarded: for=6.6.6.7",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Host: evil.example",
        "Some_Header: underscored",
        "x-REAL-ip: 6.6.6.8",
        "X-FORWARDED-FOR: 6.6.6.9",
        // About the client's connection: not the upstream's business.
        "Proxy-Authorization: Basic NjY2Ng==",
        "Keep-Alive: timeout=6666",
        "TE: trailers",
    ];
    let request = format!(
        "GET /x HTTP/1.1\r\nHost: localhost\r\n{}\r\n\r\n",
        spoofed.join("\r\n")
    );
    let r = raw(&edge, &ca, 1, &request).await;
    assert_eq!(status(&r), 200, "{r}");
    let seen = up.heads().pop().expect("the upstream got the request");
    for s in ["6.6.6", "6666", "6667", "evil.example", "underscored", "_"] {
        assert!(!seen.contains(s), "{s} reached the upstream:\n{seen}");
    }
    let lower = seen.to_ascii_lowercase();
    assert!(lower.contains("x-forwarded-for: 127.0.0.1\r\n"), "{seen}");
    assert!(lower.contains("x-real-ip: 127.0.0.1\r\n"), "{seen}");
    assert!(lower.contains("x-forwarded-proto: https\r\n"), "{seen}");
    assert!(lower.contains("x-forwarded-host: localhost\r\n"), "{seen}");
    for h in ["proxy-authorization", "keep-alive", "te:"] {
        assert!(!lower.contains(h), "{h} reached the upstream:\n{seen}");
    }
}

#[tokio::test]
async fn the_upstreams_answer_reaches_the_client_with_our_headers_over_either_protocol() {
    let up = Upstream::start(&[
        ("Server", "secret-httpd/6.6"),
        ("Date", "Mon, 01 Jan 1990 00:00:00 GMT"),
        ("Keep-Alive", "timeout=6666"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Frame-Options", "SAMEORIGIN"),
        ("X-App", "kept"),
    ])
    .await;
    let (svc, edge, _dir) = gateway(up.port, &[]);
    let ca = svc.certificate("localhost");
    // HTTP/1.1 (the gateway's own loop), then HTTP/2 (Pingora's session).
    let r = raw(&edge, &ca, 1, &get("/x")).await;
    assert_eq!(status(&r), 200, "{r}");
    let h1 = r.to_ascii_lowercase();
    let h2 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .get(format!("https://localhost:{}/x", edge.https))
        .send()
        .await
        .unwrap();
    assert_eq!(h2.status(), 200);
    let h2: String = h2
        .headers()
        .iter()
        .map(|(k, v)| format!("\r\n{k}: {}", v.to_str().unwrap()))
        .collect::<String>()
        .to_ascii_lowercase();
    for (protocol, head) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        for gone in ["secret-httpd", "1990", "6666", "proxy-connection"] {
            assert!(!head.contains(gone), "{protocol}: {gone} passed on:\n{head}");
        }
        assert_eq!(
            head.matches("\r\nx-frame-options:").count(),
            1,
            "{protocol}: the app's own policy kept, not doubled:\n{head}"
        );
        for kept in [
            "x-frame-options: sameorigin",
            "x-app: kept",
            "content-type: text/plain",
        ] {
            assert!(
                head.contains(&format!("\r\n{kept}")),
                "{protocol}: {kept}:\n{head}"
            );
        }
        assert!(head.contains("\r\ndate: "), "{protocol}: our date:\n{head}");
    }
    assert_ours(&r);
    assert!(h1.contains("\r\nconnection: keep-alive\r\n"), "{h1}");
}

#[tokio::test]
async fn malformed_requests_get_the_edges_own_answer() {
    let up = Upstream::start(&[]).await;
    let (svc, edge, _dir) = gateway(
        up.port,
        &[("PORTICO_GATEWAY__CONNECTIONS__MAX_HEADERS", "20".into())],
    );
    let ca = svc.certificate("localhost");
    let cases = [
        ("TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n", 405),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 5\r\n\r\nhello",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: +5\r\n\r\nhello",
            400,
        ),
        // Pingora's own parser refuses this one (a header line without ':').
        ("GET / HTTP/1.1\r\nHost: localhost\r\nNoColon\r\n\r\n", 400),
        // An upstream that refuses the connection.
        ("GET /down HTTP/1.1\r\nHost: localhost\r\n\r\n", 502),
    ];
    for (request, want) in cases {
        let r = raw(&edge, &ca, 1, request).await;
        assert_eq!(status(&r), want, "{request:?}: {r}");
        assert_ours(&r);
    }
    assert!(
        up.heads().is_empty(),
        "none reached the upstream: {:?}",
        up.heads()
    );
    // The refused connection is counted, by route and kind.
    let m = portico_tests::client::metrics(edge.admin).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("portico_gateway_upstream_errors_total{")
                && l.contains("kind=\"connect\"")
                && l.ends_with(" 1")),
        "{m}"
    );

    // HTTP/2 is held to the same header count as HTTP/1.
    let h2 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/x", edge.https);
    let mut req = h2.get(&url);
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 431);
    assert_eq!(
        h2.get(&url).send().await.unwrap().status(),
        200,
        "fewer headers pass"
    );
    let text = metrics(edge.admin).await;
    for reason in ["method", "host", "content_length", "header_count"] {
        assert!(
            text.contains(&format!(
                "portico_gateway_requests_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {text}"
        );
    }
}

#[tokio::test]
async fn slow_bodies_hold_no_upstream_connection_and_end_in_408() {
    let up = Upstream::start(&[]).await;
    let (svc, edge, _dir) = gateway(
        up.port,
        &[
            ("PORTICO_GATEWAY__CONNECTIONS__BODY_TIMEOUT_SECS", "2".into()),
            (
                "PORTICO_GATEWAY__CONNECTIONS__BODY_MIN_BYTES_PER_SEC",
                "1024".into(),
            ),
            (
                "PORTICO_GATEWAY__CONNECTIONS__MAX_CONNECTIONS_PER_IP",
                "1000".into(),
            ),
        ],
    );
    let ca = svc.certificate("localhost");
    // Thirty clients start a small body and stop half way.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut tls = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
        tls.write_all(b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nhalf")
            .await
            .unwrap();
        stalled.push(tls);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        up.connections(),
        0,
        "no upstream connection for an unfinished small body"
    );
    for tls in &mut stalled {
        let r = read_response(tls).await;
        assert_eq!(status(&r), 408, "{r}");
        assert_ours(&r);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "cut near the 2 s allowance: {took:?}"
    );
    assert_eq!(up.connections(), 0);

    // A complete small body is served (and replayed upstream whole).
    let r = raw(
        &edge,
        &ca,
        2,
        "POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");

    // A large body streamed at 500 bytes/s, under the 1,024 minimum: cut.
    let mut tls = tls_connect(edge.https, &ca, ip(3)).await.unwrap();
    tls.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        loop {
            if wr.write_all(&[b'x'; 100]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = Instant::now();
    let r = read_response(&mut rd).await;
    trickle.abort();
    assert_eq!(status(&r), 408, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let text = metrics(edge.admin).await;
    assert!(
        text.contains("portico_gateway_requests_rejected_total{reason=\"body_too_slow\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn the_http_redirect_never_names_a_foreign_host() {
    let up = Upstream::start(&[]).await;
    let (_svc, edge, _dir) = gateway(up.port, &[]);
    let location = |host: &str| {
        let host = host.to_string();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", edge.http))
                .await
                .unwrap();
            tcp.write_all(format!("GET /p?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let r = read_response(&mut tcp).await;
            assert_eq!(status(&r), 308, "{r}");
            r.lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("location: ")
                        .map(str::to_string)
                })
                .expect("a Location")
        }
    };
    let port = edge.https;
    assert_eq!(
        location("localhost").await,
        format!("https://localhost:{port}/p?q=1")
    );
    assert_eq!(
        location("blog.paas.localhost:80").await,
        format!("https://blog.paas.localhost:{port}/p?q=1"),
        "an app's name is kept"
    );
    for foreign in [
        "evil.example",
        "localhost.evil.example",
        "a.b.paas.localhost",
        "10.0.0.1",
    ] {
        assert_eq!(
            location(foreign).await,
            format!("https://localhost:{port}/p?q=1"),
            "{foreign}"
        );
    }
}

/// An HTTP/2 client (ALPN h2) trusting `ca`.
fn h2_client(ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

#[tokio::test]
async fn http2_bodies_get_413_and_stalled_streams_hold_no_upstream() {
    let up = Upstream::start(&[]).await;
    let (svc, edge, _dir) = gateway(
        up.port,
        &[
            ("PORTICO_GATEWAY__MAX_BODY_BYTES", "100000".into()),
            ("PORTICO_GATEWAY__CONNECTIONS__BODY_TIMEOUT_SECS", "2".into()),
        ],
    );
    let ca = svc.certificate("localhost");
    let h2 = h2_client(&ca);
    let url = format!("https://localhost:{}/upload", edge.https);
    // Declared and over the limit; streamed without a length and over it.
    let r = h2.post(&url).body(vec![b'x'; 200_000]).send().await.unwrap();
    assert_eq!(
        (r.version(), r.status().as_u16()),
        (reqwest::Version::HTTP_2, 413)
    );
    let chunks = futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 5000])));
    let r = h2
        .post(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("an answer, not a stream error");
    assert_eq!(r.status(), 413);
    // A hundred streams on one connection that declare a small body and stall.
    let before = up.connections();
    let stalled: Vec<_> = (0..100)
        .map(|_| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
            let body = futures_util::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|c| (c, rx)) });
            let req = h2
                .post(&url)
                .header("content-length", "1000")
                .body(reqwest::Body::wrap_stream(body))
                .send();
            (tx, tokio::spawn(req))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        up.connections(),
        before,
        "no upstream connection for unfinished small bodies"
    );
    for (tx, req) in stalled {
        let r = req.await.unwrap().expect("an answer");
        assert_eq!(r.status(), 408);
        drop(tx);
    }
}
