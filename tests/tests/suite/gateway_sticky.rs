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

/// Two gateways with the same shards (listed in another order) send every
/// user to the same shard: the placement is a pure function of the shard
/// addresses and the user, not of the process or the list's order. A
/// client that loses one gateway and comes back through the other resumes
/// with `since` and misses nothing.
#[tokio::test]
async fn two_gateways_agree_and_a_client_moved_between_them_resumes() {
    let c = portico_tests::servers::ChatCluster::start(3, &[]);
    let gateway = |order: [usize; 3]| {
        let edge = EdgePorts::free();
        let mut env = edge.env();
        env.extend(EdgePorts::unlimited());
        let list: Vec<String> = order
            .iter()
            .map(|&i| format!("\"127.0.0.1:{}\"", c.port(i)))
            .collect();
        env.push(("PORTICO_GATEWAY__CHAT_SHARDS", format!("[{}]", list.join(","))));
        (Service::gateway(&[], &env, &edge), edge)
    };
    let (gw_a, edge_a) = gateway([0, 1, 2]);
    let (gw_b, edge_b) = gateway([2, 0, 1]);
    let ca_a = gw_a.certificate("localhost");
    let ca_b = gw_b.certificate("localhost");
    let all_up = |p: &HashMap<String, u64>| (1..=3).all(|s| p.values().any(|&v| v == s));
    let via_a = settled(edge_a.https, &ca_a, all_up).await;
    let via_b = settled(edge_b.https, &ca_b, all_up).await;
    assert_eq!(via_a, via_b, "both gateways place every user on the same shard");

    portico_tests::client::create_conversation(c.port(0), "alice", "moves", &["bob"]).await;
    let subscribe = |since: Option<u64>| {
        let mut f = serde_json::json!({"type": "subscribe", "conv": "moves"});
        if let Some(s) = since {
            f["since"] = s.into();
        }
        f
    };
    let (mut alice, _) = Ws::via_gateway(edge_a.https, &token("alice"), &ca_a, &[]).await;
    alice.send(subscribe(None)).await;
    alice.recv_type("subscribed").await;
    let (mut bob, _) = Ws::via_gateway(edge_b.https, &token("bob"), &ca_b, &[]).await;
    bob.publish("moves", "m1", "one").await;
    let seen = alice.recv_type("message").await["offset"].as_u64().unwrap();

    // Gateway A goes away with alice's connection; bob goes on.
    drop(alice);
    drop(gw_a);
    for i in 2..=4 {
        bob.publish("moves", &format!("m{i}"), "while away").await;
    }
    let (mut alice, _) = Ws::via_gateway(edge_b.https, &token("alice"), &ca_b, &[]).await;
    alice.send(subscribe(Some(seen))).await;
    alice.recv_type("subscribed").await;
    assert_eq!(alice.offsets(3).await, vec![2, 3, 4], "exactly what was missed");
    bob.publish("moves", "m5", "live").await;
    assert_eq!(alice.offsets(1).await, vec![5]);
    assert!(alice.no_message_within(Duration::from_millis(300)).await);
}
