//! Sticky WebSocket routing through the gateway: a user lands on the same
//! shard every time; when that shard dies its users move to another one on
//! reconnect, and when it returns only its own users move back (Ketama).

use std::collections::HashMap;
use std::time::Duration;

use portico_tests::client::{Ws, https_client_from, token};
use portico_tests::free_port;
use portico_tests::servers::{EdgePorts, Service};

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
    let gw = Service::gateway(&[], &env, &edge);
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

/// The upstream the gateway's access log names for requests to `path`.
fn upstreams_for(log: &str, path: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["path"] == path)
        .filter_map(|v| v["upstream"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn anonymous_clients_are_pinned_by_a_cookie_the_gateway_sets() {
    let (_a, a) = Service::chat(&[]);
    let (_b, b) = Service::chat(&[]);
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{a}\",\"127.0.0.1:{b}\"]"),
    ));
    let gw = Service::gateway(&[], &env, &edge);
    let ca = gw.certificate("localhost");
    let client = |last: u8| https_client_from(&ca, last);
    let url = |path: &str| format!("https://localhost:{}{path}", edge.https);

    let first = client(1).get(url("/sticky/0")).send().await.unwrap();
    let set = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("portico_route=") && set.contains("Secure") && set.contains("HttpOnly"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    // The same cookie from six other addresses: same shard, no new cookie.
    for i in 1..=6u8 {
        let r = client(1 + i)
            .get(url(&format!("/sticky/{i}")))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert!(
            r.headers().get("set-cookie").is_none(),
            "a known client keeps its cookie"
        );
    }
    // A forged, malformed cookie is replaced.
    let r = client(1)
        .get(url("/sticky/x"))
        .header("cookie", "portico_route=../../etc")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("set-cookie"));

    let log = portico_tests::eventually(Duration::from_secs(5), "access log lines", || {
        let log = gw.proc.log();
        async move { (!upstreams_for(&log, "/sticky/6").is_empty()).then_some(log) }
    })
    .await;
    let first_shard = upstreams_for(&log, "/sticky/0");
    assert_eq!(first_shard.len(), 1, "{log}");
    for i in 1..=6 {
        assert_eq!(
            upstreams_for(&log, &format!("/sticky/{i}")),
            first_shard,
            "request {i} with the cookie"
        );
    }
}
