//! WebSockets through the gateway are long-lived streams with their own
//! limits: never a request body limit, and on an upgrade or a stop the old
//! gateway closes each one with 1001 (come back), spread over the grace
//! period, so no client sees 1006 and no acknowledged message is lost.

use std::time::Duration;

use portico_tests::client::{Refused, Ws, create_conversation, tls_connect, token};
use portico_tests::servers::{EdgePorts, Service};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A chat shard (publish limit lifted) behind a gateway.
fn stack(
    chat_env: &[(&str, String)],
    gw_env: &[(&'static str, String)],
) -> (Service, u16, Service, EdgePorts) {
    let mut env = vec![("PORTICO_CHAT__PUBLISH_PER_SEC", "1000000".to_string())];
    env.extend(chat_env.iter().cloned());
    let (chat, port) = Service::chat(&env);
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    env.push(("PORTICO_GATEWAY__CHAT_SHARDS", format!("[\"127.0.0.1:{port}\"]")));
    env.extend(gw_env.iter().cloned());
    let gw = Service::gateway(&[], &env, &edge);
    (chat, port, gw, edge)
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_megabytes_over_one_websocket_are_all_delivered() {
    // A 1 MiB body limit on every route: it must not apply to WebSockets.
    let (_chat, port, gw, edge) = stack(&[], &[("PORTICO_GATEWAY__MAX_BODY_BYTES", "1048576".into())]);
    let ca = gw.certificate("localhost");
    create_conversation(port, "alice", "big", &["alice", "bob"]).await;
    let (mut alice, _) = Ws::via_gateway(edge.https, &token("alice"), &ca, &[]).await;
    let (mut bob, _) = Ws::via_gateway(edge.https, &token("bob"), &ca, &[]).await;
    bob.send(serde_json::json!({"type": "subscribe", "conv": "big"}))
        .await;
    bob.recv_type("subscribed").await;

    // 12,800 messages of 4,000 bytes: 51.2 MB from one client.
    const COUNT: u64 = 12_800;
    const WINDOW: u64 = 32;
    let body = "x".repeat(4000);
    let reader = tokio::spawn(async move {
        let mut next = 1;
        while next <= COUNT {
            let f = bob.recv().await;
            if f["type"] == "message" {
                assert_eq!(f["offset"], next, "in order, none missing");
                next += 1;
            }
        }
        next - 1
    });
    let mut sent = 0;
    while sent < COUNT {
        let burst = WINDOW.min(COUNT - sent);
        for i in 0..burst {
            let id = format!("m{}", sent + i);
            alice
                .send(serde_json::json!({"type": "publish", "conv": "big", "id": id, "body": body}))
                .await;
        }
        for _ in 0..burst {
            let ack = alice.recv_type("ack").await;
            assert!(ack["offset"].as_u64().is_some(), "acknowledged: {ack}");
        }
        sent += burst;
    }
    let delivered = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("bob received everything in time")
        .expect("reader");
    assert_eq!(delivered, COUNT);
    // The sender's connection is still open and usable.
    let ack = alice.publish("big", "last", "still here").await;
    assert_eq!(ack["offset"], COUNT + 1);
}

/// cloudflare/pingora#946: an upgrade whose 101 the proxy reads before the
/// request's own empty body ended right after the 101 (a few per thousand
/// under load). Fixed in our patched pingora-proxy (third_party/).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_upgrades_end_in_no_early_eof() {
    let (_chat, _port, gw, edge) = stack(&[], &[]);
    let ca = gw.certificate("localhost");
    let mut early_eofs = 0;
    for batch in 0..20 {
        let tries = (0..50).map(|i| {
            let ca = ca.clone();
            async move {
                let user = format!("u{batch}-{i}");
                let mut ws = Ws::connect_tls(edge.https, &token(&user), &ca)
                    .await
                    .expect("upgrade");
                ws.recv_or_close().await.map(|w| w["type"] == "welcome")
            }
        });
        for result in futures_util::future::join_all(tries).await {
            match result {
                Ok(true) => {}
                Ok(false) => panic!("the first frame was not the welcome"),
                Err(_) => early_eofs += 1,
            }
        }
    }
    assert_eq!(early_eofs, 0, "upgrades that ended before the first frame");
}

/// What one chat client saw over the whole test.
#[derive(Debug, Default)]
struct Seen {
    /// Close codes received (0: the stream ended without a close frame).
    closes: Vec<u16>,
    /// Offsets delivered, in order of arrival.
    delivered: Vec<u64>,
    /// Acknowledged publishes: (id, offset).
    acked: Vec<(String, u64)>,
    connects: usize,
}

/// A chat client through the gateway that publishes every `every` until
/// `stop`, and on any close reconnects, resumes from its last offset and
/// re-sends what was not acknowledged (as the protocol asks of clients).
async fn client(
    port: u16,
    ca: Vec<u8>,
    user: String,
    conv: String,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Seen {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = Seen::default();
    let mut pending: Vec<String> = Vec::new();
    let mut next = 0;
    let mut last: Option<u64> = None;
    loop {
        let mut ws = loop {
            if let Ok(ws) = portico_tests::client::ws_stream(port, &token(&user), &ca).await {
                break ws;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        seen.connects += 1;
        // From the start of the conversation, then from the last offset.
        let sub = serde_json::json!({"type": "subscribe", "conv": conv, "since": last.unwrap_or(0)});
        let resend = pending
            .iter()
            .map(|id| serde_json::json!({"type": "publish", "conv": conv, "id": id, "body": id}).to_string());
        let mut out: Vec<String> = std::iter::once(sub.to_string()).chain(resend).collect();
        let mut tick = tokio::time::interval(every);
        let ended = loop {
            for text in out.drain(..) {
                if ws.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            let stopping = stop.is_cancelled();
            if stopping && pending.is_empty() {
                // Everything acknowledged: wait for the last deliveries.
                match tokio::time::timeout(Duration::from_millis(1500), ws.next()).await {
                    Err(_) => return seen,
                    Ok(frame) => match handle(frame, &mut seen, &mut pending, &mut last) {
                        Some(code) => break code,
                        None => continue,
                    },
                }
            }
            tokio::select! {
                _ = tick.tick(), if !stopping => {
                    let id = format!("{user}-{next}");
                    next += 1;
                    pending.push(id.clone());
                    out.push(serde_json::json!({"type": "publish", "conv": conv, "id": id, "body": id}).to_string());
                }
                frame = ws.next() => {
                    if let Some(code) = handle(frame, &mut seen, &mut pending, &mut last) {
                        break code;
                    }
                }
            }
        };
        seen.closes.push(ended);
    }
}

/// Applies one received frame; `Some(code)` when the connection ended.
fn handle(
    frame: Option<Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>>,
    seen: &mut Seen,
    pending: &mut Vec<String>,
    last: &mut Option<u64>,
) -> Option<u16> {
    use tokio_tungstenite::tungstenite::Message;
    match frame {
        None | Some(Err(_)) => Some(0),
        Some(Ok(Message::Close(f))) => Some(f.map_or(1005, |f| u16::from(f.code))),
        Some(Ok(Message::Text(t))) => {
            let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
            match v["type"].as_str() {
                Some("message") => {
                    let offset = v["offset"].as_u64().expect("offset");
                    seen.delivered.push(offset);
                    *last = Some(offset);
                }
                Some("ack") => {
                    let id = v["id"].as_str().expect("id").to_string();
                    pending.retain(|p| *p != id);
                    seen.acked.push((id, v["offset"].as_u64().expect("offset")));
                }
                Some("error") => panic!("error frame: {v}"),
                _ => {}
            }
            None
        }
        Some(Ok(_)) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_hands_every_websocket_over_with_1001_and_loses_nothing() {
    const PAIRS: usize = 50;
    let grace = [("PORTICO_GATEWAY__GRACE_PERIOD_SECS", "2".to_string())];
    let (_chat, port, gw, edge) = stack(&[], &grace);
    let ca = gw.certificate("localhost");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for p in 0..PAIRS {
        let conv = format!("pair{p}");
        let (a, b) = (format!("a{p}"), format!("b{p}"));
        create_conversation(port, &a, &conv, &[&a, &b]).await;
        for user in [a, b] {
            clients.push(tokio::spawn(client(
                edge.https,
                ca.clone(),
                user,
                conv.clone(),
                Duration::from_millis(200),
                stop.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    env.push(("PORTICO_GATEWAY__CHAT_SHARDS", format!("[\"127.0.0.1:{port}\"]")));
    env.extend(grace.iter().cloned());
    let mut new = gw.upgrade_gateway(&env);
    let mut gw = gw;
    let exited = tokio::task::spawn_blocking(move || {
        let s = gw.proc.wait_exit(Duration::from_secs(20));
        (s, gw)
    })
    .await
    .unwrap();
    assert_eq!(
        exited.0.and_then(|s| s.code()),
        Some(0),
        "the old gateway exits cleanly"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let mut seen = Vec::new();
    for c in clients {
        seen.push(
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("client ends")
                .unwrap(),
        );
    }
    assert!(new.is_running(), "{}", new.log());

    let closes: Vec<u16> = seen.iter().flat_map(|s| s.closes.iter().copied()).collect();
    assert!(
        closes.len() >= 2 * PAIRS,
        "every client was handed over: {closes:?}"
    );
    assert!(
        closes.iter().all(|&c| c == 1001),
        "only 1001, never 1006: {closes:?}"
    );
    for pair in seen.chunks(2) {
        let acked: std::collections::BTreeMap<u64, &str> = pair
            .iter()
            .flat_map(|s| s.acked.iter().map(|(id, o)| (*o, id.as_str())))
            .collect();
        let newest = *acked.keys().last().expect("messages were acknowledged");
        let offsets: Vec<u64> = (1..=newest).collect();
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            offsets,
            "every stored message acknowledged"
        );
        for s in pair {
            assert_eq!(
                s.delivered, offsets,
                "each member got every message once, in order"
            );
        }
    }
}

#[tokio::test]
async fn a_killed_shard_s_clients_are_told_to_come_back_not_cut_off() {
    let (chat, _port, gw, edge) = stack(&[], &[]);
    let ca = gw.certificate("localhost");
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(
            Ws::via_gateway(edge.https, &token(&format!("k{i}")), &ca, &[])
                .await
                .0,
        );
    }
    chat.proc.signal("KILL");
    for mut ws in clients {
        assert_eq!(ws.expect_close().await, 1012, "service restart: reconnect");
    }
    let text = portico_tests::client::metrics(edge.admin).await;
    assert!(
        text.contains("portico_gateway_websockets_upstream_lost_total 10"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ordinary_disconnects_are_not_errors() {
    let (_chat, _port, gw, edge) = stack(&[], &[]);
    let ca = gw.certificate("localhost");
    // Keep-alive clients that answer, then vanish without a TLS close_notify.
    for _ in 0..30 {
        let mut tls =
            portico_tests::client::tls_connect(edge.https, &ca, std::net::IpAddr::from([127, 0, 0, 1]))
                .await
                .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let _ = tls.read(&mut buf).await;
        drop(tls);
    }
    // Clients that leave in the middle of a request body.
    for _ in 0..10 {
        let mut tls =
            portico_tests::client::tls_connect(edge.https, &ca, std::net::IpAddr::from([127, 0, 0, 1]))
                .await
                .unwrap();
        use tokio::io::AsyncWriteExt;
        tls.write_all(
            b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\nabc",
        )
        .await
        .unwrap();
        drop(tls);
    }
    // HTTP/2 clients that leave right after TLS, during the h2 handshake.
    for _ in 0..20 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", edge.https))
            .await
            .unwrap();
        let cfg = portico_tests::client::tls_config(&ca, &[b"h2"]);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        drop(tls);
    }
    // WebSocket clients that close the tab (the TCP connection just ends).
    for i in 0..30 {
        let (ws, _) = Ws::via_gateway(edge.https, &token(&format!("tab{i}")), &ca, &[]).await;
        drop(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = gw.proc.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(
        errors.is_empty(),
        "{} ERROR lines, e.g.:\n{}",
        errors.len(),
        errors.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    );
    let text = portico_tests::client::metrics(edge.admin).await;
    assert!(
        text.contains("portico_gateway_client_disconnects_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn internal_endpoints_stay_internal_and_readiness_follows_the_shards() {
    let (chat, port, gw, edge) = stack(&[], &[]);
    let http = portico_tests::client::https_client(&gw.certificate("localhost"));
    for path in ["/metrics", "/healthz", "/readyz", "/metrics/x"] {
        let r = http
            .get(format!("https://localhost:{}{path}", edge.https))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(
            !r.text().await.unwrap().contains("portico_"),
            "{path}: no metrics"
        );
    }
    let readyz = |admin: u16| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    portico_tests::eventually(Duration::from_secs(10), "ready with a healthy shard", || async {
        (readyz(edge.admin).await.0 == 200).then_some(())
    })
    .await;
    drop(chat); // killed
    let (_, why) = portico_tests::eventually(Duration::from_secs(10), "not ready without shards", || async {
        let r = readyz(edge.admin).await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert!(
        why.contains(&format!("127.0.0.1:{port}")),
        "names the shard: {why}"
    );
    let _chat = Service::chat_on(port, &[("PORTICO_CHAT__PUBLISH_PER_SEC", "1000000".to_string())]);
    portico_tests::eventually(Duration::from_secs(10), "ready again", || async {
        (readyz(edge.admin).await.0 == 200).then_some(())
    })
    .await;
}

/// The gateway joins a WebSocket to its shard with a tunnel of its own
/// (gateway/src/tunnel.rs): the shard's refusal reaches the client as
/// the shard gave it, a tunnel is logged with its bytes when it ends, and
/// a frame a client sends right behind its upgrade request (read with the
/// head, so the request stays with Pingora) is not lost.
#[tokio::test(flavor = "multi_thread")]
async fn upgrades_refused_tunnelled_or_pipelined_all_reach_their_end() {
    let (_chat, _port, gw, edge) = stack(&[], &[]);
    let ca = gw.certificate("localhost");

    match Ws::connect_with(edge.https, Some("not-a-token"), Some(&ca), &[]).await {
        Err(Refused::Status(status)) => assert_eq!(status, 401, "the shard's answer"),
        Err(e) => panic!("refused otherwise: {e:?}"),
        Ok(_) => panic!("a bad token was let in"),
    }

    let (mut ws, _) = Ws::via_gateway(edge.https, &token("tunnelled"), &ca, &[]).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.recv_type("pong").await["type"], "pong");
    drop(ws);
    let line = portico_tests::eventually(Duration::from_secs(10), "the tunnel's access line", || {
        let log = gw.proc.log();
        async move {
            log.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["target"] == "access" && v["status"] == 101)
        }
    })
    .await;
    assert_eq!(line["path"], "/ws");
    assert!(
        line["up"].as_u64().unwrap() > 0 && line["down"].as_u64().unwrap() > 0,
        "{line}"
    );
    assert!(
        line["upstream"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );

    // Head and first frame in one write.
    let mut tls = tls_connect(edge.https, &ca, [127, 0, 0, 1].into()).await.unwrap();
    let mut wire = format!(
        "GET /ws HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         sec-websocket-protocol: portico.v1, bearer.{}\r\n\r\n",
        token("pipelined")
    )
    .into_bytes();
    let payload = br#"{"type":"ping"}"#;
    let mask = [7u8, 1, 2, 3];
    wire.extend([0x81, 0x80 | payload.len() as u8]);
    wire.extend(mask);
    wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tls.write_all(&wire).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        while !String::from_utf8_lossy(&got).contains(r#""type":"pong""#) {
            let mut buf = [0; 4096];
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "ended early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("no pong: {}", String::from_utf8_lossy(&got)));
    assert!(got.starts_with(b"HTTP/1.1 101 "));
}
