//! The chat protocol against one real shard process (in-memory engines):
//! publish/ack/fan-out, resume, dedupe, authorization and bad input.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use portico_tests::client::{
    Refused, Ws, create_conversation as create_conv, sign, token, token_with_exp, unix_now,
};
use portico_tests::servers::Service;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

async fn shard() -> (Service, u16) {
    Service::chat(&[("PORTICO_CHAT__MAX_MESSAGE_BYTES", "4096".into())])
}

#[tokio::test]
async fn members_receive_every_message_once_in_order() {
    let (_svc, port) = shard().await;
    create_conv(port, "alice", "g1", &["bob", "carol"]).await;
    let mut clients = Vec::new();
    for u in ["alice", "bob", "carol"] {
        let mut ws = Ws::join(port, u, "g1", None).await;
        assert_eq!(ws.recv().await["type"], "subscribed");
        clients.push(ws);
    }
    // Publishers on their own connections (not subscribed: they get acks only).
    let mut publishers = Vec::new();
    for u in ["alice", "bob", "carol"] {
        let mut ws = Ws::connect(port, &token(u)).await.unwrap();
        ws.recv().await;
        publishers.push(ws);
    }
    for i in 0..20 {
        let ack = publishers[i % 3]
            .publish("g1", &format!("m{i}"), &format!("hello {i}"))
            .await;
        assert_eq!(
            (ack["duplicate"].as_bool(), ack["offset"].as_u64()),
            (Some(false), Some(i as u64 + 1))
        );
    }
    for ws in &mut clients {
        assert_eq!(ws.offsets(20).await, (1..=20).collect::<Vec<u64>>());
        assert!(ws.no_message_within(Duration::from_millis(200)).await);
    }
    // The shard's own count: 20 messages to 3 subscribers, 6 connections.
    let metrics = portico_tests::client::metrics(port).await;
    for series in [
        "portico_chat_deliveries_total{shard=\"1\"} 60",
        "portico_chat_connections{shard=\"1\"} 6",
        "portico_chat_subscriptions{shard=\"1\"} 3",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
}

#[tokio::test]
async fn resume_gets_exactly_what_was_missed_and_retries_are_not_stored_twice() {
    let (_svc, port) = shard().await;
    create_conv(port, "alice", "dm", &["bob"]).await;
    let mut alice = Ws::joined(port, "alice", "dm").await;
    let mut bob = Ws::joined(port, "bob", "dm").await;
    alice.publish("dm", "a0", "before").await;
    let seen = bob.recv_type("message").await["offset"].as_u64().unwrap();
    drop(bob);

    for i in 1..=5 {
        alice
            .publish("dm", &format!("a{i}"), &format!("missed {i}"))
            .await;
    }
    let retry = alice.publish("dm", "a3", "missed 3").await;
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["offset"], 4);

    let mut bob = Ws::join(port, "bob", "dm", Some(seen)).await;
    assert_eq!(bob.recv().await["type"], "subscribed");
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let m = bob.recv().await;
        assert_eq!(m["type"], "message");
        bodies.push(m["body"].as_str().unwrap().to_string());
    }
    assert_eq!(bodies, (1..=5).map(|i| format!("missed {i}")).collect::<Vec<_>>());
    alice.publish("dm", "a6", "live").await;
    let live = bob.recv_type("message").await;
    assert_eq!(
        (live["body"].as_str(), live["offset"].as_u64()),
        (Some("live"), Some(7))
    );
    assert!(
        bob.no_message_within(Duration::from_millis(200)).await,
        "nothing twice"
    );
}

