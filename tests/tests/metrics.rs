//! Every service's `/metrics` is valid Prometheus exposition and follows
//! the naming rules (`promtool check metrics`).

use std::io::Write;
use std::process::{Command, Stdio};

use portico_tests::client::{Ws, https_client, token};
use portico_tests::servers::{Service, up};
use serde_json::json;

fn promtool_check(name: &str, text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool not runnable ({e}); ./scripts/test installs the `prometheus` package"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name} /metrics fails promtool:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
    ] {
        assert!(text.contains(metric), "gateway exposes {metric}:\n{text}");
    }
    drop(chat);
}
