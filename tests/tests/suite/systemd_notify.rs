//! Under systemd (`Type=notify`, `WatchdogSec=`), chat and jobs say READY
//! once they listen, keep the watchdog fed, and say STOPPING when they
//! drain. The notification socket is the test's own, as systemd's would be.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use portico_tests::proc::Proc;
use portico_tests::{TEST_SECRET, bins, free_port};

/// Starts `bin` with a notify socket and a 300 ms watchdog; returns what it
/// sent within `wait` and after SIGTERM.
fn notifications(bin: std::path::PathBuf, env: &[(&str, String)]) -> (Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // systemd names the main process in WATCHDOG_PID: a shell that sets it
    // to its own pid and then becomes the service does the same.
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "WATCHDOG_PID=$$ exec \"$0\""]).arg(bin);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "300000")
        .env("PORTICO_AUTH__JWT_SECRET", TEST_SECRET)
        .env("PORTICO_DATA_DIR", dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn("notify", cmd, &dir.path().join("log"));
    let mut before = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline
        && before
            .iter()
            .filter(|m: &&String| m.contains("WATCHDOG=1"))
            .count()
            < 3
    {
        if let Ok(n) = sock.recv(&mut buf) {
            before.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    p.signal("TERM");
    let mut after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !after.iter().any(|m: &String| m.contains("STOPPING=1")) {
        if let Ok(n) = sock.recv(&mut buf) {
            after.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    p.wait_exit(Duration::from_secs(10));
    (before, after)
}

fn check(name: &str, (before, after): (Vec<String>, Vec<String>)) {
    assert!(
        before.first().is_some_and(|m| m.contains("READY=1")),
        "{name}: {before:?}"
    );
    assert!(
        before.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "{name}: {before:?}"
    );
    assert!(
        after.iter().any(|m| m.contains("STOPPING=1")),
        "{name}: {after:?}"
    );
}

#[test]
fn chat_notifies_ready_watchdog_and_stopping() {
    let port = free_port();
    let r = notifications(
        bins::chat(),
        &[("PORTICO_CHAT__LISTEN", format!("127.0.0.1:{port}"))],
    );
    check("chat", r);
}

#[test]
fn jobs_notifies_ready_watchdog_and_stopping() {
    let port = free_port();
    let r = notifications(
        bins::jobs(),
        &[("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}"))],
    );
    check("jobs", r);
}
