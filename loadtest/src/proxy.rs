//! `bench --scenarios proxy`: HTTPS keep-alive proxying, the gateway beside
//! nginx in front of the same origin on this machine.
//!
//! The origin is a plain-HTTP nginx answering `ok` (its direct rate is
//! reported, to show it is not the limit). The gateway (one route `/` to the
//! origin, rate limits off, 2 threads) and nginx (2 workers, TLS with the
//! same certificate, `keepalive 64` to the origin) take `wrk -t2 -c64 -d10s`
//! in turns, twice each; the better run of each counts (the machine is
//! shared and noisy), and the least CPU time each proxy spent per request
//! is reported beside (the profiled run, with `--profile`, left out).
//! Every answer must be a 200: a proxy that answers without asking the
//! origin is not measured.

use std::path::Path;
use std::time::Duration;

use portico_tests::servers::Service;
use serde_json::{Value, json};

use crate::measure::{side_by_side, wrk};
use crate::nginx::Nginx;

/// Runs the scenario; `None` (said loudly) without nginx. With `profiles`
/// (the results directory), the gateway's first run is profiled.
pub async fn run(profiles: Option<&Path>) -> anyhow::Result<Option<Value>> {
    if !crate::nginx::available() {
        eprintln!("\n*** proxy: SKIPPED, no nginx (apt-get install nginx-light) ***\n");
        return Ok(None);
    }
    let origin = Nginx::start(
        None,
        "",
        "    location / { default_type text/plain; return 200 \"ok\\n\"; }\n",
    )?;
    let routes = format!(
        "[[gateway.routes]]\nname = \"origin\"\npath_prefix = \"/\"\nupstream = \"127.0.0.1:{}\"\n",
        origin.port
    );
    let env = [
        ("PORTICO_GATEWAY__THREADS", "2".to_string()),
        ("PORTICO_LOG__LEVEL", "warn".to_string()),
    ];
    let (gw, edge) = tokio::task::spawn_blocking(move || Service::gateway_with_routes(&routes, &env)).await?;
    let https = edge.https;
    let nginx = Nginx::start(
        Some(&gw.dir.path().join("certs")),
        &format!(
            "  upstream origin {{ server 127.0.0.1:{}; keepalive 64; }}",
            origin.port
        ),
        "    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }\n",
    )?;

    let direct = wrk(format!("http://127.0.0.1:{}/", origin.port), None).await?;
    let (ours, theirs) = side_by_side(
        "proxy",
        (gw.proc.pid(), &format!("https://localhost:{https}/")),
        (&nginx, &format!("https://localhost:{}/", nginx.port)),
        profiles.map(|p| (p, "proxy-gateway")),
    )
    .await?;
    tokio::task::spawn_blocking(move || drop((gw, nginx, origin))).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut result = json!({
        "origin_direct_rps": direct.0, "origin_direct_p99_ms": direct.1,
        "gateway_rps": ours.rps, "gateway_p99_ms": ours.p99_ms,
        "nginx_rps": theirs.rps, "nginx_p99_ms": theirs.p99_ms,
        "nginx": crate::nginx::version(),
        "rps_ratio": ours.rps / theirs.rps.max(1.0),
        "p99_ratio": ours.p99_ms / theirs.p99_ms.max(0.001),
    });
    ours.put_cpu(&mut result, "gateway");
    theirs.put_cpu(&mut result, "nginx");
    Ok(Some(result))
}
