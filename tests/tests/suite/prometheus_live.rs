//! The shipped rules and Grafana dashboards against a real Prometheus
//! (Debian's `prometheus`) scraping a running stack (`portico up`) with some
//! traffic: every rule evaluates without error, every panel's expression
//! is accepted by the query API, and the core panels return data.

use std::time::Duration;

use portico_tests::client::https_client;
use portico_tests::proc::Proc;
use portico_tests::servers::up;
use portico_tests::{eventually, free_port};
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// Panels that must show data on a stack that served a few requests.
const CORE: &[&str] = &[
    "Requests by status",
    "Request latency p50 / p99",
    "Connections and WebSockets",
    "Chat shards",
    "Requests by route",
];

async fn query(http: &reqwest::Client, port: u16, q: &str) -> Value {
    http.get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_and_dashboards_work_against_a_real_prometheus() {
    if std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED LOUDLY: prometheus is not installed (scripts/test installs it)");
        return;
    }
    let (svc, edge) = up();
    let https = https_client(&svc.certificate("localhost"));
    let dir = tempfile::tempdir().unwrap();
    let conf = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {DEPLOY}/prometheus/rules/portico.rules.yml\n\
         scrape_configs:\n  - job_name: portico-up\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
        edge.admin
    );
    std::fs::write(dir.path().join("prometheus.yml"), conf).unwrap();
    let port = free_port();
    let mut cmd = std::process::Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.path().join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.path().join("data").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut prom = Proc::spawn("prometheus", cmd, &dir.path().join("prometheus.log"));
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(60),
        "Prometheus to scrape the stack",
        || async {
            // Traffic while Prometheus watches: requests of several routes.
            for path in ["/", "/api/jobs", "/nope"] {
                let _ = https
                    .get(format!("https://localhost:{}{path}", edge.https))
                    .send()
                    .await;
            }
            let v = http
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", "up{job=\"portico-up\"}")])
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()?;
            (v["data"]["result"][0]["value"][1] == "1").then_some(())
        },
    )
    .await;
    // A few more scrapes and rule evaluations.
    for _ in 0..6 {
        for path in ["/", "/api/jobs", "/nope"] {
            let _ = https
                .get(format!("https://localhost:{}{path}", edge.https))
                .send()
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every rule loaded and evaluated without error.
    let rules: Value = http
        .get(format!("http://127.0.0.1:{port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 4, "{rules}");
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(
                r["health"], "ok",
                "rule {} of {}: {}",
                r["name"], g["name"], r["lastError"]
            );
        }
    }

    // Every panel's expression is accepted; the core panels have data.
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("{DEPLOY}/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let dash: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            dash["panels"][0]["datasource"]["uid"],
            "portico-prometheus",
            "{}",
            path.display()
        );
        for panel in dash["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            let mut data = false;
            for t in panel["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                let v = query(&http, port, expr).await;
                assert_eq!(v["status"], "success", "{}: {title}: {expr}: {v}", path.display());
                data |= v["data"]["result"].as_array().is_some_and(|r| !r.is_empty());
                checked += 1;
            }
            if CORE.contains(&title) {
                assert!(data, "{}: the core panel {title} has no data", path.display());
            }
        }
    }
    assert!(checked >= 25, "{checked} expressions");
    prom.stop("TERM", Duration::from_secs(10));
}
