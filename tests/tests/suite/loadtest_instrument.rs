//! The load generator's own correctness: a tiny scenario against two real
//! shards, and its counters must add up (sent × members = received + lost);
//! through a shard SIGKILL its clients reconnect, resume and lose nothing
//! (checked against PostgreSQL too); and a delivery it is told to drop is
//! reported as lost and fails the run. This checks the instrument, not the
//! speed.

use std::process::Command;
use std::time::Duration;

use portico_tests::servers::{ChatCluster, EdgePorts, Service};
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

/// The README's example, as written: a run against `portico up` (embedded
/// engines, through the gateway over TLS, within its per-IP connect rate).
#[test]
fn a_short_run_against_portico_up() {
    let (svc, edge) = portico_tests::servers::up();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, svc.certificate("localhost")).unwrap();
    let out = Command::new(bins::bin("loadtest", "portico-loadtest"))
        .args([
            "run",
            "-c",
            "100",
            "--connect-rate",
            "10",
            "-s",
            "10",
            "-m",
            "200",
            "-d",
            "10",
        ])
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
    assert!(stdout.contains("connections ok/failed  100 / 0"), "{stdout}");
    assert!(stdout.contains("received/lost          20000 / 0"), "{stdout}");
}

/// `portico-loadtest run` with `args`; (exit success, stdout+stderr, JSON report).
fn loadtest(args: &[String]) -> std::process::Child {
    Command::new(bins::bin("loadtest", "portico-loadtest"))
        .arg("run")
        .args(args)
        .args(["--secret", TEST_SECRET])
        .env_remove("PORTICO_AUTH__JWT_SECRET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: std::process::Child, json: &std::path::Path) -> (bool, String, serde_json::Value) {
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read(json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no report:\n{text}"));
    (out.status.success(), text, report)
}

#[test]
fn a_shard_killed_under_load_costs_reconnects_not_messages() {
    let mut c = ChatCluster::start(2, &[]);
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{}\",\"127.0.0.1:{}\"]", c.port(0), c.port(1)),
    ));
    let gw = Service::gateway(&[], &env, &edge);
    let dir = tempfile::tempdir().unwrap();
    let (ca, json) = (dir.path().join("ca.pem"), dir.path().join("report.json"));
    std::fs::write(&ca, gw.certificate("localhost")).unwrap();
    let run = loadtest(&[
        "-c".into(),
        "40".into(),
        "-s".into(),
        "4".into(),
        "-m".into(),
        "100".into(),
        "-d".into(),
        "8".into(),
        "--url".into(),
        format!("wss://localhost:{}/ws", edge.https),
        "--ca".into(),
        ca.display().to_string(),
        "--json".into(),
        json.display().to_string(),
        "--verify-store".into(),
        c.pg.url(),
    ]);
    std::thread::sleep(Duration::from_secs(3));
    c.kill(0);
    std::thread::sleep(Duration::from_secs(1));
    c.restart(0);
    let (ok, text, r) = finish(run, &json);
    assert!(ok, "{text}");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {r}"));
    assert!(
        n("reconnects") > 0,
        "the killed shard's clients came back: {text}"
    );
    assert_eq!(n("dead_connections"), 0, "{text}");
    assert_eq!(
        (
            n("deliveries_lost"),
            n("deliveries_duplicated"),
            n("deliveries_out_of_order")
        ),
        (0, 0, 0),
        "{text}"
    );
    assert!(n("deliveries_expected") > 0);
    assert!(text.contains("store verified"), "{text}");
    println!("{text}");
}

#[test]
fn a_dropped_delivery_is_reported_lost_and_fails_the_run() {
    let c = ChatCluster::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let run = loadtest(&[
        "-c".into(),
        "4".into(),
        "-s".into(),
        "4".into(),
        "-m".into(),
        "20".into(),
        "-d".into(),
        "1".into(),
        "--url".into(),
        format!("ws://127.0.0.1:{}/ws", c.port(0)),
        "--json".into(),
        json.display().to_string(),
        "--test-drop-one-delivery".into(),
    ]);
    let (ok, text, r) = finish(run, &json);
    assert!(!ok, "the run fails: {text}");
    assert_eq!(r["deliveries_lost"], 1, "{text}");
    assert!(text.contains("1 acknowledged deliveries lost"), "{text}");
}
