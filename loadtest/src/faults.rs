//! `bench --scenarios faults`: a steady load through the gateway while one
//! fault after another hits the stack, each in its own run of the
//! generator (so every number belongs to one fault): Redis frozen
//! (SIGSTOP) for 10 s, Redis killed and restarted, a chat shard killed and
//! restarted, PostgreSQL restarted, and a gateway upgrade (SIGQUIT to the
//! old process, `--upgrade` for the new one) under as many WebSockets as
//! this machine's open-file limit allows, up to 10,000.
//!
//! For each: acknowledged messages lost (must be 0), duplicates and
//! reorders delivered to the application (0), how long the flow stopped
//! (longest stretch without an ack, and without a delivery), reconnects and
//! how connections ended, and publishes that were refused or never
//! acknowledged (unavailable while the fault lasted). Writes
//! `loadtest/results/faults.json` and `faults.md`.

use std::path::Path;
use std::time::Duration;

use portico_config::Secret;
use portico_tests::TEST_SECRET;
use portico_tests::servers::Service;
use serde::Serialize;

use crate::bench::{Stack, sources};
use crate::generator::{self, Scenario};
use crate::report::Report;

/// One fault: what it does to the stack, on a blocking thread.
struct Fault {
    name: &'static str,
    what: &'static str,
    /// The bus it applies to (`None`: any).
    bus: Option<&'static str>,
    inject: fn(&mut Stack),
}

const FAULTS: &[Fault] = &[
    Fault {
        name: "redis_stop",
        what: "Redis SIGSTOP for 10 s, then SIGCONT",
        bus: Some("redis"),
        inject: |s| {
            s.bus.redis().signal("STOP");
            std::thread::sleep(Duration::from_secs(10));
            s.bus.redis().signal("CONT");
        },
    },
    Fault {
        name: "redis_kill",
        what: "Redis SIGKILL, restarted at once (empty)",
        bus: Some("redis"),
        inject: |s| {
            s.bus.redis().stop();
            s.bus.redis().restart();
        },
    },
    Fault {
        name: "redis_master_kill",
        what: "a Redis Cluster master SIGKILLed (its replica is promoted)",
        bus: Some("redis_cluster"),
        inject: |s| {
            let c = s.bus.cluster();
            let master = c.master_of("portico:conv:{faults}");
            c.kill(master);
            c.wait_ok();
        },
    },
    Fault {
        name: "shard_kill",
        what: "chat shard 1 SIGKILL, restarted after 1 s",
        bus: None,
        inject: |s| {
            let port = s.shards[0].1;
            s.shards[0].0.proc.signal("KILL");
            s.shards[0].0.proc.wait_exit(Duration::from_secs(10));
            std::thread::sleep(Duration::from_secs(1));
            s.shards[0].0 = Service::chat_on(port, &s.shard_env[0]);
        },
    },
    Fault {
        name: "postgres_restart",
        what: "PostgreSQL fast shutdown and start",
        bus: None,
        inject: |s| s.pg.restart(),
    },
    Fault {
        name: "gateway_upgrade",
        what: "gateway upgrade: new process with --upgrade, SIGQUIT to the old",
        bus: None,
        inject: |s| {
            let new = s.gateway.upgrade_gateway(&s.gateway_env);
            s.gateway.proc.wait_exit(Duration::from_secs(60));
            s.upgraded = Some(new);
        },
    },
];

#[derive(Debug, Serialize)]
struct FaultResult {
    fault: &'static str,
    what: &'static str,
    report: Report,
}

