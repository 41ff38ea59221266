//! The measuring tools the scenarios run as processes (`wrk`), and the
//! commit their results are labelled with: shared by `bench` and the
//! scenarios with their own tables (`proxy`, `static`).

use std::process::Command;
use std::time::Duration;

use crate::sys::Cpu;
use anyhow::Context;

/// `wrk -t2 -c64 -d10s` on `url` (with a `Host` header): requests/s and p99
/// ms. Fails when any answer was not a success.
pub async fn wrk(url: String, host: Option<String>) -> anyhow::Result<(f64, f64)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64)> {
        let mut cmd = Command::new("wrk");
        cmd.args(["-t2", "-c64", "-d10s", "--latency"]);
        if let Some(h) = host {
            cmd.args(["-H", &format!("Host: {h}")]);
        }
        let out = cmd
            .arg(&url)
            .output()
            .context("running wrk (apt-get install wrk)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // An error page served fast is not the answer measured.
        if let Some(n) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        {
            anyhow::bail!("{url}: {} answers were not 2xx/3xx", n.trim());
        }
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .context("wrk printed no Requests/sec")?;
        let p99 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("99%"))
            .map(|v| parse_wrk_duration(v.trim()))
            .unwrap_or(0.0);
        Ok((rps, p99))
    })
    .await?
}

/// One `wrk` run against a server, with the CPU time it spent.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub rps: f64,
    pub p99_ms: f64,
    /// CPU time per request, µs: in all, in the program, in the kernel.
    pub cpu_us: f64,
    pub user_us: f64,
    pub system_us: f64,
}

/// One `wrk` run on `url`, with the CPU time `cpu` (of the server under
/// test, read before and after) spent per request.
pub async fn wrk_cpu(url: String, cpu: impl Fn() -> Cpu) -> anyhow::Result<Served> {
    let before = cpu();
    let (rps, p99_ms) = wrk(url, None).await?;
    let spent = cpu().since(before);
    // wrk runs for 10 s.
    let per_request = |d: Duration| d.as_secs_f64() * 1e6 / (rps * 10.0).max(1.0);
    Ok(Served {
        rps,
        p99_ms,
        cpu_us: per_request(spent.total()),
        user_us: per_request(spent.user),
        system_us: per_request(spent.system),
    })
}

/// `1.23ms`, `456.00us`, `1.10s` → milliseconds.
fn parse_wrk_duration(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => n,
    }
}

/// The checkout's commit, short, as results name it.
pub fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
