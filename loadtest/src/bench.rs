//! `portico-loadtest bench`: the whole stack on real servers, the standard
//! scenarios, and the results files.
//!
//! Starts Redis and PostgreSQL through the test harness, two chat shards and
//! the gateway (binaries of this build's profile: run it with `--release`),
//! then runs each scenario through the gateway while sampling every server
//! process's RSS and CPU, and writes `loadtest/results/<scenario>.json` and
//! `loadtest/results/README.md`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use portico_config::Secret;
use portico_tests::servers::{BusServer, EdgePorts, Postgres, Redis, RedisCluster, Service};
use portico_tests::{TEST_SECRET, bins};
use serde_json::json;

use crate::generator::{self, Scenario};
use crate::measure::{commit, wrk};
use crate::nginx::Nginx;
use crate::report::{Report, ServerUsage};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run. The defaults write the README's table; the others
    /// have their own: loadtest/results/faults.md, edge.md, mail.md,
    /// static.md, api.md.
    #[arg(long, value_delimiter = ',', value_parser = SCENARIOS, default_values = DEFAULT_SCENARIOS)]
    pub scenarios: Vec<String>,
    /// Divide connection counts and durations by 10 (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Where results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    pub out: PathBuf,
    /// The chat bus: `redis` (one server) or `redis_cluster` (three
    /// masters and three replicas, sharded pub/sub). Results of a cluster
    /// run go to `<scenario>-redis_cluster.json` and `redis-cluster.md`.
    #[arg(long, default_value = "redis", value_parser = ["redis", "redis_cluster"])]
    pub bus: String,
    /// Record CPU profiles (perf + inferno) of the gateway and a shard under
    /// each scenario's load into `<out>/profiles/` (see `profile.rs`).
    #[arg(long)]
    pub profile: bool,
}

/// The scenarios of a full run (the default): a run of all of them
/// rewrites the README's table. Proxying first: right after `idle` (which
/// leaves ~18,000 sockets in TIME_WAIT for a minute) both proxies, nginx
/// too, spent 30–50 % more CPU per request than on a quiet machine.
const DEFAULT_SCENARIOS: [&str; 5] = ["proxy", "paas", "fanout", "dm", "idle"];
/// Every scenario `bench` knows.
const SCENARIOS: [&str; 10] = [
    "fanout", "dm", "idle", "proxy", "paas", "faults", "edge", "mail", "static", "api",
];

/// Replaces what lies between `<!-- bench:start` … `-->` and
/// `<!-- bench:end -->` in `file` with `body`.
fn write_between_markers(file: &std::path::Path, body: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let start = text
        .find("<!-- bench:start")
        .and_then(|i| Some(i + text[i..].find("-->")? + 3))
        .with_context(|| format!("{} has no <!-- bench:start --> marker", file.display()))?;
    let end = text[start..]
        .find("<!-- bench:end -->")
        .map(|i| start + i)
        .with_context(|| format!("{} has no <!-- bench:end --> marker", file.display()))?;
    std::fs::write(file, format!("{}\n{body}\n{}", &text[..start], &text[end..]))
        .with_context(|| format!("writing {}", file.display()))
}

