//! Zero-downtime restart: a new gateway started with `--upgrade` takes the
//! listening sockets from the running one (SIGQUIT), and a client hammering
//! the gateway meanwhile sees no failed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use portico_tests::servers::{EdgePorts, Service, http_status};

#[tokio::test(flavor = "multi_thread")]
async fn graceful_upgrade_drops_no_request() {
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.extend(EdgePorts::unlimited());
    let mut old = Service::gateway(&[], &env, &edge);

    // A client that never stops asking (plain-HTTP listener: 308 each time).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let hammer = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_status(edge.http, "/x") {
                    Some(308) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
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
    let served_before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    hammer.await.unwrap();

    assert!(new.is_running(), "the new gateway serves on:\n{}", new.log());
    assert!(
        ok.load(Ordering::Relaxed) > served_before,
        "requests answered after the old one left"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no failed request across the upgrade"
    );
    assert_eq!(
        http_status(edge.admin, "/healthz"),
        Some(200),
        "the new one took the admin port too"
    );
    drop(status.1);
}
