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

impl Served {
    /// Adds `<who>_cpu_us_per_request` and its user and system parts to
    /// the JSON object `obj`.
    pub fn put_cpu(&self, obj: &mut serde_json::Value, who: &str) {
        for (part, us) in [
            ("cpu", self.cpu_us),
            ("user", self.user_us),
            ("system", self.system_us),
        ] {
            obj[format!("{who}_{part}_us_per_request")] = us.into();
        }
    }
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} req/s, p99 {:.2} ms, {:.1} µs CPU/req (user {:.1}, system {:.1})",
            self.rps, self.p99_ms, self.cpu_us, self.user_us, self.system_us
        )
    }
}

/// The runs kept of one server over interleaved rounds (a shared 2-core
/// box is noisy: each side is judged by its better run): the fastest by
/// requests/s, and the lowest CPU time per request of the runs that were
/// not profiled (perf slows the one it samples).
#[derive(Debug, Default, Clone, Copy)]
struct Best {
    fastest: Option<Served>,
    leanest: Option<Served>,
}

impl Best {
    fn add(&mut self, s: Served, profiled: bool) {
        if self.fastest.is_none_or(|k| s.rps > k.rps) {
            self.fastest = Some(s);
        }
        if !profiled && self.leanest.is_none_or(|k| s.cpu_us < k.cpu_us) {
            self.leanest = Some(s);
        }
    }

    /// The fastest run, with the CPU time of the leanest: `None` before
    /// any run.
    fn kept(&self) -> Option<Served> {
        let fastest = self.fastest?;
        let lean = self.leanest.unwrap_or(fastest);
        Some(Served {
            cpu_us: lean.cpu_us,
            user_us: lean.user_us,
            system_us: lean.system_us,
            ..fastest
        })
    }
}

/// Two rounds of `wrk`, the gateway (process `pid`, at `ours`) then nginx
/// (at `theirs`) in each, printed as they come under `label`; each side's
/// kept run ([`Best`]). With `profile` (the profiles' directory and a
/// name), the gateway's first run is profiled.
pub async fn side_by_side(
    label: &str,
    (pid, ours): (u32, &str),
    (nginx, theirs): (&crate::nginx::Nginx, &str),
    profile: Option<(&std::path::Path, &str)>,
) -> anyhow::Result<(Served, Served)> {
    let (mut kept_ours, mut kept_theirs) = (Best::default(), Best::default());
    for round in 0..2 {
        let recording = match profile {
            Some((_, name)) if round == 0 => Some(crate::profile::record(pid, name)?),
            _ => None,
        };
        let g = wrk_cpu(ours.to_string(), || crate::sys::cpu(pid).unwrap_or_default()).await?;
        let profiled = recording.is_some();
        if let (Some(r), Some((out, _))) = (recording, profile) {
            r.finish(out)?;
        }
        kept_ours.add(g, profiled);
        let n = wrk_cpu(theirs.to_string(), || nginx.workers_cpu()).await?;
        kept_theirs.add(n, false);
        println!("{label}: gateway {g}; nginx {n}");
    }
    match (kept_ours.kept(), kept_theirs.kept()) {
        (Some(g), Some(n)) => Ok((g, n)),
        _ => anyhow::bail!("{label}: no run was measured"),
    }
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

#[cfg(test)]
mod tests {
    use super::Served;

    /// The console line, the table cell and the JSON keys the README's
    /// proxy row reads all come from one `Served`.
    #[test]
    fn a_run_is_shown_and_stored_with_its_cpu_split() {
        let s = Served {
            rps: 17921.4,
            p99_ms: 8.744,
            cpu_us: 62.25,
            user_us: 29.0,
            system_us: 33.25,
        };
        assert_eq!(
            s.to_string(),
            "17921 req/s, p99 8.74 ms, 62.2 µs CPU/req (user 29.0, system 33.2)"
        );
        let mut obj = serde_json::json!({ "gateway_rps": s.rps });
        s.put_cpu(&mut obj, "gateway");
        assert_eq!(obj["gateway_cpu_us_per_request"], 62.25);
        assert_eq!(obj["gateway_user_us_per_request"], 29.0);
        assert_eq!(obj["gateway_system_us_per_request"], 33.25);
        assert_eq!(obj["gateway_rps"], 17921.4);
    }
}
