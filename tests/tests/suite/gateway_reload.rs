//! SIGHUP reloads the routes from the configuration file: a good file
//! applies without dropping an open WebSocket, a broken one is refused with
//! the reason logged and the old routes kept.

use std::time::Duration;

use portico_tests::client::{Ws, https_client, token};
use portico_tests::eventually;
use portico_tests::servers::{EdgePorts, Service};
use serde_json::json;

/// How many requests the gateway counted for `route`.
async fn routed(admin: u16, route: &str) -> u64 {
    let text = portico_tests::client::metrics(admin).await;
    text.lines()
        .filter(|l| {
            l.starts_with("portico_gateway_requests_total{") && l.contains(&format!("route=\"{route}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn sighup_applies_good_routes_and_refuses_broken_ones() {
    let (_chat, chat_port) = Service::chat(&[]);
    let (_jobs, jobs_port) = Service::jobs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[gateway]\n").unwrap();
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{chat_port}\"]"),
    ));
    let gw = Service::gateway(&["--config", file.to_str().unwrap()], &env, &edge);
    let http = https_client(&gw.certificate("localhost"));
    let url = format!("https://localhost:{}/extra/page", edge.https);

    let (mut ws, welcome) =
        Ws::via_gateway(edge.https, &token("alice"), &gw.certificate("localhost"), &[]).await;
    assert_eq!(welcome["type"], "welcome");
    http.get(&url).send().await.unwrap();
    assert_eq!(routed(edge.admin, "extra").await, 0, "no such route yet");

    let good = format!(
        "[gateway]\n[[gateway.routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nupstream = \"127.0.0.1:{jobs_port}\"\n"
    );
    std::fs::write(&file, good).unwrap();
    gw.proc.signal("HUP");
    eventually(Duration::from_secs(10), "the new route", || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.get(&url).send().await.ok()?;
            (routed(edge.admin, "extra").await > 0).then_some(())
        }
    })
    .await;

    std::fs::write(
        &file,
        "[gateway]\n[[gateway.routes]]\nname = \"x\"\npath_prefix = \"nope\"\nupstream = \"chat\"\n",
    )
    .unwrap();
    gw.proc.signal("HUP");
    eventually(Duration::from_secs(10), "the refusal in the log", || {
        let log = gw.proc.log();
        async move { log.contains("configuration refused").then_some(()) }
    })
    .await;
    assert!(
        gw.proc.log().contains("path_prefix must start with /"),
        "the log says why"
    );
    let before = routed(edge.admin, "extra").await;
    http.get(&url).send().await.unwrap();
    assert_eq!(routed(edge.admin, "extra").await, before + 1, "old routes kept");

    // The WebSocket opened before both reloads still works.
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.recv_type("pong").await["type"], "pong");
    let gauge = || async {
        let text = portico_tests::client::metrics(edge.admin).await;
        portico_tests::client::sample(&text, "portico_gateway_websockets")
    };
    assert_eq!(gauge().await, Some(1.0), "one open WebSocket");
    drop(ws);
    eventually(Duration::from_secs(5), "the gauge back to 0", || async {
        (gauge().await == Some(0.0)).then_some(())
    })
    .await;
}
