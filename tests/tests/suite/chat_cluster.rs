//! Chat shards as separate processes on real Redis and PostgreSQL: fan-out
//! across shards, resume, and what happens when Redis or PostgreSQL go away.

use std::time::Duration;

use futures_util::future::join_all;
use portico_tests::client::{Ws, create_conversation, get_json, token};
use portico_tests::eventually;
use portico_tests::servers::{ChatCluster, http_status};
use serde_json::json;

/// Members of a group spread over two shards, publishers on both at once:
/// every member receives every message exactly once, in offset order.
#[tokio::test]
async fn two_shards_deliver_everything_once_in_order() {
    let c = ChatCluster::start(2, &[]);
    let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
    create_conversation(c.port(0), "u1", "team", &users[1..]).await;
    let mut members = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let ws = Ws::joined(c.port(i % 2), u, "team").await;
        members.push(ws);
    }
    const PER_PUBLISHER: usize = 40;
    let publishers = (0..4).map(|p| {
        let port = c.port(p % 2);
        async move {
            let mut ws = Ws::connect(port, &token(&format!("u{}", p + 1))).await.unwrap();
            ws.recv().await;
            for i in 0..PER_PUBLISHER {
                let ack = ws
                    .publish("team", &format!("p{p}-{i}"), &format!("from {p}: {i}"))
                    .await;
                assert_eq!(ack["duplicate"], false);
            }
        }
    });
    join_all(publishers).await;
    let total = 4 * PER_PUBLISHER as u64;
    for ws in &mut members {
        assert_eq!(ws.offsets(total as usize).await, (1..=total).collect::<Vec<_>>());
        assert!(
            ws.no_message_within(Duration::from_millis(300)).await,
            "nothing twice"
        );
    }
}

/// A client misses five messages, reconnects to the *other* shard with
/// `since`: it gets exactly those five, then live ones; a retried publish
/// is not stored twice.
#[tokio::test]
async fn resume_on_another_shard_is_lossless_and_retries_dedupe() {
    let c = ChatCluster::start(2, &[]);
    create_conversation(c.port(0), "alice", "dm", &["bob"]).await;
    let mut alice = Ws::joined(c.port(0), "alice", "dm").await;
    let mut bob = Ws::joined(c.port(1), "bob", "dm").await;
    alice.publish("dm", "m0", "seen").await;
    let seen = bob.recv_type("message").await["offset"].as_u64().unwrap();
    drop(bob);

    for i in 1..=5 {
        alice
            .publish("dm", &format!("m{i}"), &format!("missed {i}"))
            .await;
    }
    let retry = alice.publish("dm", "m2", "missed 2").await;
    assert_eq!(
        (retry["duplicate"].as_bool(), retry["offset"].as_u64()),
        (Some(true), Some(3))
    );

    let mut bob = Ws::join(c.port(0), "bob", "dm", Some(seen)).await;
    assert_eq!(bob.recv().await["type"], "subscribed");
    for i in 1..=5 {
        let m = bob.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["body"].as_str()),
            (Some("message"), Some(format!("missed {i}").as_str()))
        );
    }
    alice.publish("dm", "m6", "live").await;
    assert_eq!(bob.recv_type("message").await["offset"], 7);
    assert!(bob.no_message_within(Duration::from_millis(300)).await);
}

