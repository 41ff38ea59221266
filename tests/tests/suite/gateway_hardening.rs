//! Limits Pingora does not enforce by itself, seen from a raw TLS client:
//! a header trickle is cut at the header deadline (408), oversized heads get
//! 431, connection caps (total and per IP) close extra connections, idle
//! keep-alive connections are closed, and a route's limit class limits each
//! user across addresses.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use portico_tests::client::{https_client, https_client_from, metrics, sample, tls_connect, token};
use portico_tests::free_port;
use portico_tests::servers::{EdgePorts, Service};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A gateway whose upstreams are all closed ports (admitted requests: 5xx).
async fn gateway(extra: &[(&'static str, String)], args: &[&str]) -> (Service, EdgePorts) {
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{}\"]", free_port()),
    ));
    env.extend(extra.iter().cloned());
    let svc = Service::gateway(args, &env, &edge);
    // The harness's probes of both listeners came from 127.0.0.1 too, and
    // count toward the caps until the gateway has seen them go. Each
    // listener accepts in order: once a later connection has been answered
    // on each, the probes were accepted before it; then the gauge tells
    // when all are gone.
    for (port, bytes) in [
        (edge.https, &b"not TLS\r\n\r\n"[..]),
        (edge.http, b"GET / HTTP/1.0\r\n\r\n"),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut Vec::new())).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(edge.admin).await;
        if !text.is_empty() && sample(&text, "portico_gateway_connections").unwrap_or(0.0) == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the probes' connections never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (svc, edge)
}

