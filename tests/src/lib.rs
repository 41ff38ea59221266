//! The test harness: throwaway real servers (Redis, PostgreSQL) and the
//! project's own binaries as child processes on free loopback ports, with
//! readiness waits and teardown on drop (also when a test panics).
//!
//! Nothing here mocks a server. Every test gets its own servers, ports and
//! directories, so tests run in parallel and twice in a row.

pub mod bins;
pub mod browser;
pub mod client;
pub mod docker;
pub mod dovecot;
pub mod proc;
pub mod servers;
pub mod upstream;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Two consecutive free ports (for `portico up`'s shard numbering).
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let p = free_port();
        if p < 65535 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports found");
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A JWT secret for tests (services require one).
pub const TEST_SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
