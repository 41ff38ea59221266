//! `bench --profile`: CPU profiles of the servers under a scenario's load.
//!
//! `perf record` (DWARF call graphs: release builds keep no frame
//! pointers) samples a process while the load runs; the stacks are folded
//! and drawn by inferno into `loadtest/results/profiles/<scenario>-<process>.svg`,
//! beside a `.txt` of the functions with the most samples of their own and
//! the crates they belong to. Needs `perf` (Debian `linux-perf`) and
//! inferno (`cargo install inferno`): both are tools run as processes, not
//! linked (inferno's licence is CDDL).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// Whether `perf` and inferno are there; says what is missing.
pub fn available() -> anyhow::Result<()> {
    for (tool, install) in [
        ("perf", "apt-get install linux-perf"),
        ("inferno-flamegraph", "cargo install inferno"),
    ] {
        Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("--profile needs {tool} ({install})"))?;
    }
    Ok(())
}

/// A `perf record` of one process, running until [`Recording::finish`].
pub struct Recording {
    child: Child,
    data: PathBuf,
    name: String,
    _dir: tempfile::TempDir,
}

/// Starts sampling `pid` (99 Hz, DWARF stacks) as `name` (e.g. `proxy-gateway`).
pub fn record(pid: u32, name: &str) -> anyhow::Result<Recording> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("perf.data");
    let child = Command::new("perf")
        .args(["record", "-F", "99", "--call-graph", "dwarf,16384", "-q", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    Ok(Recording {
        child,
        data,
        name: name.to_string(),
        _dir: dir,
    })
}

impl Recording {
    /// Stops sampling and writes `<out>/profiles/<name>.svg` and `.txt`.
    pub fn finish(mut self, out: &Path) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.child.wait()?;
        let dir = out.join("profiles");
        std::fs::create_dir_all(&dir)?;
        let script = Command::new("perf")
            .arg("script")
            .arg("-i")
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let folded = pipe("inferno-collapse-perf", &["--all"], &script.stdout)?;
        let title = format!("{} (bench --profile)", self.name);
        let svg = pipe("inferno-flamegraph", &["--title", &title], &folded)?;
        std::fs::write(dir.join(format!("{}.svg", self.name)), svg)?;
        std::fs::write(
            dir.join(format!("{}.txt", self.name)),
            summary(&String::from_utf8_lossy(&folded)),
        )?;
        eprintln!("profile: {}", dir.join(format!("{}.svg", self.name)).display());
        Ok(())
    }
}

fn pipe(tool: &str, args: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("{tool}: writer panicked"))??;
    anyhow::ensure!(out.status.success(), "{tool} failed");
    Ok(out.stdout)
}

/// The leaf functions with the most samples, and samples by crate (the
/// leaf's first path segment; `[kernel]` for the kernel), from folded stacks.
fn summary(folded: &str) -> String {
    let mut total = 0u64;
    let mut leaves: HashMap<&str, u64> = HashMap::new();
    let mut inclusive: HashMap<&str, u64> = HashMap::new();
    let mut crates: HashMap<String, u64> = HashMap::new();
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        total += n;
        let mut seen = std::collections::HashSet::new();
        for f in stack.split(';').filter(|f| seen.insert(*f)) {
            *inclusive.entry(f).or_default() += n;
        }
        let leaf = stack.rsplit(';').next().unwrap_or(stack);
        *leaves.entry(leaf).or_default() += n;
        *crates.entry(crate_of(leaf)).or_default() += n;
    }
    let mut out = format!("{total} (samples weighted by CPU cycles)\n");
    let mut section = |title: &str, counts: HashMap<String, u64>, rows: usize| {
        out.push_str(&format!("\n{title}\n"));
        let mut ranked: Vec<_> = counts.into_iter().collect();
        ranked.sort_by_key(|(name, n)| (std::cmp::Reverse(*n), name.clone()));
        for (name, n) in ranked.into_iter().take(rows) {
            out.push_str(&format!(
                "{:5.1}%  {name}\n",
                100.0 * n as f64 / total.max(1) as f64
            ));
        }
    };
    let owned = |m: HashMap<&str, u64>| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    section("by crate (own samples)", crates, 15);
    section("functions (own samples)", owned(leaves), 30);
    section("functions (with what they call)", owned(inclusive), 60);
    out
}

fn crate_of(leaf: &str) -> String {
    if leaf.ends_with("_[k]") {
        return "[kernel]".into();
    }
    let name = leaf
        .trim_start_matches('<')
        .trim_start_matches("&mut ")
        .trim_start_matches('&');
    match name.split_once("::") {
        Some((c, _)) => c.to_string(),
        None => "[libc and others]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_own_samples_by_function_and_crate() {
        let folded = "main;tokio::run;rustls::conn::encrypt 30\n\
                      main;tokio::run;do_syscall_64_[k] 50\n\
                      main;memcpy 20\n";
        let s = summary(folded);
        assert!(s.starts_with("100 (samples"), "{s}");
        assert!(s.contains("100.0%  main\n"), "{s}");
        assert!(s.contains(" 80.0%  tokio::run\n"), "{s}");
        assert!(s.contains(" 50.0%  [kernel]"), "{s}");
        assert!(s.contains(" 30.0%  rustls"), "{s}");
        assert!(s.contains(" 20.0%  [libc and others]"), "{s}");
        assert!(s.contains(" 30.0%  rustls::conn::encrypt"), "{s}");
    }
}
