//! `systemctl reload portico-gateway`, under systemd's rules for a
//! `Type=notify`, `NotifyAccess=all` unit, without systemd (there is none
//! in a test sandbox): the test plays the service manager. It runs the
//! unit's own `ExecStart` and `ExecReload` lines, listens on the
//! notification socket, follows `MAINPID=` as systemd does, and checks
//! what systemd would need for the unit to stay active through the
//! reload: the new process claims the main-process role (and is ready)
//! before the old one exits, and the old one never says STOPPING. A
//! client hammering the gateway meanwhile sees no failed request.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use portico_tests::proc::Proc;
use portico_tests::servers::{EdgePorts, Hammer};
use portico_tests::{TEST_SECRET, bins};

/// The service manager's side of the notification protocol.
struct Manager {
    sock: UnixDatagram,
    main_pid: u32,
    /// Every message, with the main PID in force when it arrived.
    seen: Vec<String>,
}

impl Manager {
    /// Reads messages for at most `wait` or until `until` holds, applying
    /// `MAINPID=` as systemd does with `NotifyAccess=all`.
    fn pump(&mut self, wait: Duration, mut until: impl FnMut(&Manager) -> bool) {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 1024];
        while Instant::now() < deadline && !until(self) {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                for line in msg.lines() {
                    if let Some(pid) = line.strip_prefix("MAINPID=") {
                        self.main_pid = pid.parse().expect("a pid");
                    }
                }
                self.seen.push(msg);
            }
        }
    }
}

/// The value of `key=` in the unit, with the binary pointed at the one
/// just built and the configuration left to the environment.
fn unit_line(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the unit"))
        .replace(
            "/usr/local/bin/portico-gateway",
            &bins::gateway().display().to_string(),
        )
        .replace(" --config /etc/portico/gateway.toml", "")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_under_systemd_rules_keeps_the_unit_active_and_loses_no_request() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/portico-gateway.service"
    ))
    .unwrap();
    for key in ["Type=notify", "NotifyAccess=all"] {
        assert!(unit.lines().any(|l| l == key), "the unit says {key}");
    }
    let (start, reload) = (unit_line(&unit, "ExecStart"), unit_line(&unit, "ExecReload"));
    let script = reload
        .strip_prefix("/bin/sh -c '")
        .and_then(|s| s.strip_suffix('\''))
        .unwrap_or_else(|| panic!("ExecReload is a shell line: {reload}"));

    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    let command = |line: &str| {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(line)
            .env_remove("PORTICO_CONFIG")
            .env("NOTIFY_SOCKET", &sock_path)
            .env("PORTICO_AUTH__JWT_SECRET", TEST_SECRET)
            .env("PORTICO_LOG__FORMAT", "json")
            .env("PORTICO_DATA_DIR", dir.path());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd
    };

    // ExecStart: the main process; the unit is active at READY=1.
    let mut old = Proc::spawn(
        "gateway (ExecStart)",
        command(&format!("exec {start}")),
        &dir.path().join("start.log"),
    );
    let mut m = Manager {
        sock,
        main_pid: old.pid(),
        seen: Vec::new(),
    };
    m.pump(Duration::from_secs(30), |m| {
        m.seen.iter().any(|s| s.contains("READY=1"))
    });
    assert!(
        m.seen.iter().any(|s| s.contains("READY=1")),
        "no READY: {:?}\n{}",
        m.seen,
        old.log()
    );
    assert_eq!(m.main_pid, old.pid(), "{:?}", m.seen);
    edge.wait_listening(&mut old);

    let hammer = Hammer::start(edge.http, "/x", 308);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // ExecReload, with $MAINPID as systemd sets it.
    let old_pid = old.pid();
    let mut reload_cmd = command(script);
    reload_cmd.env("MAINPID", old_pid.to_string());
    let mut reloader = Proc::spawn("ExecReload", reload_cmd, &dir.path().join("reload.log"));
    let before = m.seen.len();
    m.pump(Duration::from_secs(30), |m| m.main_pid != old_pid);
    let new_pid = m.main_pid;
    assert_ne!(
        new_pid, old_pid,
        "the new process never claimed the main role: {:?}",
        m.seen
    );
    assert!(
        alive(old_pid),
        "the new process claimed the main role only after the old one had exited (systemd would have stopped the unit)"
    );
    assert!(
        m.seen[before..].iter().any(|s| s.contains("READY=1")),
        "the new process is ready: {:?}",
        m.seen
    );
    assert!(
        reloader
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    // The old one drains and exits 0, saying nothing that would stop the unit.
    let status = tokio::task::spawn_blocking(move || (old.wait_exit(Duration::from_secs(30)), old))
        .await
        .unwrap();
    assert_eq!(status.0.and_then(|s| s.code()), Some(0), "{}", status.1.log());
    m.pump(Duration::from_millis(300), |_| false);
    assert!(
        !m.seen.iter().any(|s| s.contains("STOPPING=1")),
        "no STOPPING during a reload: {:?}",
        m.seen
    );
    let served_before = hammer.ok();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = hammer.stop().await;
    assert!(alive(new_pid), "the new main process serves");
    assert!(ok > served_before, "answers after the old one left");
    assert_eq!(failed, 0, "no failed request across the reload");

    // `systemctl stop`: SIGTERM to the main process, which says STOPPING.
    std::process::Command::new("kill")
        .args(["-TERM", &new_pid.to_string()])
        .status()
        .unwrap();
    m.pump(Duration::from_secs(10), |m| {
        m.seen.iter().any(|s| s.contains("STOPPING=1"))
    });
    assert!(m.seen.iter().any(|s| s.contains("STOPPING=1")), "{:?}", m.seen);
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(new_pid) {
        assert!(Instant::now() < deadline, "the new gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
