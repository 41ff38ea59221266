//! Presence, typing, read receipts, the conversation list, membership
//! changes, service publishing and limits, across two shards on real Redis
//! and PostgreSQL.

use std::time::Duration;

use portico_tests::client::{Refused, Ws, create_conversation, get_json, token, token_with_roles};
use portico_tests::servers::{ChatCluster, Service};
use serde_json::{Value, json};

/// The next event of `kind` by `user` (other frames and events skipped).
async fn event(ws: &mut Ws, kind: &str, user: &str) -> Value {
    loop {
        let e = ws.recv_type("event").await;
        if e["event"]["kind"] == kind && e["user"] == user {
            return e;
        }
    }
}

#[tokio::test]
async fn presence_typing_and_read_receipts_cross_shards() {
    let c = ChatCluster::start(2, &[]);
    create_conversation(c.port(0), "alice", "dm", &["bob"]).await;
    let mut alice = Ws::joined(c.port(0), "alice", "dm").await;
    let mut bob = Ws::joined(c.port(1), "bob", "dm").await;

    event(&mut alice, "joined", "bob").await;
    bob.send(json!({"type": "presence", "conv": "dm"})).await;
    assert_eq!(bob.recv_type("presence").await["users"], json!(["alice", "bob"]));

    bob.send(json!({"type": "typing", "conv": "dm"})).await;
    event(&mut alice, "typing", "bob").await;

    alice.publish("dm", "m1", "one").await;
    alice.publish("dm", "m2", "two").await;
    let list = |user: &'static str, port: u16| async move {
        let v = get_json(&format!("http://127.0.0.1:{port}/api/conversations"), user).await;
        v["conversations"][0].clone()
    };
    let before = list("bob", c.port(1)).await;
    assert_eq!(
        (before["id"].as_str(), before["unread"].as_u64()),
        (Some("dm"), Some(2))
    );
    assert_eq!(before["last_message"]["body"], "two");

    bob.send(json!({"type": "read", "conv": "dm", "offset": 1})).await;
    assert_eq!(event(&mut alice, "read", "bob").await["event"]["offset"], 1);
    assert_eq!(list("bob", c.port(0)).await["unread"], 1);

    drop(bob);
    event(&mut alice, "left", "bob").await;
    alice.send(json!({"type": "presence", "conv": "dm"})).await;
    assert_eq!(alice.recv_type("presence").await["users"], json!(["alice"]));
}

#[tokio::test]
async fn removed_members_lose_access_at_once_and_services_publish() {
    let c = ChatCluster::start(2, &[]);
    create_conversation(c.port(0), "alice", "team", &["bob"]).await;
    let mut bob = Ws::joined(c.port(1), "bob", "team").await;

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}/api/conversations/team", c.port(0));
    let r = http
        .delete(format!("{base}/members/bob"))
        .bearer_auth(token("mallory"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "non-members cannot remove");
    let r = http
        .delete(format!("{base}/members/bob"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let bye = bob.recv_type("unsubscribed").await;
    assert_eq!(bye["reason"], "removed");
    bob.send(json!({"type": "publish", "conv": "team", "id": "x", "body": "still here?"}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "not_member");

    // A service (e.g. jobs) creates an ops channel and publishes into it.
    let ops = token_with_roles("portico-jobs", &["service"]);
    let r = http
        .post(format!("http://127.0.0.1:{}/api/conversations", c.port(0)))
        .bearer_auth(&ops)
        .json(&json!({"id": "ops-acme", "members": ["alice"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut alice = Ws::joined(c.port(1), "alice", "ops-acme").await;
    let url = format!(
        "http://127.0.0.1:{}/api/conversations/ops-acme/messages",
        c.port(0)
    );
    let r = http
        .post(&url)
        .bearer_auth(&ops)
        .json(&json!({"id": "p1", "body": "backup 10%"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let m = alice.recv_type("message").await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("portico-jobs"), Some("backup 10%"))
    );
    let r = http
        .post(&url)
        .bearer_auth(&ops)
        .json(&json!({"id": "p1", "body": "backup 10%"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a retried service publish is not stored twice");
    let r = http
        .post(&url)
        .bearer_auth(token("bob"))
        .json(&json!({"id": "b", "body": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "users must be members to publish");
    let r = http
        .post(&url)
        .bearer_auth(&ops)
        .json(&json!({"id": "p2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn rest_publishing_has_the_websocket_budget() {
    let (_svc, port) = Service::chat(&[("PORTICO_CHAT__PUBLISH_PER_SEC", "20".into())]);
    create_conversation(port, "alice", "r", &["bob"]).await;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/conversations/r/messages");
    let mut statuses = Vec::new();
    for i in 0..100 {
        let r = http
            .post(&url)
            .bearer_auth(token("alice"))
            .json(&json!({"id": format!("m{i}"), "body": "burst"}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    let created = statuses.iter().filter(|&&s| s == 201).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    // Burst 2 × 20 = 40, plus what refills while the burst is sent.
    assert!((40..60).contains(&created), "{created} accepted: {statuses:?}");
    assert_eq!(created + limited, 100, "{statuses:?}");
    // Services (jobs' progress events) are not limited.
    let service = portico_tests::client::token_with_roles("portico-jobs", &["service"]);
    for i in 0..60 {
        let r = http
            .post(&url)
            .bearer_auth(&service)
            .json(&json!({"id": format!("s{i}"), "body": "progress"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
}

#[tokio::test]
async fn publish_rate_and_connection_limits() {
    let (_svc, port) = Service::chat(&[
        ("PORTICO_CHAT__PUBLISH_PER_SEC", "2".into()),
        ("PORTICO_CHAT__MAX_CONNECTIONS", "3".into()),
    ]);
    create_conversation(port, "alice", "c", &["bob"]).await;
    let mut alice = Ws::connect(port, &token("alice")).await.unwrap();
    alice.recv().await;
    let mut limited = None;
    for i in 0..10 {
        alice
            .send(json!({"type": "publish", "conv": "c", "id": format!("m{i}"), "body": "spam"}))
            .await;
        let f = alice.recv().await;
        if f["type"] == "error" {
            limited = Some(f);
            break;
        }
    }
    let limited = limited.expect("rate limit never hit");
    assert_eq!(limited["code"], "rate_limited");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 0);
    assert!(
        limited["id"].as_str().is_some(),
        "names the refused publish: {limited}"
    );
    // REST shares the budget: alice's is spent, so REST refuses her too,
    // with the WebSocket path's code.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/conversations/c/messages"))
        .bearer_auth(token("alice"))
        .json(&json!({"id": "rest1", "body": "over REST"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], limited["code"]);
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    // Bob is not affected by Alice's budget.
    let mut bob = Ws::connect(port, &token("bob")).await.unwrap();
    bob.recv().await;
    assert!(bob.publish("c", "b1", "hello").await["offset"].is_u64());

    let _third = Ws::connect(port, &token("carol")).await.unwrap();
    match Ws::connect(port, &token("dave")).await {
        Err(Refused::Status(503)) => {}
        other => panic!("over the connection limit: expected 503, got {:?}", other.err()),
    }
    drop(bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        Ws::connect(port, &token("dave")).await.is_ok(),
        "a freed slot is reusable"
    );
}
