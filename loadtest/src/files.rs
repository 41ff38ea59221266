//! `bench --scenarios static`: the gateway's file routes beside nginx
//! serving the same files from the same directory on this machine (TLS,
//! same certificate, 2 nginx workers, `sendfile`, `open_file_cache`),
//! `wrk -t2 -c64 -d10s` on a 2 KB and a 1 MB file, two rounds each side
//! by side, each side judged by its better run (as `proxy`, the box being
//! shared and noisy). Types are ones neither
//! side compresses. Writes `loadtest/results/static.md` and `static.json`.
//! Skipped, loudly, without nginx.

use std::path::Path;

use portico_tests::servers::Service;
use serde_json::json;

use crate::measure::{commit, side_by_side};
use crate::nginx::Nginx;

/// With `profiles`, the gateway serving each file is profiled.
pub async fn run(out: &Path, profiles: Option<&Path>) -> anyhow::Result<bool> {
    if !crate::nginx::available() {
        eprintln!("\n*** static: SKIPPED, no nginx (apt-get install nginx-light) ***\n");
        return Ok(true);
    }
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("static");
    std::fs::create_dir_all(&root)?;
    let noise = |n: usize| (0..n).map(|i| (i * 7919 % 251) as u8).collect::<Vec<u8>>();
    std::fs::write(root.join("small.png"), noise(2 * 1024))?;
    std::fs::write(root.join("big.bin"), noise(1024 * 1024))?;

    let routes = format!(
        "[[gateway.routes]]\nname = \"static\"\npath_prefix = \"/static\"\nroot = \"{}\"\ncache = \"immutable\"\n",
        root.display()
    );
    // nginx logs nothing per request here; neither does the gateway.
    let env = [("PORTICO_LOG__LEVEL", "warn".to_string())];
    let (gw, edge) = tokio::task::spawn_blocking(move || Service::gateway_with_routes(&routes, &env)).await?;
    let cert_dir = gw.dir.path().join("certs");
    let locations = format!(
        "sendfile on;\n    open_file_cache max=1024 inactive=60s;\n    \
         location /static/ {{ root {}; expires max; add_header X-Content-Type-Options nosniff; }}\n",
        dir.path().display()
    );
    let nginx = Nginx::start(Some(&cert_dir), "", &locations)?;

    let mut rows = Vec::new();
    let mut results = Vec::new();
    for name in ["small.png", "big.bin"] {
        let profile_name = format!("static-{name}-gateway");
        let (ours, theirs) = side_by_side(
            &format!("static {name}"),
            (
                gw.proc.pid(),
                &format!("https://localhost:{}/static/{name}", edge.https),
            ),
            (&nginx, &format!("https://localhost:{}/static/{name}", nginx.port)),
            profiles.map(|p| (p, profile_name.as_str())),
        )
        .await?;
        let ratio = ours.rps / theirs.rps.max(1.0);
        println!("static {name}: kept gateway {ours}; nginx {theirs}; ratio {ratio:.2}");
        rows.push(format!(
            "| {name} ({}) | {ours} | {theirs} | {ratio:.2} |",
            if name == "big.bin" { "1 MiB" } else { "2 KiB" },
        ));
        let mut result = json!({
            "file": name, "gateway_rps": ours.rps, "gateway_p99_ms": ours.p99_ms,
            "nginx_rps": theirs.rps, "nginx_p99_ms": theirs.p99_ms, "ratio": ratio,
        });
        ours.put_cpu(&mut result, "gateway");
        theirs.put_cpu(&mut result, "nginx");
        results.push(result);
    }
    let commit = commit();
    let table = format!(
        "# Static files: the gateway beside nginx\n\n`cargo run --release -p loadtest -- bench --scenarios static` \
         on commit `{commit}`: `wrk -t2 -c64 -d10s` over TLS (HTTP/1.1, keep-alive) on this 2-core machine, \
         load generator included, two rounds side by side and the better run of each kept; the gateway's file route and nginx ({}; 2 workers, `sendfile`, \
         `open_file_cache`) serve the same directory with the same certificate. Goal: ratio ≥ 1.0.\n\n\
         | file | gateway | nginx | gateway/nginx |\n|---|---|---|---|\n{}\n",
        crate::nginx::version(),
        rows.join("\n")
    );
    std::fs::write(out.join("static.md"), &table)?;
    std::fs::write(out.join("static.json"), serde_json::to_string_pretty(&results)?)?;
    println!("\n{table}");
    Ok(true)
}