/// Redis restarts mid-conversation: shards reconnect on their own, what
/// was published meanwhile reaches everyone, later messages flow again, and
/// history holds every acknowledged message.
#[tokio::test]
async fn redis_restart_loses_nothing_acknowledged() {
    let mut c = ChatCluster::start(2, &[]);
    create_conversation(c.port(0), "alice", "room", &["bob"]).await;
    let mut alice = Ws::joined(c.port(0), "alice", "room").await;
    let mut bob = Ws::joined(c.port(1), "bob", "room").await;
    let mut sender = Ws::connect(c.port(0), &token("alice")).await.unwrap();
    sender.recv().await;

    for i in 1..=3 {
        sender.publish("room", &format!("a{i}"), "before").await;
    }
    assert_eq!(bob.offsets(3).await, vec![1, 2, 3]);

    c.redis().stop();
    for i in 4..=5 {
        let ack = sender.publish("room", &format!("a{i}"), "during").await;
        assert_eq!(ack["offset"], i, "stored and acknowledged while Redis is down");
    }
    c.redis().restart();
    // Both shards notice by themselves; /readyz says when.
    for s in 0..2 {
        let port = c.port(s);
        eventually(Duration::from_secs(15), "shard ready again", || async move {
            (http_status(port, "/readyz") == Some(200)).then_some(())
        })
        .await;
    }
    for i in 6..=8 {
        sender.publish("room", &format!("a{i}"), "after").await;
    }
    assert_eq!(bob.offsets(5).await, vec![4, 5, 6, 7, 8], "bob (other shard)");
    assert_eq!(
        alice.offsets(8).await,
        (1..=8).collect::<Vec<_>>(),
        "alice (publishing shard)"
    );

    let history = get_json(
        &format!("http://127.0.0.1:{}/api/conversations/room/messages", c.port(1)),
        "bob",
    )
    .await;
    let offsets: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (1..=8).collect::<Vec<_>>());
}

/// PostgreSQL stops: a publish fails with `unavailable` and is not
/// acknowledged; once it is back, publishing works again.
#[tokio::test]
async fn postgres_outage_refuses_then_recovers() {
    let mut c = ChatCluster::start(1, &[]);
    create_conversation(c.port(0), "alice", "room", &[]).await;
    let mut ws = Ws::connect(c.port(0), &token("alice")).await.unwrap();
    ws.recv().await;
    assert_eq!(ws.publish("room", "ok1", "stored").await["offset"], 1);

    c.pg.stop();
    ws.send(json!({"type": "publish", "conv": "room", "id": "lost", "body": "not stored"}))
        .await;
    let reply = ws.recv().await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{reply}"
    );
    assert_eq!(http_status(c.port(0), "/readyz"), Some(503));

    c.pg.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let ack = loop {
        ws.send(json!({"type": "publish", "conv": "room", "id": "ok2", "body": "stored again"}))
            .await;
        let f = ws.recv().await;
        if f["type"] == "ack" {
            break f;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never worked again: {f}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ack["offset"], 2, "the refused publish took no offset");
}

/// A client that stops reading is disconnected as a slow consumer (4008)
/// while the other members keep receiving everything.
#[tokio::test]
async fn slow_consumer_is_cut_and_others_keep_receiving() {
    let c = ChatCluster::start(1, &[("PORTICO_CHAT__OUTBOUND_QUEUE", "16".into())]);
    let port = c.port(0);
    create_conversation(port, "alice", "busy", &["bob", "sloth"]).await;
    let mut sloth = Ws::connect_slow(port, &token("sloth")).await.unwrap();
    sloth.send(json!({"type": "subscribe", "conv": "busy"})).await;
    let mut bob = Ws::joined(port, "bob", "busy").await;
    tokio::time::sleep(Duration::from_millis(200)).await; // sloth's subscription lands

    let mut alice = Ws::connect(port, &token("alice")).await.unwrap();
    alice.recv().await;
    let body = "x".repeat(4000);
    const N: u64 = 1500;
    let reader = tokio::spawn(async move {
        let got = bob.offsets(N as usize).await;
        assert_eq!(got, (1..=N).collect::<Vec<_>>());
    });
    for i in 0..N {
        alice.publish("busy", &format!("m{i}"), &body).await;
    }
    reader.await.unwrap();
    let metrics = portico_tests::client::metrics(port).await;
    assert!(
        metrics.contains("portico_chat_slow_consumers_total 1"),
        "metrics:\n{metrics}"
    );
    assert_eq!(sloth.expect_close().await, 4008, "sloth is told why");
}

/// The PostgreSQL store keeps the same contract as the SQLite and memory
/// stores (their unit tests run the same check).
#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_store_keeps_the_store_contract() {
    let pg = portico_tests::servers::Postgres::start();
    let store = portico_chat::store::postgres::PgStore::connect(&pg.url(), 8)
        .await
        .expect("connect");
    portico_chat::store::contract::check(std::sync::Arc::new(store), "pg").await;
}
