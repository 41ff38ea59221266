//! WebSockets through the gateway are long-lived streams with their own
//! limits: never a request body limit, and on an upgrade or a stop the old
//! gateway closes each one with 1001 (come back), spread over the grace
//! period, so no client sees 1006 and no acknowledged message is lost.

use std::time::Duration;

use portico_tests::client::{Ws, create_conversation, token};
use portico_tests::servers::{EdgePorts, Service};

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
