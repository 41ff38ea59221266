//! The load generator's own correctness: a tiny scenario against two real
//! shards, and its counters must add up (sent × members = received + lost).
//! This checks the instrument, not the speed.

use std::process::Command;

use portico_tests::servers::ChatCluster;
use portico_tests::{TEST_SECRET, bins};

#[test]
fn counters_add_up_on_a_tiny_scenario() {
    let c = ChatCluster::start(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(bins::bin("loadtest", "portico-loadtest"))
        .args([
            "run",
            "--connections",
            "24",
            "--group-size",
            "4",
            "--rate",
            "60",
            "--duration",
            "2",
        ])
        .args(["--url", &format!("ws://127.0.0.1:{}/ws", c.port(0))])
        .args(["--url", &format!("ws://127.0.0.1:{}/ws", c.port(1))])
        .args(["--api", &format!("http://127.0.0.1:{}/", c.port(0))])
        .args(["--secret", TEST_SECRET, "--sources", "127.0.0.1,127.0.0.2"])
        .arg("--json")
        .arg(&json)
        .env_remove("PORTICO_AUTH__JWT_SECRET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {r}"));
    assert_eq!(n("connections_ok"), 24);
    assert_eq!(n("messages_sent"), 120, "60 msg/s for 2 s, open loop");
    assert_eq!(n("messages_acked"), n("messages_sent"));
    assert_eq!(
        n("deliveries_expected"),
        n("messages_acked") * 4,
        "every member of a group of 4"
    );
    assert_eq!(
        n("deliveries_received") - n("deliveries_duplicated") + n("deliveries_lost"),
        n("deliveries_expected")
    );
    assert_eq!(
        (
            n("deliveries_lost"),
            n("deliveries_duplicated"),
            n("deliveries_out_of_order")
        ),
        (0, 0, 0)
    );
    assert!(r["latency_ms"]["samples"].as_u64().unwrap() == n("deliveries_received"));
    assert!(stdout.contains("latency ms"), "human table printed:\n{stdout}");
}

/// The README's example: a short run against `portico up` (embedded
/// engines, through the gateway over TLS).
#[test]
fn a_short_run_against_portico_up() {
    let (svc, edge) = portico_tests::servers::up();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, svc.certificate("localhost")).unwrap();
    let out = Command::new(bins::bin("loadtest", "portico-loadtest"))
        .args(["run", "-c", "10", "-s", "5", "-m", "20", "-d", "1"])
        .args(["--url", &format!("wss://localhost:{}/ws", edge.https)])
        .arg("--ca")
        .arg(&ca)
        .args(["--secret", TEST_SECRET])
        .env_remove("PORTICO_AUTH__JWT_SECRET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("received/lost          100 / 0"), "{stdout}");
}
