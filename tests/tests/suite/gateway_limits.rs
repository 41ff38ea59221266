//! The gateway's limits: per-IP rate limits answer 429 with Retry-After
//! without touching other clients; oversized bodies get 413.

use portico_tests::client::{https_client, https_client_from};
use portico_tests::free_port_pair;
use portico_tests::servers::{EdgePorts, Service};

fn gateway(extra: &[(&'static str, &str)]) -> (Service, EdgePorts) {
    let edge = EdgePorts::free();
    let mut env = edge.env();
    let shards = free_port_pair();
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{shards}\"]"),
    ));
    for (k, v) in extra {
        env.push((k, v.to_string()));
    }
    (Service::gateway(&[], &env, &edge), edge)
}

#[tokio::test]
async fn over_the_limit_gets_429_with_retry_after_and_others_are_unaffected() {
    let (svc, edge) = gateway(&[
        ("PORTICO_GATEWAY__LIMITS__REQUESTS_PER_SEC", "1"),
        ("PORTICO_GATEWAY__LIMITS__REQUESTS_BURST", "3"),
    ]);
    let ca = svc.certificate("localhost");
    let url = format!("https://localhost:{}/anything", edge.https);
    let noisy = https_client(&ca);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(noisy.get(&url).send().await.unwrap());
    }
    // No shard is running: admitted requests get 502, the fourth 429.
    assert!(
        statuses[..3].iter().all(|r| r.status() != 429),
        "burst of 3 admitted"
    );
    let limited = &statuses[3];
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");

    let other = https_client_from(&ca, 2);
    assert_ne!(
        other.get(&url).send().await.unwrap().status(),
        429,
        "another client is not limited"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let (svc, edge) = gateway(&[("PORTICO_GATEWAY__MAX_BODY_BYTES", "1024")]);
    let http = https_client(&svc.certificate("localhost"));
    let url = format!("https://localhost:{}/api/conversations", edge.https);
    let r = http.post(&url).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let r = http.post(&url).body(vec![b'x'; 100]).send().await.unwrap();
    assert_ne!(r.status(), 413);
}

#[tokio::test]
async fn tokens_in_the_query_never_reach_the_logs() {
    let (svc, edge) = gateway(&[]);
    let http = https_client(&svc.certificate("localhost"));
    // No shard runs behind this gateway: the request fails and is logged.
    let secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl";
    let r = http
        .get(format!("https://localhost:{}/ws?token={secret}", edge.https))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error());
    portico_tests::eventually(std::time::Duration::from_secs(5), "the access log line", || {
        let log = svc.proc.log();
        async move { log.contains("\"path\":\"/ws\"").then_some(()) }
    })
    .await;
    assert!(
        !svc.proc.log().contains(secret),
        "token leaked into the log:\n{}",
        svc.proc.log()
    );
}
