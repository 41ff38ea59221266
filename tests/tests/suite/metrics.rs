//! Every service's `/metrics` is valid Prometheus exposition and follows
//! the naming rules (`promtool check metrics`).

use portico_tests::client::{Ws, https_client, promtool_check, token};
use portico_tests::servers::{Service, up};
use serde_json::json;

#[tokio::test]
async fn metrics_pass_promtool() {
    // The all-in-one process holds gateway, chat and jobs metrics together.
    let (svc, edge) = up();
    let http = https_client(&svc.certificate("localhost"));
    for path in ["/", "/api/jobs", "/nope"] {
        http.get(format!("https://localhost:{}{path}", edge.https))
            .send()
            .await
            .unwrap();
    }
    let (chat, port) = Service::chat(&[]);
    portico_tests::client::create_conversation(port, "a", "c", &[]).await;
    let mut ws = Ws::connect(port, &token("a")).await.unwrap();
    ws.recv().await;
    ws.send(json!({"type": "subscribe", "conv": "c"})).await;
    ws.publish("c", "m1", "hi").await;
    ws.send(json!({"type": "bogus"})).await;
    ws.recv_type("error").await;

    for (name, port) in [("up (admin)", edge.admin), ("chat shard", port)] {
        let text = portico_tests::client::metrics(port).await;
        assert!(
            text.contains("portico_"),
            "{name} exposes portico metrics:\n{text}"
        );
        promtool_check(name, &text);
    }
    let text = portico_tests::client::metrics(edge.admin).await;
    for metric in [
        "portico_gateway_requests_total",
        "portico_gateway_request_duration_seconds",
        "portico_gateway_upstream_seconds",
        "portico_gateway_connections",
        "portico_gateway_chat_shards{state=\"healthy\"}",
    ] {
        assert!(text.contains(metric), "gateway exposes {metric}:\n{text}");
    }
    drop(chat);
}
