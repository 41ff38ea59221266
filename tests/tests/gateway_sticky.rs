//! Sticky WebSocket routing through the gateway: a user lands on the same
//! shard every time; when that shard dies its users move to another one on
//! reconnect, and when it returns only its own users move back (Ketama).

use std::collections::HashMap;
use std::time::Duration;

use portico_tests::client::{Ws, token};
use portico_tests::servers::{EdgePorts, Service};
use portico_tests::{bins, free_port};

const USERS: usize = 24;

/// Which shard each user lands on (from the `welcome` frame).
async fn placement(port: u16, ca: &[u8]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for i in 0..USERS {
        let user = format!("user{i}");
        let (_ws, welcome) = Ws::via_gateway(port, &token(&user), ca, &[]).await;
        out.insert(user, welcome["shard"].as_u64().expect("shard id"));
    }
    out
}

/// Placement once the gateway's health checks (every second) caught up.
async fn settled(port: u16, ca: &[u8], want: impl Fn(&HashMap<String, u64>) -> bool) -> HashMap<String, u64> {
    for _ in 0..40 {
        let p = placement(port, ca).await;
        if want(&p) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("placement never settled");
}

#[tokio::test]
async fn same_user_same_shard_failover_and_return() {
    let ports = [free_port(), free_port()];
    let shard = |i: usize| Service::chat_on(ports[i], &[("PORTICO_CHAT__SHARD_ID", (i + 1).to_string())]);
    let mut shards = [Some(shard(0)), Some(shard(1))];
    let edge = EdgePorts::free();
    let mut env = edge.env();
    // This test is one client opening hundreds of WebSockets on purpose.
    env.extend(EdgePorts::unlimited());
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{}\",\"127.0.0.1:{}\"]", ports[0], ports[1]),
    ));
    let gw = Service::start(&bins::gateway(), &[], &env, edge.admin);
    let ca = gw.certificate("localhost");

    let first = settled(edge.https, &ca, |p| {
        p.values().any(|&s| s == 1) && p.values().any(|&s| s == 2)
    })
    .await;
    assert_eq!(
        placement(edge.https, &ca).await,
        first,
        "same user, same shard, every time"
    );

    // Shard 1 dies: its users reconnect to shard 2; shard 2's users stay.
    shards[0] = None;
    let failed_over = settled(edge.https, &ca, |p| p.values().all(|&s| s == 2)).await;
    assert!(failed_over.values().all(|&s| s == 2));

    // Shard 1 returns: exactly its own users move back.
    shards[0] = Some(shard(0));
    let back = settled(edge.https, &ca, |p| p == &first).await;
    assert_eq!(back, first);
}
