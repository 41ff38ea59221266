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

use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 that no other test process is handed.
///
/// Ports come from below the kernel's ephemeral range, so no outgoing
/// connection of a parallel test can take one between this call and the
/// server's bind (binding port 0 and releasing it raced exactly that way).
/// Test processes claim a port by creating a file named after it in a shared
/// directory (`create_new` is atomic across processes); claims older than
/// `CLAIM_TTL` are stale and taken over, so the range is reused run after run.
pub fn free_port() -> u16 {
    ports::claim(1)
}

/// Two consecutive free ports (for `portico up`'s shard numbering).
pub fn free_port_pair() -> u16 {
    ports::claim(2)
}

mod ports {
    use std::fs::{self, OpenOptions};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, SystemTime};

    /// Longer than any test runs: a claim this old belongs to a finished one.
    const CLAIM_TTL: Duration = Duration::from_secs(20 * 60);
    /// Where the handed-out range starts; it ends at the ephemeral range.
    const LOW: u32 = 10_000;

    fn range() -> (u32, u32) {
        // `ip_local_port_range` is "low<TAB>high"; 32768 is Linux's default.
        let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768);
        assert!(
            ephemeral_low > LOW + 1_000,
            "the ephemeral port range starts at {ephemeral_low}: too low to keep test ports out of it"
        );
        (LOW, ephemeral_low)
    }

    fn claims_dir() -> PathBuf {
        let dir = std::env::temp_dir().join("portico-test-ports");
        fs::create_dir_all(&dir).expect("create the test port claims directory");
        dir
    }

    /// Claims `n` consecutive ports and returns the first.
    pub fn claim(n: u32) -> u16 {
        static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
        let (low, high) = range();
        let span = high - low - n;
        // Each process starts somewhere else in the range (by pid and clock),
        // then walks it: parallel test processes rarely even try the same port.
        let seed = std::process::id()
            ^ SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
        let dir = claims_dir();
        for _ in 0..span {
            let first = low + NEXT.fetch_add(n, Ordering::Relaxed) % span;
            if (first..first + n).all(|p| take(&dir, p)) {
                return first as u16;
            }
        }
        panic!("no {n} consecutive free test ports in {low}..{high}");
    }

    /// Claims one port: free to bind now, and not claimed by a live test.
    fn take(dir: &std::path::Path, port: u32) -> bool {
        let file = dir.join(port.to_string());
        let fresh = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
                .is_ok()
        };
        let claimed = fresh()
            || (fs::metadata(&file)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > CLAIM_TTL)
                && fs::remove_file(&file).is_ok()
                && fresh());
        claimed && TcpListener::bind(("127.0.0.1", port as u16)).is_ok()
    }
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