/// Runs every fault; `false` if any broke a delivery guarantee.
pub(crate) async fn run(stack: &mut Stack, quick: bool, fd_cap: usize, out: &Path) -> anyhow::Result<bool> {
    let cert = stack.gateway.certificate("localhost");
    let scale = if quick { 10 } else { 1 };
    let mut results = Vec::new();
    let mut ok = true;
    let bus = stack.bus.config().0;
    for fault in FAULTS.iter().filter(|f| f.bus.is_none_or(|b| b == bus)) {
        let (conns, group, rate) = match fault.name {
            // The upgrade hands every WebSocket over: as many as fit.
            "gateway_upgrade" => (10_000.min(fd_cap), 2, 1_000),
            _ => (2_000, 10, 500),
        };
        let (conns, rate) = (conns / scale, rate / scale as u32);
        let duration = Duration::from_secs(if quick { 15 } else { 25 });
        let scenario = Scenario {
            urls: vec![format!("wss://localhost:{}/ws", stack.edge.https).parse()?],
            api: format!("https://localhost:{}/", stack.edge.https).parse()?,
            ca: Some(cert.clone()),
            secret: Secret::new(TEST_SECRET),
            connections: conns,
            connect_rate: 2_000,
            group_size: group,
            rate,
            duration,
            sources: sources(8),
            body_bytes: 64,
            prefix: format!(
                "{}{:x}",
                fault.name.replace('_', ""),
                portico_common::auth::now_secs()
            ),
            drain: Duration::from_secs(10),
            drop_one_delivery: false,
        };
        eprintln!(
            "== fault {}: {} ({conns} connections, {rate} msg/s)",
            fault.name, fault.what
        );
        let load = tokio::spawn(generator::run(scenario));
        // After the ramp, five seconds of steady load, then the fault.
        let ramp = Duration::from_secs_f64(conns as f64 / 2_000.0);
        tokio::time::sleep(ramp + Duration::from_secs(5)).await;
        // Blocking (signals, waits for processes) while the load goes on
        // on the runtime's other threads.
        tokio::task::block_in_place(|| (fault.inject)(stack));
        let report = load.await??;
        println!("\n== fault {}\n{}", fault.name, report.table());
        let problems = report.problems(0, 1.0);
        for p in &problems {
            eprintln!("fault {}: {p}", fault.name);
        }
        ok &= problems.is_empty();
        results.push(FaultResult {
            fault: fault.name,
            what: fault.what,
            report,
        });
    }
    let suffix = if bus == "redis" {
        String::new()
    } else {
        format!("-{bus}")
    };
    std::fs::write(
        out.join(format!("faults{suffix}.json")),
        serde_json::to_string_pretty(&results)?,
    )?;
    let table = table(&results, quick);
    std::fs::write(out.join(format!("faults{suffix}.md")), &table)?;
    println!("\n{table}");
    Ok(ok)
}

fn table(results: &[FaultResult], quick: bool) -> String {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let rows: Vec<String> = results
        .iter()
        .map(|f| {
            let r = &f.report;
            format!(
                "| {} | {} conns, {} msg/s | {} | **{}** | {} | {} | {:.0} ms / {:.0} ms | {} ({}) | {} |",
                f.what,
                r.connections_ok,
                r.rate_per_sec,
                r.acked_messages,
                r.deliveries_lost,
                r.deliveries_duplicated,
                r.deliveries_out_of_order,
                r.longest_ack_gap_ms,
                r.longest_delivery_gap_ms,
                r.reconnects,
                r.close_codes
                    .iter()
                    .map(|(c, n)| format!("{n}× {c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.publish_errors + r.unacked_at_end,
            )
        })
        .collect();
    format!(
        "# Faults under load\n\nMeasured on commit `{commit}` with `cargo run --release -p loadtest -- bench \
         --scenarios faults{}` (2 cores, everything through the gateway over TLS; one generator run per fault, \
         the fault 5 s into the steady load). Lost = acknowledged and never delivered to a member that stayed \
         subscribed; the generator reconnects, resumes from its last offset and re-sends unacknowledged \
         publishes, as the protocol asks of clients.\n\n\
         | fault | load | acked | lost | duplicates | reorders | longest without ack / delivery | reconnects (closes) | unavailable publishes |\n\
         |---|---|---|---|---|---|---|---|---|\n{}\n",
        if quick { " --quick" } else { "" },
        rows.join("\n")
    )
}
