//! Zero-downtime restart: a new gateway started with `--upgrade` takes the
//! listening sockets from the running one (SIGQUIT), and a client hammering
//! the gateway meanwhile sees no failed request.

use std::time::Duration;

use portico_tests::servers::{EdgePorts, Hammer, Service, http_status};

#[tokio::test(flavor = "multi_thread")]
async fn graceful_upgrade_drops_no_request() {
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    let mut old = Service::gateway(&[], &env, &edge);

    // A client that never stops asking (plain-HTTP listener: 308 each time).
    let hammer = Hammer::start(edge.http, "/x", 308);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new process waits for the sockets; then the old one hands them over.
    let mut new = old.upgrade_gateway(&env);
    let status = tokio::task::spawn_blocking(move || {
        let s = old.proc.wait_exit(Duration::from_secs(20));
        (s, old)
    })
    .await
    .unwrap();
    assert_eq!(
        status.0.and_then(|s| s.code()),
        Some(0),
        "old gateway exits cleanly"
    );
    let served_before = hammer.ok();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = hammer.stop().await;

    assert!(new.is_running(), "the new gateway serves on:\n{}", new.log());
    assert!(ok > served_before, "requests answered after the old one left");
    assert_eq!(failed, 0, "no failed request across the upgrade");
    assert_eq!(
        http_status(edge.admin, "/healthz"),
        Some(200),
        "the new one took the admin port too"
    );
    drop(status.1);
}

/// Sends `GET path` on `s`, then reads what comes back until it closes.
async fn ask(s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin), path: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    read_to_close(s).await
}

/// Reads what the gateway sends until it closes (or 5 s pass).
async fn read_to_close(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// What a stop (SIGTERM) or an upgrade (SIGQUIT) does to the connections
/// it finds: one accepted an instant before whose request has not arrived
/// (plain, and TLS with its handshake done) is served, with `connection:
/// close`; one idle between requests is closed without a word (the client
/// may retry: RFC 9112, 9.3.1). Pingora's close-on-stop dropped the first
/// kind too: a client that had sent nothing saw its first request fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_serves_connections_whose_first_request_is_on_its_way_and_closes_idle_ones() {
    use tokio::io::AsyncWriteExt;
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    // Long enough for the requests below to be sent during it.
    env.push(("PORTICO_GATEWAY__GRACE_PERIOD_SECS", "3".to_string()));
    let mut svc = Service::gateway(&[], &env, &edge);
    let ca = svc.certificate("localhost");
    let local = std::net::IpAddr::from([127, 0, 0, 1]);

    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", edge.http))
        .await
        .unwrap();
    let mut tls = portico_tests::client::tls_connect(edge.https, &ca, local)
        .await
        .expect("TLS handshake");
    let mut idle = portico_tests::client::tls_connect(edge.https, &ca, local)
        .await
        .expect("TLS handshake");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut idle, &mut first)
        .await
        .unwrap();
    assert!(first.starts_with(b"HTTP/1.1 "), "{first:?}");

    svc.proc.signal("TERM");
    // The listeners close first; the stop has then reached the connections.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", edge.http)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "the listener never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let answers = [
        ("plain", ask(&mut plain, "/x").await),
        ("TLS", ask(&mut tls, "/").await),
    ];
    for (which, answer) in &answers {
        assert!(
            answer.starts_with("HTTP/1.1 "),
            "{which}: {answer:?}\n{}",
            svc.proc.log()
        );
        assert!(
            answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{which}: a stopping gateway says it closes: {answer:?}"
        );
    }
    assert!(
        answers[0].1.starts_with("HTTP/1.1 308 "),
        "plain: {:?}",
        answers[0].1
    );
    // The idle one was closed, with nothing more written.
    let rest = read_to_close(&mut idle).await;
    assert!(!rest.contains("HTTP/1.1 "), "idle: {rest:?}");

    let status = svc.proc.wait_exit(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", svc.proc.log());
}
