//! `portico-loadtest`: see `loadtest` (the library) and README.md.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadtest::generator::{self, Scenario};
use portico_config::Secret;

#[derive(Parser)]
#[command(
    version,
    about = "Load generator for the Portico chat protocol, and the stack benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one load scenario against running servers.
    Run(Box<RunArgs>),
    /// Start real Redis, PostgreSQL, two chat shards and the gateway (release
    /// builds), run the standard scenarios, write loadtest/results/.
    Bench(loadtest::bench::BenchArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// WebSocket URL: ws://127.0.0.1:9101/ws (a shard) or wss://localhost:8443/ws (the gateway).
    /// Repeat to spread connections over several (e.g. every shard).
    #[arg(long, default_value = "wss://localhost:8443/ws")]
    url: Vec<url::Url>,
    /// Chat REST base URL for creating conversations (default: same host as --url).
    #[arg(long)]
    api: Option<url::Url>,
    /// PEM certificate to trust for wss/https (portico up: data/certs/localhost.crt).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The deployment's JWT secret (portico up: the contents of data/jwt-secret).
    #[arg(long, env = "PORTICO_AUTH__JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Members per conversation (connections are grouped in order).
    #[arg(short = 's', long, default_value_t = 10)]
    group_size: usize,
    /// Messages per second in total (open loop); 0 = idle, only hold connections.
    #[arg(short = 'm', long, default_value_t = 100)]
    rate: u32,
    /// Seconds to publish (or hold, when idle).
    #[arg(short = 'd', long, default_value_t = 10)]
    duration: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Local source addresses, comma separated (127.0.0.2,127.0.0.3 lift the
    /// ~28k-connections-per-address limit on loopback).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Seconds to wait for in-flight deliveries after the last publish.
    #[arg(long, default_value_t = 5)]
    drain: u64,
    /// Write the report as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit non-zero when more deliveries than this were lost.
    #[arg(long, default_value_t = 0)]
    max_lost: u64,
    /// Exit non-zero when more than this percentage of connections failed.
    #[arg(long, default_value_t = 1.0)]
    max_failed_pct: f64,
    /// After the run, check the acknowledged offsets against the chat
    /// store: every acked (id, offset) is in PostgreSQL at that offset, and
    /// every conversation's offsets run 1, 2, 3 … without a gap.
    #[arg(long, value_name = "POSTGRES_URL")]
    verify_store: Option<String>,
    /// Test hook: one delivery is ignored, as if lost (the run must fail).
    #[arg(long, hide = true)]
    test_drop_one_delivery: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(a) => run(*a).await,
            Command::Bench(a) => loadtest::bench::bench(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portico-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let api = match a.api {
        Some(u) => u,
        None => {
            let first = a
                .url
                .first()
                .ok_or_else(|| anyhow::anyhow!("--url is required"))?;
            let mut u = first.clone();
            let scheme = if first.scheme() == "wss" { "https" } else { "http" };
            u.set_scheme(scheme)
                .map_err(|_| anyhow::anyhow!("cannot derive the API URL from {first}"))?;
            u.set_path("/");
            u
        }
    };
    let ca = a.ca.as_ref().map(std::fs::read).transpose()?;
    let scenario = Scenario {
        urls: a.url,
        api,
        ca,
        secret: Secret::new(a.secret),
        connections: a.connections,
        connect_rate: a.connect_rate,
        group_size: a.group_size,
        rate: a.rate,
        duration: Duration::from_secs(a.duration),
        sources: a.sources,
        body_bytes: a.body_bytes,
        prefix: format!("lt{:x}{}", portico_common::auth::now_secs(), std::process::id()),
        drain: Duration::from_secs(a.drain),
        drop_one_delivery: a.test_drop_one_delivery,
    };
    let prefix = scenario.prefix.clone();
    let (report, acked) = generator::run_with_acks(scenario).await?;
    print!("{}", report.table());
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    let mut problems = report.problems(a.max_lost, a.max_failed_pct);
    if let Some(url) = &a.verify_store {
        let checked = loadtest::verify::store(url, &prefix, &acked).await?;
        println!(
            "store verified         {} conversations, {} messages",
            checked.0, checked.1
        );
        problems.extend(checked.2);
    }
    for p in &problems {
        eprintln!("FAILED: {p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