/// Reads until the end of a response head (or EOF, or 15 s); returns it.
async fn read_head(r: &mut (impl AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Routed to the (absent) upstream: the gateway's own 5xx.
fn proxied(head: &str) -> bool {
    head.starts_with("HTTP/1.1 50")
}

/// Whether the server closed `r` (EOF or reset) within `wait`.
async fn closed_within(r: &mut (impl AsyncRead + Unpin), wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, r.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_header_trickle_is_cut_at_the_deadline_and_a_slow_but_timely_head_is_served() {
    let (svc, edge) = gateway(
        &[("PORTICO_GATEWAY__CONNECTIONS__HEADER_TIMEOUT_SECS", "2".into())],
        &[],
    )
    .await;
    let ca = svc.certificate("localhost");

    // Timely: the head arrives in pieces but within the deadline.
    let mut tls = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
    for part in ["GET / HTTP/1.1\r\n", "Host: localhost\r\n", "\r\n"] {
        tls.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let head = read_head(&mut tls).await;
    assert!(proxied(&head), "served (no upstream): {head:?}");

    // Slowloris: one more header byte every half second, forever.
    let tls = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        wr.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await?;
        loop {
            wr.write_all(b"x").await?;
            wr.flush().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    let head = read_head(&mut rd).await;
    let took = started.elapsed();
    assert!(head.starts_with("HTTP/1.1 408"), "cut off with 408: {head:?}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "at the 2 s deadline, not before: {took:?}"
    );
    assert!(closed_within(&mut rd, Duration::from_secs(5)).await, "and closed");
    trickle.abort();
    let text = metrics(edge.admin).await;
    assert!(
        text.contains("portico_gateway_requests_rejected_total{reason=\"header_timeout\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    let (svc, edge) = gateway(&[], &[]).await;
    let ca = svc.certificate("localhost");
    let send = |head: String| {
        let ca = ca.clone();
        async move {
            let mut tls = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
            tls.write_all(head.as_bytes()).await.unwrap();
            read_head(&mut tls).await
        }
    };
    let big = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    assert!(send(big).await.starts_with("HTTP/1.1 431"), "40 KB of headers");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    assert!(send(many).await.starts_with("HTTP/1.1 431"), "150 headers");
    // Within the limits (32 KiB, 100 headers) the request is proxied.
    let fine = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let head = send(fine).await;
    assert!(proxied(&head), "{head:?}");
}

/// Whether a TLS client from 127.0.0.`last` is turned away: the caps
/// apply before the handshake, so it fails or ends at once.
async fn refused(port: u16, ca: &[u8], last: u8) -> bool {
    match tls_connect(port, ca, ip(last)).await {
        Err(_) => true,
        Ok(mut tls) => closed_within(&mut tls, Duration::from_millis(500)).await,
    }
}

#[tokio::test]
async fn connection_caps_close_extra_connections_and_free_their_places() {
    let (svc, edge) = gateway(
        &[
            ("PORTICO_GATEWAY__CONNECTIONS__MAX_CONNECTIONS", "3".into()),
            ("PORTICO_GATEWAY__CONNECTIONS__MAX_CONNECTIONS_PER_IP", "2".into()),
        ],
        &[],
    )
    .await;
    let ca = svc.certificate("localhost");
    // Counted from here: the harness's probes may have met the caps.
    let before = metrics(edge.admin).await;
    let open = Duration::from_millis(700);
    let mut a1 = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
    let mut a2 = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
    assert!(!closed_within(&mut a1, open).await, "first from .1 admitted");
    assert!(!closed_within(&mut a2, open).await, "second from .1 admitted");
    assert!(refused(edge.https, &ca, 1).await, "third from .1: per-IP cap");
    let mut b1 = tls_connect(edge.https, &ca, ip(2)).await.unwrap();
    assert!(!closed_within(&mut b1, open).await, "another client is admitted");
    assert!(refused(edge.https, &ca, 3).await, "fourth in total: total cap");

    drop(a1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c2 = tls_connect(edge.https, &ca, ip(3)).await.unwrap();
    c2.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut c2).await;
    assert!(proxied(&head), "a freed place is reused: {head:?}");

    let text = metrics(edge.admin).await;
    for cap in ["per_ip", "total"] {
        let series = format!("portico_gateway_connections_refused_total{{cap=\"{cap}\"}}");
        let refused = |text: &str| sample(text, &series).unwrap_or(0.0);
        assert_eq!(refused(&text) - refused(&before), 1.0, "{cap}: {text}");
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests_then_idle_connections_close() {
    let (_jobs, jobs_port) = Service::jobs();
    let (svc, edge) = gateway(
        &[
            ("PORTICO_GATEWAY__CONNECTIONS__KEEPALIVE_IDLE_SECS", "1".into()),
            ("PORTICO_GATEWAY__JOBS_UPSTREAM", format!("127.0.0.1:{jobs_port}")),
        ],
        &[],
    )
    .await;
    let ca = svc.certificate("localhost");
    let mut tls = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
    for _ in 0..3 {
        tls.write_all(b"GET /api/jobs/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tls).await;
        assert!(
            head.starts_with("HTTP/1.1 "),
            "answered on the same connection: {head:?}"
        );
        assert!(!head.starts_with("HTTP/1.1 408"), "{head:?}");
        // Drain the (small) body so the next read starts a new head.
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await;
    }
    assert!(
        closed_within(&mut tls, Duration::from_secs(5)).await,
        "idle keep-alive connection closed"
    );
}

#[tokio::test]
async fn a_limit_class_limits_each_user_across_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[gateway.limit_classes.api]\nper_ip_per_sec = 1000\nper_ip_burst = 1000\n\
             per_user_per_sec = 1\nper_user_burst = 2\n\
             [[gateway.routes]]\nname = \"things\"\npath_prefix = \"/api/things\"\n\
             upstream = \"127.0.0.1:{}\"\nlimit_class = \"api\"\n",
            free_port()
        ),
    )
    .unwrap();
    let (svc, edge) = gateway(&[], &["--config", file.to_str().unwrap()]).await;
    let ca = svc.certificate("localhost");
    let url = format!("https://localhost:{}/api/things/1", edge.https);
    let from = |last: u8| https_client_from(&ca, last);
    let status = |client: reqwest::Client, user: &str| {
        let (url, bearer) = (url.clone(), token(user));
        async move { client.get(url).bearer_auth(bearer).send().await.unwrap() }
    };
    assert_ne!(status(from(1), "alice").await.status(), 429);
    assert_ne!(status(from(2), "alice").await.status(), 429);
    let limited = status(from(3), "alice").await;
    assert_eq!(
        limited.status(),
        429,
        "alice's third request, from a third address"
    );
    assert!(limited.headers().contains_key("retry-after"));
    assert_ne!(status(from(3), "bob").await.status(), 429, "bob is unaffected");
    // Routes without the class are not limited per user.
    let other = https_client(&ca);
    for _ in 0..3 {
        let r = other
            .get(format!("https://localhost:{}/elsewhere", edge.https))
            .bearer_auth(token("alice"))
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 429);
    }
}

/// One TLS extension: type, then its length-prefixed body.
fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = kind.to_be_bytes().to_vec();
    out.extend((body.len() as u16).to_be_bytes());
    out.extend(body);
    out
}

/// A ClientHello (no supported_versions extension) whose highest version
/// is `version` (0x0302 = TLS 1.1, 0x0303 = TLS 1.2), with suites, groups
/// and signature schemes that a TLS 1.2 server accepts.
fn client_hello(version: u16) -> Vec<u8> {
    let host = b"localhost";
    // server_name_list: length, then one host_name entry.
    let mut sni = vec![0x00, host.len() as u8 + 3, 0x00, 0x00, host.len() as u8];
    sni.extend(host);
    let mut ext = extension(0x0000, &sni);
    ext.extend(extension(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17])); // x25519, P-256
    ext.extend(extension(0x000b, &[0x01, 0x00])); // uncompressed points
    ext.extend(extension(
        0x000d,
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    ));
    let mut body = version.to_be_bytes().to_vec();
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-{ECDSA,RSA}-AES128-GCM
    body.extend([0x01, 0x00]); // null compression
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![0x01, 0x00];
    hs.extend((body.len() as u16).to_be_bytes());
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// The first TLS record the gateway answers `hello` with: (type, body).
async fn first_record(port: u16, hello: &[u8]) -> (u8, Vec<u8>) {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut head))
        .await
        .expect("an answer")
        .expect("a record header");
    let mut body = vec![0u8; u16::from_be_bytes([head[3], head[4]]) as usize];
    tcp.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

#[tokio::test]
async fn tls_1_1_is_refused_where_the_same_hello_at_1_2_is_served() {
    let (_svc, edge) = gateway(&[], &[]).await;
    let (kind, body) = first_record(edge.https, &client_hello(0x0303)).await;
    assert_eq!((kind, body[0]), (22, 2), "TLS 1.2: a ServerHello: {body:?}");
    let (kind, body) = first_record(edge.https, &client_hello(0x0302)).await;
    assert_eq!(kind, 21, "TLS 1.1: an alert record: {body:?}");
    assert_eq!(body[0], 2, "fatal");
    assert_eq!(body[1], 70, "protocol_version");
}

/// A plain TCP connection to `port` from 127.0.0.`last` that says nothing.
async fn tcp_from(last: u8, port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((ip(last), 0).into()).unwrap();
    socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

#[tokio::test]
async fn silent_connections_count_toward_the_cap_and_the_handshake_has_a_deadline() {
    let (svc, edge) = gateway(
        &[
            ("PORTICO_GATEWAY__CONNECTIONS__HANDSHAKE_TIMEOUT_SECS", "2".into()),
            ("PORTICO_GATEWAY__CONNECTIONS__MAX_CONNECTIONS_PER_IP", "5".into()),
        ],
        &[],
    )
    .await;
    let ca = svc.certificate("localhost");
    // Twenty TCP connections from one address that never send a ClientHello.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tcp_from(1, edge.https).await);
    }
    let mut open = 0;
    for s in &mut silent {
        if !closed_within(s, Duration::from_millis(300)).await {
            open += 1;
        }
    }
    assert_eq!(open, 5, "the per-IP cap holds before any TLS");
    // A real client from the same address is refused meanwhile; another
    // address is not.
    assert!(
        refused(edge.https, &ca, 1).await,
        "refused while the silent ones are open"
    );
    let mut other = tls_connect(edge.https, &ca, ip(2))
        .await
        .expect("another address");
    assert!(!closed_within(&mut other, Duration::from_millis(300)).await);

    // A ClientHello trickled a byte at a time is no better than silence.
    let mut trickle = tcp_from(3, edge.https).await;
    let hello = client_hello(0x0303);
    let trickled = tokio::spawn(async move {
        for b in hello {
            if trickle.write_all(&[b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });

    // Every silent connection is closed at the deadline, not before.
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(6)).await,
            "closed at the deadline"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "at the 2 s deadline: {took:?}"
    );
    assert!(trickled.await.unwrap(), "the trickled hello was cut off");
    // Their places are free again.
    let mut tls = tls_connect(edge.https, &ca, ip(1)).await.expect("admitted again");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(proxied(&read_head(&mut tls).await));
    let text = metrics(edge.admin).await;
    assert!(
        text.contains("portico_gateway_tls_handshake_failures_total{reason=\"timeout\"} 6"),
        "{text}"
    );
    assert!(
        !text.contains("portico_gateway_connections -"),
        "the open-connections gauge never goes negative: {text}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_let_go_after_the_send_timeout() {
    // 32 MiB: more than the loopback's socket buffers on both sides hold.
    const SIZE: usize = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; SIZE]).unwrap();
    let routes = format!(
        "[[gateway.routes]]\nname = \"files\"\npath_prefix = \"/files\"\nroot = \"{}\"\n",
        dir.path().display()
    );
    let (gw, edge) = Service::gateway_with_routes(
        &routes,
        &[("PORTICO_GATEWAY__CONNECTIONS__SEND_TIMEOUT_SECS", "1".to_string())],
    );
    let ca = gw.certificate("localhost");
    // HTTP/1.1: the gateway's own loop; HTTP/1.0: Pingora's session.
    for version in ["1.1", "1.0"] {
        let mut tls = tls_connect(edge.https, &ca, ip(1)).await.unwrap();
        tls.write_all(format!("GET /files/big.bin HTTP/{version}\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // Not a byte read for three times the timeout…
        tokio::time::sleep(Duration::from_secs(3)).await;
        // …then what was already on its way arrives, and the end.
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "HTTP/{version}: the connection was held open");
        assert!(
            got > 0 && got < SIZE,
            "HTTP/{version}: {got} bytes of {SIZE}: the answer should have been cut"
        );
    }
    // The gateway serves on.
    let r = https_client(&ca)
        .get(format!("https://localhost:{}/files/none", edge.https))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
