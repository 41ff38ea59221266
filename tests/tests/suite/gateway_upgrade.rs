//! Zero-downtime restart: a new gateway started with `--upgrade` takes the
//! listening sockets from the running one (SIGQUIT), and a client hammering
//! the gateway meanwhile sees no failed request.

use std::time::Duration;

use portico_tests::servers::{EdgePorts, Hammer, Service, http_status};

#[tokio::test(flavor = "multi_thread")]
async fn graceful_upgrade_drops_no_request() {
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    let mut old = Service::gateway(&[], &env, &edge);

    // A client that never stops asking (plain-HTTP listener: 308 each time).
    let hammer = Hammer::start(edge.http, "/x", 308);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new process waits for the sockets; then the old one hands them over.
    let mut new = old.upgrade_gateway(&env);
    let status = tokio::task::spawn_blocking(move || {
        let s = old.proc.wait_exit(Duration::from_secs(20));
        (s, old)
    })
    .await
    .unwrap();
    assert_eq!(
        status.0.and_then(|s| s.code()),
        Some(0),
        "old gateway exits cleanly"
    );
    let served_before = hammer.ok();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = hammer.stop().await;

    assert!(new.is_running(), "the new gateway serves on:\n{}", new.log());
    assert!(ok > served_before, "requests answered after the old one left");
    assert_eq!(failed, 0, "no failed request across the upgrade");
    assert_eq!(
        http_status(edge.admin, "/healthz"),
        Some(200),
        "the new one took the admin port too"
    );
    drop(status.1);
}