pub(crate) struct Stack {
    pub(crate) shards: Vec<(Service, u16)>,
    /// What each shard was started with (to start it again).
    pub(crate) shard_env: Vec<Vec<(&'static str, String)>>,
    pub(crate) gateway: Service,
    /// What the gateway was started with (an upgrade starts its successor).
    pub(crate) gateway_env: Vec<(&'static str, String)>,
    /// The gateway that took over after an upgrade.
    pub(crate) upgraded: Option<portico_tests::proc::Proc>,
    pub(crate) edge: EdgePorts,
    /// The jobs service (PaaS deploys) and the root of its local repositories.
    jobs_port: u16,
    repos: tempfile::TempDir,
    _jobs: Service,
    pub(crate) bus: BusServer,
    pub(crate) pg: Postgres,
}

/// The hosted-app domain of the bench stack (`Host: <app>.paas.localhost`).
const PAAS_DOMAIN: &str = "paas.localhost";

fn start_stack(bus: &str) -> Stack {
    let bus = if bus == "redis_cluster" {
        BusServer::Cluster(RedisCluster::start(3))
    } else {
        BusServer::Redis(Redis::start())
    };
    let (bus_kind, bus_url) = bus.config();
    let pg = Postgres::start();
    let common = |extra: Vec<(&'static str, String)>| {
        let mut env = vec![("PORTICO_LOG__LEVEL", "warn".to_string())];
        env.extend(extra);
        env
    };
    let shard_env: Vec<Vec<(&'static str, String)>> = (1..=2)
        .map(|i| {
            common(vec![
                ("PORTICO_CHAT__SHARD_ID", i.to_string()),
                ("PORTICO_CHAT__BUS", bus_kind.into()),
                ("PORTICO_CHAT__REDIS_URL", bus_url.clone()),
                ("PORTICO_CHAT__STORE", "postgres".into()),
                ("PORTICO_CHAT__POSTGRES_URL", pg.url()),
                ("PORTICO_CHAT__PUBLISH_PER_SEC", "1000000".into()),
                ("PORTICO_CHAT__MAX_CONNECTIONS", "200000".into()),
                ("PORTICO_CHAT__OUTBOUND_QUEUE", "1024".into()),
            ])
        })
        .collect();
    let shards: Vec<(Service, u16)> = shard_env.iter().map(|env| Service::chat(env)).collect();
    let repos = tempfile::tempdir().expect("tempdir");
    let jobs_port = portico_tests::free_port();
    let jobs = Service::start(
        &bins::jobs(),
        &[],
        &common(vec![
            ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{jobs_port}")),
            ("PORTICO_JOBS__POSTGRES_URL", pg.url()),
            (
                "PORTICO_PAAS__LOCAL_REPOS_ROOT",
                repos.path().display().to_string(),
            ),
            (
                "PORTICO_PAAS__IMAGES__STATIC",
                portico_tests::docker::TEST_IMAGE.into(),
            ),
            ("PORTICO_PAAS__INSTANCE", "portico-bench".into()),
            ("PORTICO_PAAS__DOMAIN", PAAS_DOMAIN.into()),
        ]),
        jobs_port,
    );
    let edge = EdgePorts::free();
    let shard_list = format!(
        "[{}]",
        shards
            .iter()
            .map(|(_, p)| format!("\"127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut env = common(edge.env());
    env.push(("PORTICO_GATEWAY__CHAT_SHARDS", shard_list));
    env.push(("PORTICO_GATEWAY__THREADS", "2".into()));
    env.push(("PORTICO_GATEWAY__JOBS_UPSTREAM", format!("127.0.0.1:{jobs_port}")));
    env.push(("PORTICO_PAAS__DOMAIN", PAAS_DOMAIN.into()));
    // The generator is a handful of addresses opening thousands of sockets.
    env.extend(EdgePorts::unlimited());
    // An upgrade hands thousands of WebSockets over: spread them over 10 s.
    env.push(("PORTICO_GATEWAY__GRACE_PERIOD_SECS", "10".into()));
    let gateway = Service::gateway(&[], &env, &edge);
    Stack {
        shards,
        shard_env,
        gateway,
        gateway_env: env,
        upgraded: None,
        edge,
        jobs_port,
        repos,
        _jobs: jobs,
        bus,
        pg,
    }
}

/// Samples RSS (keeping the peak) and chat connection gauges while a
/// scenario runs.
struct Sampler {
    procs: Vec<(String, u32, Option<u16>)>,
    peak: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Sampler {
    fn start(stack: &Stack) -> Sampler {
        let mut procs: Vec<(String, u32, Option<u16>)> = stack
            .shards
            .iter()
            .enumerate()
            .map(|(i, (s, port))| (format!("chat shard {}", i + 1), s.proc.pid(), Some(*port)))
            .collect();
        procs.push(("gateway".into(), stack.gateway.proc.pid(), None));
        let peak = Arc::new(Mutex::new(vec![(0u64, 0u64); procs.len()]));
        let stop = tokio_util::sync::CancellationToken::new();
        let (p2, peak2, stop2) = (procs.clone(), peak.clone(), stop.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop2.is_cancelled() {
                for (i, (_, pid, port)) in p2.iter().enumerate() {
                    let rss = crate::sys::rss_bytes(*pid).unwrap_or(0);
                    let conns = match port {
                        Some(p) => chat_connections(&http, *p).await,
                        None => 0,
                    };
                    let mut peak = peak2.lock().expect("sampler lock");
                    if rss > peak[i].0 {
                        peak[i] = (rss, conns.max(peak[i].1));
                    } else {
                        peak[i].1 = peak[i].1.max(conns);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Sampler { procs, peak, stop }
    }

    fn finish(self, before: &[(u64, Duration)], total_conns: u64) -> Vec<ServerUsage> {
        self.stop.cancel();
        let peak = self.peak.lock().expect("sampler lock").clone();
        self.procs
            .iter()
            .enumerate()
            .map(|(i, (name, pid, port))| {
                let (rss_after, conns) = peak[i];
                let conns = if port.is_some() { conns } else { total_conns };
                let cpu = crate::sys::cpu_time(*pid)
                    .unwrap_or_default()
                    .saturating_sub(before[i].1);
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                ServerUsage {
                    name: name.clone(),
                    rss_before_mib: mib(before[i].0),
                    rss_after_mib: mib(rss_after),
                    connections: conns,
                    rss_per_connection_kib: if conns > 0 {
                        rss_after.saturating_sub(before[i].0) as f64 / 1024.0 / conns as f64
                    } else {
                        0.0
                    },
                    cpu_secs: cpu.as_secs_f64(),
                }
            })
            .collect()
    }
}

async fn chat_connections(http: &reqwest::Client, port: u16) -> u64 {
    let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("portico_chat_connections{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn snapshot(stack: &Stack) -> Vec<(u64, Duration)> {
    let pids: Vec<u32> = stack
        .shards
        .iter()
        .map(|(s, _)| s.proc.pid())
        .chain([stack.gateway.proc.pid()])
        .collect();
    pids.iter()
        .map(|p| {
            (
                crate::sys::rss_bytes(*p).unwrap_or(0),
                crate::sys::cpu_time(*p).unwrap_or_default(),
            )
        })
        .collect()
}

/// CPU time so far of the servers behind the shards: PostgreSQL (the
/// postmaster and all its backends) and Redis (one server; a cluster's
/// nodes are left out).
fn backing_cpu(stack: &Stack) -> Vec<(String, Duration)> {
    let tree = |pid: u32| crate::sys::cpu_time_of(std::iter::once(pid).chain(crate::sys::children(pid)));
    let mut out = Vec::new();
    if let Some(pid) = stack.pg.pid() {
        out.push(("postgres (all backends)".to_string(), tree(pid)));
    }
    if let BusServer::Redis(r) = &stack.bus
        && let Some(pid) = r.pid()
    {
        out.push(("redis".to_string(), tree(pid)));
    }
    out
}

/// ERROR lines in the gateway's log so far: (all, about clients).
fn gateway_errors(stack: &Stack) -> (u64, u64) {
    let log = stack.gateway.proc.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    let clients = errors
        .iter()
        .filter(|l| l.contains("Downstream") || l.contains("H2 handshake error"))
        .count();
    (errors.len() as u64, clients as u64)
}

/// Up to three distinct kinds of gateway ERROR line (their message, cut).
fn error_samples(stack: &Stack) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for line in stack
        .gateway
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
    {
        let message = line
            .split("\"message\":\"")
            .nth(1)
            .unwrap_or(line)
            .chars()
            .take(160)
            .collect::<String>();
        let kind: String = message.chars().take(40).collect();
        if !seen.iter().any(|s| s.starts_with(&kind)) {
            seen.push(message);
        }
        if seen.len() == 3 {
            break;
        }
    }
    seen
}

/// Loopback source addresses for the generator: 127.0.0.2 … 127.0.0.(1+n).
pub(crate) fn sources(n: u8) -> Vec<IpAddr> {
    (2..2 + n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect()
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    // Before starting the servers: they inherit the limit.
    let fd_limit = crate::sys::raise_fd_limit();
    // Through the gateway every client costs it two descriptors (client and
    // upstream side); keep the idle scenario within what this machine allows.
    let idle_cap = ((fd_limit.saturating_sub(2_000)) / 2) as usize;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    if args.profile {
        crate::profile::available()?;
    }
    let profiles = args.profile.then_some(args.out.as_path());
    let commit = commit();
    let scale = if args.quick { 10 } else { 1 };
    let secs = |s: u64| Duration::from_secs((s / scale).max(3));
    let mut rows = Vec::new();
    let mut failed = false;
    for name in &args.scenarios {
        // Scenarios that start servers of their own run without the stack
        // (it would only add its idle processes to their measurements).
        match name.as_str() {
            "proxy" => {
                let Some(r) = crate::proxy::run(profiles).await? else {
                    continue;
                };
                std::fs::write(args.out.join("proxy.json"), serde_json::to_string_pretty(&r)?)?;
                let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
                rows.push(format!(
                    "| proxy | HTTPS keep-alive to one origin, wrk -t2 -c64 -d10s | gateway {:.0} req/s, nginx {:.0} req/s: **{:.2}× nginx** (CPU per request {:.1} µs vs {:.1} µs; user {:.1} vs {:.1}, system {:.1} vs {:.1}) | p99 gateway {:.2} ms, nginx {:.2} ms ({:.2}×) | | | | |",
                    f("gateway_rps"),
                    f("nginx_rps"),
                    f("rps_ratio"),
                    f("gateway_cpu_us_per_request"),
                    f("nginx_cpu_us_per_request"),
                    f("gateway_user_us_per_request"),
                    f("nginx_user_us_per_request"),
                    f("gateway_system_us_per_request"),
                    f("nginx_system_us_per_request"),
                    f("gateway_p99_ms"),
                    f("nginx_p99_ms"),
                    f("p99_ratio"),
                ));
                continue;
            }
            "mail" => {
                failed |= !crate::mail::run(&args.out, args.quick).await?;
                continue;
            }
            "static" => {
                failed |= !crate::files::run(&args.out, profiles).await?;
                continue;
            }
            "edge" => {
                failed |= !crate::edge::run(&args.out).await?;
                continue;
            }
            _ => {}
        }
        // A fresh stack per scenario: RSS deltas and CPU belong to it alone.
        let bus = args.bus.clone();
        let mut stack = tokio::task::spawn_blocking(move || start_stack(&bus)).await?;
        let cert = stack.gateway.certificate("localhost");
        let (conns, group, rate, dur) = match name.as_str() {
            "fanout" => (1_000, 100, 1_000, secs(30)),
            // Through the gateway each connection takes two descriptors:
            // above `idle_cap` the ramp ends in 502s (too many open files).
            "dm" | "api" => (10_000.min(idle_cap), 2, 2_000, secs(30)),
            "idle" => {
                if idle_cap < 50_000 {
                    eprintln!("idle: capped at {idle_cap} connections by the open-file limit ({fd_limit})");
                }
                (50_000.min(idle_cap), 2, 0, secs(30))
            }
            "paas" => {
                if !portico_tests::docker::available() {
                    eprintln!("paas: skipped, no Docker engine");
                    continue;
                }
                let r = paas(&stack).await?;
                std::fs::write(args.out.join("paas.json"), serde_json::to_string_pretty(&r)?)?;
                rows.push(format!(
                    "| paas | static app, wrk -t2 -c64 -d10s | gateway {:.0} req/s vs direct {:.0} req/s ({:.0}%) | p99 gateway {:.2} ms, direct {:.2} ms | deploy {:.1} s, route live {:.0} ms after | | | |",
                    r["gateway_rps"].as_f64().unwrap_or(0.0),
                    r["direct_rps"].as_f64().unwrap_or(0.0),
                    r["ratio_pct"].as_f64().unwrap_or(0.0),
                    // Both, not their difference: they come from two runs,
                    // and the direct one's tail can be the longer.
                    r["gateway_p99_ms"].as_f64().unwrap_or(0.0),
                    r["direct_p99_ms"].as_f64().unwrap_or(0.0),
                    r["deploy_secs"].as_f64().unwrap_or(0.0),
                    r["route_live_ms"].as_f64().unwrap_or(0.0),
                ));
                continue;
            }
            "faults" => {
                // Each gateway connection costs it two descriptors.
                let ok = crate::faults::run(&mut stack, args.quick, idle_cap, &args.out).await?;
                failed |= !ok;
                tokio::task::spawn_blocking(move || drop(stack)).await?;
                continue;
            }
            other => unreachable!("scenario {other}: clap lets only `SCENARIOS` through"),
        };
        let conns = conns / scale as usize;
        let rate = rate / scale as u32;
        eprintln!("== {name}: {conns} connections, groups of {group}, {rate} msg/s, {dur:?}");
        let scenario = Scenario {
            urls: vec![format!("wss://localhost:{}/ws", stack.edge.https).parse()?],
            api: format!("https://localhost:{}/", stack.edge.https).parse()?,
            ca: Some(cert.clone()),
            secret: Secret::new(TEST_SECRET),
            connections: conns,
            connect_rate: 5_000,
            group_size: group,
            rate,
            duration: dur,
            sources: sources(8),
            body_bytes: 64,
            prefix: format!("{name}{:x}", portico_common::auth::now_secs()),
            drain: Duration::from_secs(5),
            drop_one_delivery: false,
        };
        let before = snapshot(&stack);
        let backing_before = backing_cpu(&stack);
        let redis_before = redis_commands(&stack);
        let started = std::time::Instant::now();
        let errors_before = gateway_errors(&stack);
        let sampler = Sampler::start(&stack);
        // `api`: the REST load beside the dm WebSocket load.
        let api = if name == "api" {
            let setup = crate::api::setup(stack.edge.https, &cert, &sources(8), &scenario.prefix).await?;
            // Measured once every WebSocket is up (the shards count them)
            // and the messages flow: during the ramp the machine does
            // nothing but TLS handshakes (9,000 in ~10 s here), which
            // is a connection storm, not the steady state seed 002 asks
            // about. Then for the rest of the publishing time.
            let shard_ports: Vec<u16> = stack.shards.iter().map(|(_, p)| *p).collect();
            Some(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                loop {
                    let mut up = 0;
                    for p in &shard_ports {
                        up += chat_connections(&http, *p).await;
                    }
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "api: only {up} of {conns} WebSockets up after 120 s"
                    );
                    if up >= conns as u64 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let settle = Duration::from_secs(3);
                tokio::time::sleep(settle).await;
                crate::api::load(setup, dur.saturating_sub(settle + Duration::from_secs(2))).await
            }))
        } else {
            None
        };
        let beside = (name == "idle").then(|| scenario.clone());
        let recordings = match profiles {
            Some(_) => vec![
                crate::profile::record(stack.gateway.proc.pid(), &format!("{name}-gateway"))?,
                crate::profile::record(stack.shards[0].0.proc.pid(), &format!("{name}-shard"))?,
            ],
            None => Vec::new(),
        };
        let mut report: Report = generator::run(scenario).await?;
        for r in recordings {
            r.finish(&args.out)?;
        }
        if let Some(api) = api {
            let (result, ok) = api.await??;
            failed |= !ok;
            let table: Vec<String> = result["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                        e["endpoint"].as_str().unwrap_or(""),
                        e["requests"],
                        e["errors"],
                        e["not_sent"],
                        e["p50_ms"].as_f64().unwrap_or(0.0),
                        e["p95_ms"].as_f64().unwrap_or(0.0),
                        e["p99_ms"].as_f64().unwrap_or(0.0),
                        e["max_ms"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect();
            let l = &report.latency_ms;
            let md = format!(
                "# The chat REST API under WebSocket load\n\n`cargo run --release -p loadtest -- bench --scenarios api{}` \
                 on commit `{commit}`: \
                 {} requests/s per endpoint (open loop, {} users, 8 source addresses) through the gateway over TLS, \
                 from 3 s after the last WebSocket is up, while the `dm` scenario runs ({} WebSockets, {} msg/s: {:.0} deliveries/s, delivery p99 {:.1} ms, \
                 {} lost). Seed 002's target: p95 < 200 ms for every endpoint. 2 cores, generator included.\n\n\
                 | endpoint | answered | errors | not sent | p50 ms | p95 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|---|\n{}\n",
                if args.quick { " --quick" } else { "" },
                result["rate_per_endpoint"],
                result["users"],
                report.connections_ok,
                rate,
                report.deliveries_per_sec,
                l.p99,
                report.deliveries_lost,
                table.join("\n")
            );
            std::fs::write(args.out.join("api.md"), &md)?;
            std::fs::write(
                args.out.join("api-rest.json"),
                serde_json::to_string_pretty(&result)?,
            )?;
            println!("\n{md}");
        }
        report.servers = sampler.finish(&before, report.connections_ok);
        for ((name, after), (_, before)) in backing_cpu(&stack).into_iter().zip(&backing_before) {
            report.servers.push(ServerUsage {
                name,
                cpu_secs: after.saturating_sub(*before).as_secs_f64(),
                ..ServerUsage::default()
            });
        }
        let redis_rates = redis_rates(&redis_before, &redis_commands(&stack), started.elapsed());
        // After the run's connections are gone: their ends must not be errors.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let errors_after = gateway_errors(&stack);
        report.gateway_error_lines = Some(errors_after.0 - errors_before.0);
        report.gateway_client_error_lines = Some(errors_after.1 - errors_before.1);
        for line in error_samples(&stack) {
            eprintln!("{name}: gateway ERROR, e.g.: {line}");
        }
        if let Some(s) = beside {
            report.nginx_rss_per_connection_kib = nginx_idle(&stack, s).await?;
        }
        println!("\n== {name}\n{}", report.table());
        let suffix = if args.bus == "redis" {
            String::new()
        } else {
            format!("-{}", args.bus)
        };
        std::fs::write(
            args.out.join(format!("{name}{suffix}.json")),
            serde_json::to_string_pretty(&report)?,
        )?;
        // Any failed connection fails the run (#19: none under the ramp).
        let problems = report.problems(0, 0.0);
        failed |= !problems.is_empty();
        for p in &problems {
            eprintln!("{name}: {p}");
        }
        let per_conn = |n: &str| {
            report
                .servers
                .iter()
                .filter(|s| s.name.starts_with(n))
                .map(|s| format!("{:.1}", s.rss_per_connection_kib))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let l = &report.latency_ms;
        let label = if args.bus == "redis" {
            name.to_string()
        } else {
            format!("{name} ({}; Redis commands/s per node: {redis_rates})", args.bus)
        };
        rows.push(format!(
            "| {label} | {} conns, groups of {group}, {rate} msg/s, {}s | {:.0} deliveries/s | p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms | {} lost, {} dup | {} KiB | {} KiB | {:.1} s |",
            report.connections_ok,
            dur.as_secs(),
            report.deliveries_per_sec,
            l.p50,
            l.p99,
            l.p999,
            report.deliveries_lost,
            report.deliveries_duplicated,
            per_conn("chat"),
            match report.nginx_rss_per_connection_kib {
                Some(n) => format!("{} (nginx {n:.1})", per_conn("gateway")),
                None => per_conn("gateway"),
            },
            report.generator_cpu_secs,
        ));
    }
    let table = format!(
        "# Benchmark results\n\nMeasured on commit `{commit}` with `cargo run --release -p loadtest -- bench{}{}` \
         (2 cores, load generator on the same machine, everything through the gateway over TLS).\n\n\
         | scenario | load | throughput | latency (publish→receive) | delivery | RSS/conn (shards) | RSS/conn (gateway) | generator CPU |\n\
         |---|---|---|---|---|---|---|---|\n{}\n",
        if args.quick { " --quick" } else { "" },
        if args.bus == "redis" {
            String::new()
        } else {
            format!(" --bus {} --scenarios {}", args.bus, args.scenarios.join(","))
        },
        rows.join("\n")
    );
    if !rows.is_empty() {
        println!("\n{table}");
        let full = DEFAULT_SCENARIOS
            .iter()
            .all(|s| args.scenarios.iter().any(|a| a == s));
        // The results' README (and the project's, below) hold a full run:
        // a run of some scenarios (e.g. `static,api`, which have their own
        // tables) must not replace it with a table of one row.
        let file = match args.bus.as_str() {
            "redis" if full => Some("README.md"),
            "redis" => None,
            _ => Some("redis-cluster.md"),
        };
        if let Some(file) = file {
            std::fs::write(args.out.join(file), &table)?;
        }
        // The project README shows the latest full run, as it was printed.
        if file == Some("README.md") && !args.quick {
            let readme = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
            let body = table.split_once("\n\n").map_or(table.as_str(), |(_, b)| b);
            write_between_markers(&readme, body.trim_end())?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// nginx (2 workers, the gateway's certificate) proxying WebSockets to the
/// same shards, holding the connections of `s` (for 15 s at most): the
/// growth of its workers' RSS per connection, in KiB, to set beside the
/// gateway's. `None` without nginx.
async fn nginx_idle(stack: &Stack, mut s: Scenario) -> anyhow::Result<Option<f64>> {
    if !crate::nginx::available() {
        eprintln!("\n*** idle: nginx beside SKIPPED, no nginx (apt-get install nginx-light) ***\n");
        return Ok(None);
    }
    let shards: String = stack
        .shards
        .iter()
        .map(|(_, p)| format!(" server 127.0.0.1:{p};"))
        .collect();
    let nginx = Nginx::start(
        Some(&stack.gateway.dir.path().join("certs")),
        &format!(
            "  upstream shards {{{shards} }}\n  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}"
        ),
        "    location / { proxy_pass http://shards; proxy_http_version 1.1; \
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade; \
         proxy_read_timeout 1h; }\n",
    )?;
    s.urls = vec![format!("wss://localhost:{}/ws", nginx.port).parse()?];
    s.prefix = format!("{}-nginx", s.prefix);
    s.duration = s.duration.min(Duration::from_secs(15));
    let workers = nginx.workers();
    let rss = move || crate::sys::rss_bytes_of(workers.iter().copied());
    let before = rss();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, stop, rss) = (peak.clone(), stop.clone(), rss.clone());
        async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let r = generator::run(s).await?;
    stop.cancel();
    sampler.await?;
    tokio::task::spawn_blocking(move || drop(nginx)).await?;
    anyhow::ensure!(
        r.connections_failed == 0,
        "idle through nginx: {} of {} connections failed",
        r.connections_failed,
        r.connections
    );
    let grown = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    Ok(Some(grown as f64 / 1024.0 / r.connections_ok.max(1) as f64))
}

/// Commands each Redis node has processed so far (`INFO stats`).
fn redis_commands(stack: &Stack) -> Vec<(u16, u64)> {
    match &stack.bus {
        BusServer::Cluster(c) => c.commands_processed(),
        BusServer::Redis(_) => Vec::new(),
    }
}

/// Commands per second and node over `elapsed`, e.g. `1200 / 40 / 35`
/// (masters and replicas alike: a replica applies its master's writes).
fn redis_rates(before: &[(u16, u64)], after: &[(u16, u64)], elapsed: Duration) -> String {
    after
        .iter()
        .map(|(port, n)| {
            let b = before.iter().find(|(p, _)| p == port).map_or(0, |(_, n)| *n);
            format!("{:.0}", n.saturating_sub(b) as f64 / elapsed.as_secs_f64())
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn compare(direct_rps: f64, direct_p99: f64, gw_rps: f64, gw_p99: f64) -> serde_json::Value {
    json!({
        "direct_rps": direct_rps, "direct_p99_ms": direct_p99,
        "gateway_rps": gw_rps, "gateway_p99_ms": gw_p99,
        "ratio_pct": 100.0 * gw_rps / direct_rps.max(1.0),
        "added_p99_ms": gw_p99 - direct_p99,
    })
}

/// Deploys a static site (busybox httpd, a 1 KiB page) through the jobs
/// API, times the deploy and how long until the gateway serves it, then
/// `wrk` against the container's private port and through the gateway.
async fn paas(stack: &Stack) -> anyhow::Result<serde_json::Value> {
    use portico_tests::client::token_with_roles;
    use std::time::Instant;
    tokio::task::spawn_blocking(portico_tests::docker::test_image).await?;
    let repo = stack.repos.path().join("bench-site");
    let page = format!("<!doctype html><title>bench</title><p>{}</p>\n", "x".repeat(1000));
    portico_tests::docker::git_repo(&repo, &[("index.html", &page)]);
    let jobs = format!("http://127.0.0.1:{}", stack.jobs_port);
    let token = token_with_roles("bench", &["super_admin"]);
    let http = reqwest::Client::new();
    let started = Instant::now();
    let created: serde_json::Value = http
        .post(format!("{jobs}/api/apps"))
        .bearer_auth(&token)
        .json(&json!({ "name": "bench", "repo": repo }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let task = created["task"].as_i64().context("no deploy task")?;
    let state = loop {
        let t: serde_json::Value = http
            .get(format!("{jobs}/api/apps/bench/tasks/{task}"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        match t["state"].as_str() {
            Some("succeeded") => break t,
            Some("failed" | "cancelled") => anyhow::bail!("deploy failed: {}", t["error"]),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let deploy_secs = started.elapsed().as_secs_f64();
    let done = Instant::now();
    let host = format!("bench.{PAAS_DOMAIN}");
    let edge = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(
            &stack.gateway.certificate(PAAS_DOMAIN),
        )?)
        .resolve(&host, ([127, 0, 0, 1], stack.edge.https).into())
        .build()?;
    let via = format!("https://{host}:{}/", stack.edge.https);
    loop {
        let r = edge.get(&via).send().await?;
        if r.status().is_success() {
            break;
        }
        anyhow::ensure!(
            done.elapsed() < Duration::from_secs(10),
            "the gateway never served the app"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let route_live_ms = done.elapsed().as_secs_f64() * 1000.0;
    let app: serde_json::Value = http
        .get(format!("{jobs}/api/apps/bench"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let port = app["app"]["host_port"].as_u64().context("no host port")?;
    let (direct_rps, direct_p99) = wrk(format!("http://127.0.0.1:{port}/"), None).await?;
    // wrk cannot resolve the app's name: it connects to localhost (SNI
    // localhost) and names the app in the Host header.
    let (gw_rps, gw_p99) = wrk(format!("https://localhost:{}/", stack.edge.https), Some(host)).await?;
    http.delete(format!("{jobs}/api/apps/bench"))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?;
    let mut r = compare(direct_rps, direct_p99, gw_rps, gw_p99);
    r["deploy_secs"] = json!(deploy_secs);
    r["route_live_ms"] = json!(route_live_ms);
    r["deploy"] = state["result"].clone();
    Ok(r)
}
