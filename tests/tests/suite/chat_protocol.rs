//! The chat protocol against one real shard process (in-memory engines):
//! publish/ack/fan-out, resume, dedupe, authorization and bad input.

use std::time::Duration;

use portico_tests::client::{
    Refused, Ws, create_conversation as create_conv, sign, token, token_with_exp, unix_now,
};
use portico_tests::servers::Service;
use serde_json::json;
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
