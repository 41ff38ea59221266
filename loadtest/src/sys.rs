//! Process measurements from /proc: resident memory and CPU time.

use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: u64 = 100;

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time as the kernel splits it: in the program, and in the kernel on
/// its behalf (syscalls, the loopback's packet delivery, scheduling).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub user: Duration,
    pub system: Duration,
}

impl Cpu {
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// What was spent between `before` and `self`.
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), |a, b| Cpu {
            user: a.user + b.user,
            system: a.system + b.system,
        })
    }
}

/// CPU time consumed by `pid` so far.
pub fn cpu(pid: u32) -> Option<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parens.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Option<Duration> {
        let t: u64 = fields.get(i)?.parse().ok()?;
        Some(Duration::from_millis(t * 1000 / TICKS_PER_SEC))
    };
    Some(Cpu {
        user: ticks(11)?,
        system: ticks(12)?,
    })
}

/// User + system CPU time consumed by `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    cpu(pid).map(Cpu::total)
}

/// Raises this process's open-file limit as far as allowed (as root: to the
/// kernel's `nr_open`), so that it and the servers it starts can hold tens
/// of thousands of sockets. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    if rlimit::setrlimit(rlimit::Resource::NOFILE, nr_open, nr_open).is_err() {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
}

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                // The parent is the second field after the command (in parens).
                stat.rfind(')')
                    .and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// CPU time of all of `pids` so far (those still running).
pub fn cpu_time_of(pids: impl IntoIterator<Item = u32>) -> Duration {
    cpu_of(pids).total()
}

/// CPU time of all of `pids` so far, split (those still running).
pub fn cpu_of(pids: impl IntoIterator<Item = u32>) -> Cpu {
    pids.into_iter().filter_map(cpu).sum()
}

/// Resident memory of all of `pids`, in bytes (those still running).
pub fn rss_bytes_of(pids: impl IntoIterator<Item = u32>) -> u64 {
    pids.into_iter().filter_map(rss_bytes).sum()
}

pub fn self_cpu_time() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}