#[tokio::test]
async fn non_members_are_refused_and_the_connection_stays_usable() {
    let (_svc, port) = shard().await;
    create_conv(port, "alice", "private", &["bob"]).await;
    let mut eve = Ws::connect(port, &token("eve")).await.unwrap();
    eve.recv().await;
    for frame in [
        json!({"type": "subscribe", "conv": "private"}),
        json!({"type": "history", "conv": "private"}),
        json!({"type": "publish", "conv": "private", "id": "x", "body": "hi"}),
    ] {
        eve.send(frame).await;
        let e = eve.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("not_member"))
        );
    }
    eve.send(json!({"type": "ping"})).await;
    assert_eq!(eve.recv().await["type"], "pong");
    let r = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/api/conversations/private/messages"
        ))
        .bearer_auth(token("eve"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn expired_forged_and_missing_tokens_are_refused_at_connect() {
    let (_svc, port) = shard().await;
    let expired = token_with_exp("alice", unix_now() - 600);
    let forged = sign("another-secret-another-secret-another", "alice", unix_now() + 600);
    for (what, t) in [
        ("expired", Some(expired.as_str())),
        ("forged", Some(forged.as_str())),
        ("missing", None),
    ] {
        match Ws::connect_with(port, t, None, &[]).await {
            Err(Refused::Status(401)) => {}
            Err(other) => panic!("{what}: expected 401, got {other:?}"),
            Ok(_) => panic!("{what} token was accepted"),
        }
    }
    match Ws::connect_with(
        port,
        Some(&token("a")),
        None,
        &[("origin", "https://evil.example")],
    )
    .await
    {
        Err(Refused::Status(403)) => {}
        other => panic!("foreign origin: expected 403, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn bad_frames_get_documented_errors_and_the_shard_keeps_serving() {
    let (_svc, port) = shard().await;
    let mut ws = Ws::connect(port, &token("alice")).await.unwrap();
    ws.recv().await;
    let cases = [
        ("{not json", "bad_frame"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"subscribe","conv":"../etc"}"#, "invalid_conversation"),
        (
            r#"{"type":"publish","conv":"c","id":"m","body":""}"#,
            "invalid_body",
        ),
        (r#"{"type":"unsubscribe","conv":"c"}"#, "not_subscribed"),
    ];
    for (raw, code) in cases {
        ws.send_raw(Message::Text(raw.into())).await;
        assert_eq!(ws.recv().await["code"], code, "for {raw}");
    }
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(ws.recv().await["code"], "binary_not_supported");

    // Oversized: closed with 1009; another client is unaffected.
    let mut other = Ws::connect(port, &token("bob")).await.unwrap();
    other.recv().await;
    ws.send_raw(Message::Text("x".repeat(8192).into())).await;
    assert_eq!(ws.expect_close().await, 1009);
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.recv().await["type"], "pong");
}

/// The shard pings every `heartbeat_secs`: a client that reads (and so
/// answers) stays connected well past `idle_timeout_secs`; one that goes
/// silent is closed with 4000, and one whose token expires while it is
/// connected with 4001, whatever else it does.
#[tokio::test]
async fn pings_keep_a_reading_client_while_silence_or_an_expired_token_ends_one() {
    let (_svc, port) = Service::chat(&[
        ("PORTICO_CHAT__HEARTBEAT_SECS", "1".into()),
        ("PORTICO_CHAT__IDLE_TIMEOUT_SECS", "2".into()),
    ]);
    let mut live = portico_tests::client::ws_direct(port, &token("alice")).await;
    // Bob never writes, not even a pong: his socket is read raw, later.
    let mut silent = portico_tests::client::ws_direct(port, &token("bob")).await;
    let mut expiring = Ws::connect(port, &token_with_exp("carol", unix_now() + 3))
        .await
        .expect("carol connects");

    // Twice the idle limit, reading all along (tungstenite answers pings).
    let live_reads = async {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(4500);
        let mut pings = 0;
        while let Ok(next) = tokio::time::timeout_at(deadline, live.next()).await {
            match next {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Text(_))) => {}
                other => panic!("the reading client lost its connection: {other:?}"),
            }
        }
        pings
    };
    let (pings, carol_code) = tokio::join!(live_reads, expiring.expect_close_within(Duration::from_secs(6)));
    assert!(pings >= 2, "a ping every second, got {pings} in 4.5 s");
    assert_eq!(carol_code, 4001, "the expired token closes the connection");
    live.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .expect("still connected");
    loop {
        match live.next().await {
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains("\"pong\""), "{t}");
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("no pong: {other:?}"),
        }
    }
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.get_mut().read_to_end(&mut raw))
        .await
        .expect("the server ends the silent connection")
        .expect("read what the server sent");
    assert_eq!(
        close_code(&raw),
        Some(4000),
        "silence ends in an idle close: {raw:?}"
    );
}

/// The code of the close frame in a server's raw (unmasked) frames, which
/// are all short here: pings, then the close.
fn close_code(mut raw: &[u8]) -> Option<u16> {
    while let [b0, len, rest @ ..] = raw {
        let (len, payload) = (usize::from(*len), rest);
        assert!(len < 126 && payload.len() >= len, "a short server frame: {raw:?}");
        if b0 & 0x0f == 0x8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
        raw = &payload[len..];
    }
    None
}
