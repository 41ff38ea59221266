//! `bench --scenarios edge`: the attacker's probes of the edge, asked of
//! the gateway and of nginx side by side (Debian's nginx, TLS and HTTP/2,
//! header and body timeouts of 10 s, the usual `proxy_set_header` lines),
//! both in front of the same upstream, which echoes the request head it
//! received. Each probe reports what each proxy answered or let through;
//! `loadtest/results/edge.md` is the table. Skipped, loudly, without nginx.

use std::path::Path;
use std::time::{Duration, Instant};

use portico_tests::client::tls_connect;
use portico_tests::free_port;
use portico_tests::servers::{EdgePorts, Service};
use portico_tests::upstream::Upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::nginx::Nginx;

/// One probe's outcome at one proxy, in words.
type Outcome = String;

struct Probe {
    what: &'static str,
    /// What a hardened edge does (the bar both are held to).
    want: &'static str,
}

const PROBES: &[Probe] = &[
    Probe {
        what: "TRACE /",
        want: "refused (405)",
    },
    Probe {
        what: "HTTP/1.1 without Host",
        want: "400",
    },
    Probe {
        what: "Content-Length: 5, 5",
        want: "400",
    },
    Probe {
        what: "a header line without a colon",
        want: "400 with security headers, no Server",
    },
    Probe {
        what: "upstream refuses the connection",
        want: "502 with security headers, no Server",
    },
    Probe {
        what: "GET /public/../admin/x",
        want: "the upstream sees /admin/x",
    },
    Probe {
        what: "GET /public/%2e%2e/admin/x",
        want: "the upstream sees /admin/x",
    },
    Probe {
        what: "spoofed X_Forwarded_For, True-Client-IP, X-Client-IP, CF-Connecting-IP, X-Original-URL, X-Forwarded-Port",
        want: "none reaches the upstream",
    },
    Probe {
        what: "50 clients send half of a 1,000-byte body and stall",
        want: "0 upstream connections",
    },
    Probe {
        what: "100 silent TCP connections from one address",
        want: "closed by 11 s",
    },
    Probe {
        what: "HTTP/2 request with 150 headers",
        want: "431",
    },
];

/// Runs the probes against a fresh gateway and nginx; writes edge.md.
pub async fn run(out: &Path) -> anyhow::Result<bool> {
    if !crate::nginx::available() {
        eprintln!("\n*** edge: SKIPPED, no nginx (apt-get install nginx-light) ***\n");
        return Ok(true);
    }
    let up = Upstream::start(&[]).await;
    let dir = tempfile::tempdir()?;
    let (gw, edge) = gateway(up.port, dir.path())?;
    let cert_dir = gw.dir.path().join("certs");
    let down = free_port();
    let locations = format!(
        "location /down {{ proxy_pass http://127.0.0.1:{down}; }}\n\
         location / {{\n      proxy_pass http://127.0.0.1:{upstream};\n      proxy_http_version 1.1;\n\
         proxy_set_header Host $host;\n      proxy_set_header X-Real-IP $remote_addr;\n\
         proxy_set_header X-Forwarded-For $remote_addr;\n    }}\n",
        upstream = up.port
    );
    let nginx = Nginx::start(Some(&cert_dir), "", &locations)?;
    let ca = std::fs::read(cert_dir.join("localhost.crt"))?;
    let mut rows = Vec::new();
    for (i, p) in PROBES.iter().enumerate() {
        let ours = probe(i, edge.https, &ca, &up).await;
        let theirs = probe(i, nginx.port, &ca, &up).await;
        println!("{:<60} gateway: {ours:<40} nginx: {theirs}", p.what);
        rows.push(format!("| {} | {} | {ours} | {theirs} |", p.what, p.want));
    }
    let table = format!(
        "# The edge against nginx\n\n`cargo run --release -p loadtest -- bench --scenarios edge`: each probe sent to the \
         gateway and to nginx ({}; TLS, HTTP/2, `client_header_timeout`/`client_body_timeout` 10 s, \
         `proxy_set_header Host`, `X-Real-IP`, `X-Forwarded-For`), both in front of one upstream that echoes \
         the request head it received.\n\n| probe | a hardened edge | gateway | nginx |\n|---|---|---|---|\n{}\n",
        crate::nginx::version(),
        rows.join("\n")
    );
    std::fs::write(out.join("edge.md"), &table)?;
    println!("\n{table}");
    Ok(true)
}

/// A gateway whose `/` goes to `upstream` and `/down` to a closed port.
fn gateway(upstream: u16, dir: &Path) -> anyhow::Result<(Service, EdgePorts)> {
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[[gateway.routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"127.0.0.1:{}\"\n\
             [[gateway.routes]]\nname = \"site\"\npath_prefix = \"/\"\nupstream = \"127.0.0.1:{upstream}\"\n",
            free_port()
        ),
    )?;
    let edge = EdgePorts::free();
    let mut env = edge.env();
    env.push((
        "PORTICO_GATEWAY__CHAT_SHARDS",
        format!("[\"127.0.0.1:{}\"]", free_port()),
    ));
    env.push(("PORTICO_LOG__LEVEL", "warn".into()));
    let file = file.display().to_string();
    let svc = Service::gateway(&["--config", &file], &env, &edge);
    Ok((svc, edge))
}

