//! Real servers for tests: Redis, PostgreSQL, and Portico's own services.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::proc::Proc;
use crate::{TEST_SECRET, bins, free_port};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until `probe` succeeds, failing the test with `proc`'s log if the
/// process dies or the deadline passes.
fn wait_until(proc: &mut Proc, what: &str, probe: impl FnMut() -> bool) {
    if let Err(e) = wait_for(proc, what, probe) {
        panic!("{e}");
    }
}

/// [`wait_until`] that answers the failure instead of panicking.
fn wait_for(proc: &mut Proc, what: &str, mut probe: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !probe() {
        if !proc.is_running() {
            return Err(format!("{} exited before {what}:\n{}", proc.name, proc.log()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} not {what} after {START_TIMEOUT:?}:\n{}",
                proc.name,
                proc.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// A client that asks `GET path` on a plain-HTTP port over and over (a new
/// connection each time) until stopped, counting the answers with the
/// expected status and everything else (other statuses, refused or cut
/// connections): what a restart must not make fail.
pub struct Hammer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Hammer {
    pub fn start(port: u16, path: &'static str, want: u16) -> Hammer {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::task::spawn_blocking(move || {
                while !stop.load(Relaxed) {
                    if http_status(port, path) == Some(want) {
                        ok.fetch_add(1, Relaxed);
                    } else {
                        failed.fetch_add(1, Relaxed);
                    }
                }
            })
        };
        Hammer {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Answers with the expected status so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops; the answers that were as expected and those that were not.
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stop.store(true, Relaxed);
        self.task.await.expect("the hammer ends");
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }
}

/// `GET path` over plain HTTP/1.0; the status code, if any answer came.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

// ---------------------------------------------------------------- Redis --

/// A throwaway `redis-server` on a free port, no persistence.
pub struct Redis {
    proc: Option<Proc>,
    pub port: u16,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            proc: None,
            port: free_port(),
            dir,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Sends `sig` (e.g. `STOP`, `CONT`) to the running server.
    pub fn signal(&self, sig: &str) {
        if let Some(p) = &self.proc {
            p.signal(sig);
        }
    }

    /// (Re)starts the server on the same port.
    pub fn restart(&mut self) {
        self.proc = None;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(self.dir.path());
        let mut proc = Proc::spawn("redis-server", cmd, &self.dir.path().join("redis.log"));
        let port = self.port;
        wait_until(&mut proc, "answering PING", || redis_ping(port));
        self.proc = Some(proc);
    }
}

/// A real Redis Cluster on loopback: `masters` masters with one replica
/// each (Debian's `redis-server`, joined by `redis-cli --cluster create`),
/// a node timeout of one second so that a killed master's replica takes
/// over within a few seconds (measured here: 2-3 s).
pub struct RedisCluster {
    nodes: Vec<RedisNode>,
    dir: TempDir,
}

/// A master of a [`RedisCluster`]: its port, node id and slot ranges.
struct Master {
    port: u16,
    id: String,
    slots: Vec<(u16, u16)>,
}

struct RedisNode {
    port: u16,
    proc: Option<Proc>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            let port = free_port();
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--cluster-port",
                &free_port().to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                // A replica takes over whatever its data's age (a fresh
                // cluster's replicas are otherwise "too old" to fail over).
                "--cluster-replica-validity-factor",
                "0",
                "--repl-diskless-sync-delay",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&node_dir);
            let mut proc = Proc::spawn("redis-server", cmd, &node_dir.join("redis.log"));
            wait_until(&mut proc, "answering PING", || redis_ping(port));
            nodes.push(RedisNode {
                port,
                proc: Some(proc),
            });
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes, dir };
        c.wait_ok();
        c
    }

    /// The seed nodes, as `chat.redis_url` takes them.
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().filter(|n| n.proc.is_some()).map(|n| n.port);
        let first = nodes.next().expect("a live node");
        let rest: Vec<String> = nodes.map(|p| format!("node=127.0.0.1:{p}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// What `redis-cli -p port args…` prints.
    pub fn cli(port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every live node says the cluster is ok and agrees on
    /// the masters (after a start or a failover).
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().filter(|n| n.proc.is_some()).all(|n| {
                let replication = Self::cli(n.port, &["info", "replication"]);
                Self::cli(n.port, &["cluster", "info"]).contains("cluster_state:ok")
                    && (replication.contains("role:master") || replication.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis cluster not ok: {}",
                Self::cli(self.nodes[0].port, &["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The port of the master that owns `key`'s slot (hash tags count).
    pub fn master_of(&self, key: &str) -> u16 {
        let slot = self.keyslot(key);
        self.masters()
            .into_iter()
            .find(|m| m.slots.iter().any(|(a, b)| (a..=b).contains(&&slot)))
            .unwrap_or_else(|| panic!("no master owns slot {slot}"))
            .port
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.proc.is_some())
            .expect("a live node")
            .port
    }

    fn keyslot(&self, key: &str) -> u16 {
        Self::cli(self.live_port(), &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot number")
    }

    /// The masters not marked failed, as a live node's `CLUSTER NODES`
    /// lists them.
    fn masters(&self) -> Vec<Master> {
        Self::cli(self.live_port(), &["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f.len() >= 8 && f[2].contains("master") && !f[2].contains("fail")).then(|| Master {
                    port: f[1]
                        .split([':', '@'])
                        .nth(1)
                        .and_then(|p| p.parse().ok())
                        .expect("a port"),
                    id: f[0].to_string(),
                    // Ranges `a-b` and single slots; migration markers
                    // (`[slot->-node]`) are skipped.
                    slots: f[8..]
                        .iter()
                        .filter_map(|r| {
                            let (a, b) = r.split_once('-').unwrap_or((r, r));
                            Some((a.parse().ok()?, b.parse().ok()?))
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// Moves the slot of `key` (hash tags count) from its master to another
    /// master, with its keys, as `redis-cli --cluster reshard` does for a
    /// range: IMPORTING/MIGRATING, MIGRATE, then SETSLOT NODE everywhere.
    /// Answers the new owner's port.
    pub fn move_slot_of(&self, key: &str) -> u16 {
        let from = self.master_of(key);
        let slot = self.keyslot(key).to_string();
        let masters = self.masters();
        let id_of = |port: u16| {
            masters
                .iter()
                .find(|m| m.port == port)
                .expect("a master")
                .id
                .clone()
        };
        let to = masters
            .iter()
            .map(|m| m.port)
            .find(|p| *p != from)
            .expect("another master");
        let (from_id, to_id) = (id_of(from), id_of(to));
        Self::cli(to, &["cluster", "setslot", &slot, "importing", &from_id]);
        Self::cli(from, &["cluster", "setslot", &slot, "migrating", &to_id]);
        loop {
            let keys = Self::cli(from, &["cluster", "getkeysinslot", &slot, "100"]);
            let keys: Vec<&str> = keys.split_whitespace().collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["migrate", "127.0.0.1"];
            let to_s = to.to_string();
            args.push(&to_s);
            args.extend(["", "0", "5000", "KEYS"]);
            args.extend(keys);
            Self::cli(from, &args);
        }
        for m in &masters {
            Self::cli(m.port, &["cluster", "setslot", &slot, "node", &to_id]);
        }
        to
    }

    /// SIGKILLs the node on `port` (a crash: its replica is promoted).
    pub fn kill(&mut self, port: u16) {
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port");
        n.proc = None;
    }

    /// How many messages a node has handled in total (INFO stats).
    pub fn commands_processed(&self) -> Vec<(u16, u64)> {
        self.nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .map(|n| {
                let info = Self::cli(n.port, &["info", "stats"]);
                let v = info
                    .lines()
                    .find_map(|l| l.strip_prefix("total_commands_processed:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                (n.port, v)
            })
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

// ----------------------------------------------------------- PostgreSQL --

/// A throwaway PostgreSQL cluster (`initdb` into a temporary directory,
/// `postgres` on a free loopback port, trust authentication).
pub struct Postgres {
    proc: Option<Proc>,
    pub port: u16,
    dir: TempDir,
    /// Serves TLS with a certificate from [`test_ca`] (see `tls_root`).
    tls: bool,
}

/// Where Debian keeps the server binaries (not on PATH).
pub fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.exists());
    versions.sort();
    versions.pop().unwrap_or_else(|| PathBuf::from(name))
}

/// Runs as the `postgres` user when we are root (PostgreSQL refuses root).
/// `setpriv` execs in place, so killing the child kills the server.
fn as_postgres(program: &Path) -> Command {
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        let _ = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let out = as_postgres(&pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .expect("run initdb (is PostgreSQL installed? run ./scripts/test)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            proc: None,
            port: free_port(),
            dir,
            tls: false,
        };
        pg.restart();
        pg
    }

    /// A server that also speaks TLS (`ssl = on`), with a certificate for
    /// localhost and 127.0.0.1 signed by [`Postgres::tls_root`].
    pub fn start_tls() -> Postgres {
        let mut pg = Postgres::start();
        pg.stop();
        let tls = pg.dir.path().join("tls");
        std::fs::create_dir_all(&tls).expect("mkdir");
        test_ca(&tls, "PostgreSQL");
        let _ = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&tls)
            .status();
        pg.tls = true;
        pg.restart();
        pg
    }

    /// The root that signed a TLS server's certificate (PEM).
    pub fn tls_root(&self) -> PathBuf {
        self.dir.path().join("tls/root.pem")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's process, while it runs (its backends are children).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Stops the server (fast shutdown: open sessions are cut).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop("INT", Duration::from_secs(10));
        }
    }

    /// (Re)starts the server on the same port and data directory.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = as_postgres(&pg_bin("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        if self.tls {
            let tls = self.dir.path().join("tls");
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", tls.join("cert.pem").display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", tls.join("key.pem").display()));
        }
        let log = self.dir.path().join("postgres.log");
        let mut proc = Proc::spawn("postgres", cmd, &log);
        let port = self.port;
        wait_until(&mut proc, "accepting connections", || {
            Command::new("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        });
        self.proc = Some(proc);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Before the directory goes: a killed postmaster leaves backends.
        self.stop();
    }
}

// ------------------------------------------------------ Portico services --

/// One of Portico's binaries, on free ports, with its own data directory.
pub struct Service {
    pub proc: Proc,
    /// Where the service answers `/healthz` (plain HTTP).
    pub health_port: u16,
    pub dir: TempDir,
}

impl Service {
    /// Starts `bin` with `args` and `PORTICO_*` variables `env` (plus a test
    /// JWT secret, JSON logs and a private data directory); waits for
    /// `/healthz` on `health_port`.
    pub fn start(bin: &Path, args: &[&str], env: &[(&str, String)], health_port: u16) -> Service {
        Service::start_in(tempfile::tempdir().expect("tempdir"), bin, args, env, health_port)
    }

    /// [`Service::start`] with a given data directory (e.g. the one a
    /// killed process left, to start it again on the same state).
    pub fn start_in(
        dir: TempDir,
        bin: &Path,
        args: &[&str],
        env: &[(&str, String)],
        health_port: u16,
    ) -> Service {
        Service::try_start_in(dir, bin, args, env, health_port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Service::start_in`] that answers a failed start (with the log).
    pub fn try_start_in(
        dir: TempDir,
        bin: &Path,
        args: &[&str],
        env: &[(&str, String)],
        health_port: u16,
    ) -> Result<Service, String> {
        let mut cmd = Command::new(bin);
        cmd.env("PORTICO_DATA_DIR", dir.path());
        Service::spawn(cmd, dir, args, env, health_port)
    }

    /// A service run from inside `dir` with the data directory given as
    /// the relative path `data` (as the README's first command does).
    pub fn start_relative(
        dir: TempDir,
        bin: &Path,
        args: &[&str],
        env: &[(&str, String)],
        health_port: u16,
    ) -> Service {
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir.path()).env("PORTICO_DATA_DIR", "data");
        Service::spawn(cmd, dir, args, env, health_port).unwrap_or_else(|e| panic!("{e}"))
    }

    fn spawn(
        mut cmd: Command,
        dir: TempDir,
        args: &[&str],
        env: &[(&str, String)],
        health_port: u16,
    ) -> Result<Service, String> {
        let bin = PathBuf::from(cmd.get_program());
        cmd.args(args)
            .env_remove("PORTICO_CONFIG")
            .env("PORTICO_AUTH__JWT_SECRET", TEST_SECRET)
            .env("PORTICO_LOG__FORMAT", "json");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let name = bin
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("service")
            .to_string();
        let mut proc = Proc::spawn(&name, cmd, &dir.path().join("service.log"));
        wait_for(&mut proc, "healthy", || {
            http_status(health_port, "/healthz") == Some(200)
        })?;
        Ok(Service {
            proc,
            health_port,
            dir,
        })
    }

    /// A chat shard on a free port with the in-memory engines.
    pub fn chat(extra: &[(&str, String)]) -> (Service, u16) {
        let port = free_port();
        (Service::chat_on(port, extra), port)
    }

    /// A chat shard on `port` (e.g. to bring a stopped one back).
    pub fn chat_on(port: u16, extra: &[(&str, String)]) -> Service {
        let mut env = vec![("PORTICO_CHAT__LISTEN", format!("127.0.0.1:{port}"))];
        env.extend(extra.iter().cloned());
        Service::start(&bins::chat(), &[], &env, port)
    }

    /// The jobs service on a free port.
    pub fn jobs() -> (Service, u16) {
        let port = free_port();
        let env = [("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}"))];
        (Service::start(&bins::jobs(), &[], &env, port), port)
    }
}

impl Service {
    /// The gateway on `edge`'s ports with `args` and `env`; waits until its
    /// HTTPS and HTTP listeners accept, not only its admin `/healthz`
    /// (Pingora starts them alongside, so either may come first).
    pub fn gateway(args: &[&str], env: &[(&str, String)], edge: &EdgePorts) -> Service {
        let mut svc = Service::start(&bins::gateway(), args, env, edge.admin);
        edge.wait_listening(&mut svc.proc);
        svc
    }

    /// A gateway serving the route table `routes` (`[[gateway.routes]]`
    /// entries, TOML) on free ports, rate limits off, its chat shard list
    /// pointing at a closed port, with `env` added: for what is not chat
    /// (file routes, proxying to an origin).
    pub fn gateway_with_routes(routes: &str, env: &[(&str, String)]) -> (Service, EdgePorts) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, routes).expect("write gateway.toml");
        let edge = EdgePorts::free();
        let mut all: Vec<(&str, String)> = edge.env();
        all.extend(EdgePorts::unlimited());
        all.push((
            "PORTICO_GATEWAY__CHAT_SHARDS",
            format!("[\"127.0.0.1:{}\"]", free_port()),
        ));
        all.extend(env.iter().cloned());
        let file = file.display().to_string();
        let mut svc = Service::start_in(dir, &bins::gateway(), &["--config", &file], &all, edge.admin);
        edge.wait_listening(&mut svc.proc);
        (svc, edge)
    }
}

impl Service {
    /// Starts a new gateway with `--upgrade` beside this one (same data
    /// directory, `env`), then sends this one SIGQUIT: the new process takes
    /// the listening sockets over. Returns the new process; this one is
    /// left to finish its grace period (see `proc.wait_exit`).
    pub fn upgrade_gateway(&self, env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(bins::gateway());
        cmd.arg("--upgrade")
            .env_remove("PORTICO_CONFIG")
            .env("PORTICO_AUTH__JWT_SECRET", TEST_SECRET)
            .env("PORTICO_LOG__FORMAT", "json")
            .env("PORTICO_DATA_DIR", self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let new = Proc::spawn("portico-gateway (new)", cmd, &self.dir.path().join("new.log"));
        // The new process waits on the upgrade socket for the old one.
        std::thread::sleep(Duration::from_millis(500));
        self.proc.signal("QUIT");
        new
    }
}

/// The ports of a `portico up` (or gateway) under test.
#[derive(Debug, Clone, Copy)]
pub struct EdgePorts {
    pub http: u16,
    pub https: u16,
    pub admin: u16,
}

impl EdgePorts {
    pub fn free() -> EdgePorts {
        EdgePorts {
            http: free_port(),
            https: free_port(),
            admin: free_port(),
        }
    }
    /// Gateway variables that lift the per-IP limits: for load and for tests
    /// in which one client opens many connections on purpose.
    pub fn unlimited() -> Vec<(&'static str, String)> {
        [
            "PORTICO_GATEWAY__LIMITS__REQUESTS_PER_SEC",
            "PORTICO_GATEWAY__LIMITS__REQUESTS_BURST",
            "PORTICO_GATEWAY__LIMITS__WS_CONNECTS_PER_SEC",
            "PORTICO_GATEWAY__LIMITS__WS_CONNECTS_BURST",
            "PORTICO_GATEWAY__CONNECTIONS__MAX_CONNECTIONS_PER_IP",
        ]
        .into_iter()
        .map(|k| (k, "1000000".to_string()))
        .collect()
    }

    /// Waits until the HTTPS and HTTP listeners accept connections.
    pub fn wait_listening(&self, proc: &mut Proc) {
        for port in [self.https, self.http] {
            wait_until(proc, "listening", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PORTICO_GATEWAY__HTTP_LISTEN", format!("127.0.0.1:{}", self.http)),
            (
                "PORTICO_GATEWAY__HTTPS_LISTEN",
                format!("127.0.0.1:{}", self.https),
            ),
            (
                "PORTICO_GATEWAY__ADMIN_LISTEN",
                format!("127.0.0.1:{}", self.admin),
            ),
            ("PORTICO_GATEWAY__GRACE_PERIOD_SECS", "1".to_string()),
        ]
    }
}

/// The whole stack in one process: `portico up` on free ports.
pub fn up() -> (Service, EdgePorts) {
    up_with(&[])
}

/// [`up`] with extra `PORTICO_*` variables. `up` binds half a dozen free
/// ports; when another test took one of them between the pick and the
/// bind, it starts again on new ones (up to three times).
pub fn up_with(extra: &[(&'static str, String)]) -> (Service, EdgePorts) {
    for attempt in 1.. {
        let (env, edge) = up_env(extra);
        let dir = tempfile::tempdir().expect("tempdir");
        match Service::try_start_in(dir, &bins::portico(), &["up"], &env, edge.admin) {
            Ok(mut svc) => {
                edge.wait_listening(&mut svc.proc);
                return (svc, edge);
            }
            Err(e) if attempt < 3 && e.contains("Address already in use") => continue,
            Err(e) => panic!("{e}"),
        }
    }
    unreachable!("the loop returns or panics")
}

/// `portico up` with `env` on `edge`'s ports, on the state in `dir`.
pub fn up_in(dir: TempDir, env: &[(&'static str, String)], edge: &EdgePorts) -> Service {
    let mut svc = Service::start_in(dir, &bins::portico(), &["up"], env, edge.admin);
    edge.wait_listening(&mut svc.proc);
    svc
}

/// The variables and ports of a `portico up` (see [`up_in`]).
pub fn up_env(extra: &[(&'static str, String)]) -> (Vec<(&'static str, String)>, EdgePorts) {
    let edge = EdgePorts::free();
    let chat = crate::free_port_pair();
    let jobs = free_port();
    let mut env = edge.env();
    env.push(("PORTICO_CHAT__LISTEN", format!("127.0.0.1:{chat}")));
    env.push(("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{jobs}")));
    env.push((
        "PORTICO_CHAT__ALLOWED_ORIGINS",
        format!("[\"https://localhost:{}\"]", edge.https),
    ));
    env.extend(extra.iter().cloned());
    (env, edge)
}

impl Service {
    /// The self-signed certificate the gateway generated.
    /// Where the gateway keeps the certificate it serves for `host`.
    pub fn certificate_path(&self, host: &str) -> PathBuf {
        self.dir.path().join("certs").join(format!("{host}.crt"))
    }

    pub fn certificate(&self, host: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("certs").join(format!("{host}.crt"))).expect("gateway certificate")
    }
}

/// What carries a chat cluster's bus: one Redis server, or a Redis Cluster.
pub enum BusServer {
    Redis(Redis),
    Cluster(RedisCluster),
}

impl BusServer {
    /// `chat.bus` and `chat.redis_url` for it.
    pub fn config(&self) -> (&'static str, String) {
        match self {
            BusServer::Redis(r) => ("redis", r.url()),
            BusServer::Cluster(c) => ("redis_cluster", c.url()),
        }
    }

    /// The one Redis server.
    pub fn redis(&mut self) -> &mut Redis {
        match self {
            BusServer::Redis(r) => r,
            BusServer::Cluster(_) => panic!("this bus is a Redis Cluster"),
        }
    }

    /// The Redis Cluster.
    pub fn cluster(&mut self) -> &mut RedisCluster {
        match self {
            BusServer::Cluster(c) => c,
            BusServer::Redis(_) => panic!("this bus is one Redis server"),
        }
    }
}

/// Chat shards as separate processes on real Redis (bus) and PostgreSQL
/// (store).
pub struct ChatCluster {
    pub shards: Vec<(Service, u16)>,
    pub bus: BusServer,
    pub pg: Postgres,
    /// What every shard runs with (plus its shard id).
    env: Vec<(String, String)>,
}

impl ChatCluster {
    /// `shards` shards on one Redis server.
    pub fn start(shards: usize, extra: &[(&str, String)]) -> ChatCluster {
        ChatCluster::start_on(BusServer::Redis(Redis::start()), shards, extra)
    }

    /// `shards` shards on a Redis Cluster of three masters and three
    /// replicas (sharded pub/sub).
    pub fn start_on_redis_cluster(shards: usize, extra: &[(&str, String)]) -> ChatCluster {
        ChatCluster::start_on(BusServer::Cluster(RedisCluster::start(3)), shards, extra)
    }

    pub fn start_on(bus: BusServer, shards: usize, extra: &[(&str, String)]) -> ChatCluster {
        let pg = Postgres::start();
        let (kind, url) = bus.config();
        let mut env = vec![
            ("PORTICO_CHAT__BUS", kind.to_string()),
            ("PORTICO_CHAT__REDIS_URL", url),
            ("PORTICO_CHAT__STORE", "postgres".to_string()),
            ("PORTICO_CHAT__POSTGRES_URL", pg.url()),
            ("PORTICO_CHAT__PUBLISH_PER_SEC", "100000".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let mut cluster = ChatCluster {
            shards: Vec::new(),
            bus,
            pg,
            env,
        };
        for i in 0..shards {
            let port = free_port();
            let svc = cluster.start_shard(i, port);
            cluster.shards.push((svc, port));
        }
        cluster
    }

    fn start_shard(&self, i: usize, port: u16) -> Service {
        let mut env: Vec<(&str, String)> = self.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        env.push(("PORTICO_CHAT__SHARD_ID", (i + 1).to_string()));
        Service::chat_on(port, &env)
    }

    pub fn port(&self, shard: usize) -> u16 {
        self.shards[shard].1
    }

    /// The one Redis server of a cluster started with [`ChatCluster::start`].
    pub fn redis(&mut self) -> &mut Redis {
        self.bus.redis()
    }

    /// The Redis Cluster of [`ChatCluster::start_on_redis_cluster`].
    pub fn redis_cluster(&mut self) -> &mut RedisCluster {
        self.bus.cluster()
    }

    /// SIGKILLs shard `i` (0-based) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        let proc = &mut self.shards[i].0.proc;
        proc.signal("KILL");
        proc.wait_exit(Duration::from_secs(10));
    }

    /// Starts shard `i` again on its port, as it was configured.
    pub fn restart(&mut self, i: usize) {
        let port = self.shards[i].1;
        self.shards[i].0 = self.start_shard(i, port);
    }
}

// ---------------------------------------------------------------- Pebble --

/// A throwaway ACME CA: Pebble (with `pebble-challtestsrv` as its DNS,
/// answering 127.0.0.1 for every name) whose HTTP-01 validations go to
/// `http_port` on loopback. Certificates live `validity_secs`.
pub struct Pebble {
    pebble: Proc,
    _dns: Proc,
    pub port: u16,
    /// PEM of the root that signed Pebble's own HTTPS certificate.
    pub tls_root: PathBuf,
    dir: TempDir,
}

/// A test root and a certificate it signed for `localhost` and 127.0.0.1:
/// `root.pem`, `cert.pem` and `key.pem` (mode 0600) in `dir`.
pub fn test_ca(dir: &Path, what: &str) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("Portico test: {what} TLS root"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    std::fs::write(dir.join("root.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("cert.pem"), leaf.pem()).expect("write");
    let key = dir.join("key.pem");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("write");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
}

impl Pebble {
    pub fn start(http_port: u16, validity_secs: u64) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        test_ca(dir.path(), "Pebble");

        let (port, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": p("cert.pem"),
            "privateKey": p("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_secs,
        }});
        std::fs::write(p("pebble.json"), config.to_string()).expect("write");

        let mut dns_cmd = Command::new("pebble-challtestsrv");
        dns_cmd.args([
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ]);
        dns_cmd.args([
            "-dns01",
            &format!("127.0.0.1:{dns}"),
            "-management",
            &format!("127.0.0.1:{dns_mgmt}"),
        ]);
        let mut dns_proc = Proc::spawn("pebble-challtestsrv", dns_cmd, &p("dns.log"));
        wait_until(&mut dns_proc, "listening", || {
            http_status(dns_mgmt, "/").is_some()
        });

        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(p("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")]);
        cmd.env("PEBBLE_VA_NOSLEEP", "1");
        let mut pebble = Proc::spawn("pebble", cmd, &p("pebble.log"));
        wait_until(&mut pebble, "listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Pebble {
            pebble,
            _dns: dns_proc,
            port,
            tls_root: p("root.pem"),
            dir,
        }
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    pub fn log(&self) -> String {
        self.pebble.log()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