/// Sends `request` raw over TLS (HTTP/1.1); the response, or what ended it.
async fn raw(port: u16, ca: &[u8], request: &str) -> String {
    let Ok(mut tls) = tls_connect(port, ca, std::net::IpAddr::from([127, 0, 0, 1])).await else {
        return "TLS failed".into();
    };
    if tls.write_all(request.as_bytes()).await.is_err() {
        return "write failed".into();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status(resp: &str) -> String {
    resp.split(' ')
        .nth(1)
        .map_or("no answer".into(), |s| s.chars().take(3).collect())
}

/// Status, and whether our headers are there and a `Server` is not.
fn answer(resp: &str) -> String {
    let lower = resp.to_ascii_lowercase();
    let head = lower.split("\r\n\r\n").next().unwrap_or_default();
    let server = head
        .lines()
        .find_map(|l| l.strip_prefix("server: "))
        .map_or("no Server".to_string(), |s| format!("Server: {s}"));
    let secure = if head.contains("x-content-type-options") {
        "security headers"
    } else {
        "no security headers"
    };
    format!("{}, {secure}, {server}", status(resp))
}

/// What the upstream saw of the newest request (its request line).
fn seen_path(up: &Upstream) -> String {
    up.heads()
        .last()
        .and_then(|h| h.lines().next().map(str::to_string))
        .unwrap_or_else(|| "nothing reached it".into())
}

async fn probe(i: usize, port: u16, ca: &[u8], up: &Upstream) -> Outcome {
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    match i {
        0 => status(&raw(port, ca, "TRACE / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await),
        1 => status(&raw(port, ca, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await),
        2 => status(
            &raw(
                port,
                ca,
                "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello",
            )
            .await,
        ),
        3 => answer(&raw(port, ca, "GET / HTTP/1.1\r\nHost: localhost\r\nNoColon\r\n\r\n").await),
        4 => answer(&raw(port, ca, &get("/down")).await),
        5 | 6 => {
            let path = if i == 5 { "/public/../admin/x" } else { "/public/%2e%2e/admin/x" };
            let r = raw(port, ca, &get(path)).await;
            if status(&r) == "200" {
                format!("upstream saw `{}`", seen_path(up))
            } else {
                status(&r)
            }
        }
        7 => {
            let spoofed = [
                ("X_Forwarded_For", "6.6.6.1"),
                ("True-Client-IP", "6.6.6.2"),
                ("X-Client-IP", "6.6.6.3"),
                ("CF-Connecting-IP", "6.6.6.4"),
                ("X-Original-URL", "/6.6.6.5"),
                ("X-Forwarded-Port", "6666"),
            ];
            let headers: String = spoofed.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let _ = raw(
                port,
                ca,
                &format!("GET /x HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"),
            )
            .await;
            let head = up.heads().last().cloned().unwrap_or_default().to_ascii_lowercase();
            let through: Vec<&str> = spoofed
                .iter()
                .filter(|(k, v)| head.contains(&k.to_ascii_lowercase()) || head.contains(v))
                .map(|(k, _)| *k)
                .collect();
            if through.is_empty() {
                "none reached it".into()
            } else {
                format!("reached it: {}", through.join(", "))
            }
        }
        8 => {
            let before = up.connections();
            let mut held = Vec::new();
            for _ in 0..50 {
                if let Ok(mut tls) = tls_connect(port, ca, std::net::IpAddr::from([127, 0, 0, 1])).await
                    && tls
                        .write_all(b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nhalf")
                        .await
                        .is_ok()
                {
                    held.push(tls);
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            format!("{} upstream connections", up.connections() - before)
        }
        9 => {
            let started = Instant::now();
            let mut socks = Vec::new();
            for _ in 0..100 {
                if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    socks.push(s);
                }
            }
            let mut buf = [0u8; 1];
            let mut closed_by = Duration::ZERO;
            for s in &mut socks {
                let left = Duration::from_secs(20).saturating_sub(started.elapsed());
                match tokio::time::timeout(left, s.read(&mut buf)).await {
                    Ok(_) => closed_by = closed_by.max(started.elapsed()),
                    Err(_) => return "still open after 20 s".into(),
                }
            }
            format!("all closed by {:.1} s", closed_by.as_secs_f64())
        }
        10 => h2_headers(port, ca).await,
        _ => unreachable!("one arm per probe"),
    }
}

/// An HTTP/2 request with 150 headers: the status, or how it failed.
async fn h2_headers(port: u16, ca: &[u8]) -> String {
    let client = match reqwest::Client::builder()
        .add_root_certificate(match reqwest::Certificate::from_pem(ca) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        })
        .http2_prior_knowledge()
        .build()
    {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let mut req = client.get(format!("https://localhost:{port}/x"));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "v");
    }
    match req.send().await {
        Ok(r) => format!("{} ({:?})", r.status().as_u16(), r.version()),
        Err(e) => format!("error: {}", error_chain(&e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s.chars().take(80).collect()
}
