//! `bench --scenarios mail`: a mailbox of 5,000 messages (sizes mixed up to
//! 10 MB) copied from one Dovecot to another by the jobs service (an
//! `initial` run, then a `delta` with nothing new), side by side with
//! Dovecot's own `doveadm backup` over imapc between the same servers
//! (into another user). Writes `results/mail.md` and `mail.json`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use portico_tests::dovecot::Dovecot;
use portico_tests::servers::{Postgres, Service, pg_bin};
use portico_tests::{bins, free_port};
use serde_json::{Value, json};

const SRC_USER: &str = "bench@source.test";
const DST_USER: &str = "bench@dest.test";
const DOVEADM_USER: &str = "doveadm@dest.test";
const PW: &str = "bench-password";

/// Message sizes: mostly small, some large, a few up to 10 MB.
fn size_of(i: usize) -> usize {
    match i % 100 {
        0 => 2_000_000 + (i * 7919) % 8_000_000,
        1..=9 => 100_000 + (i * 104_729) % 900_000,
        _ => 1_000 + (i * 7_919) % 30_000,
    }
}

fn message(i: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Bench {i} <b{i}@old.example>\r\nTo: {SRC_USER}\r\nSubject: bench {i}\r\nDate: Mon, 1 Jan 2018 10:00:00 +0000\r\nMessage-ID: <bench{i}@corpus>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstu\r\n";
    while m.len() < size_of(i) {
        m.extend_from_slice(line);
    }
    m
}

async fn api(port: u16, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let (status, v) = portico_tests::client::api_call(port, method, path, &["super_admin"], body).await;
    anyhow::ensure!(status < 300, "{method} {path}: {status} {v}");
    Ok(v)
}

async fn sync(port: u16, job: i64, kind: &str) -> anyhow::Result<(Value, Duration)> {
    let started = Instant::now();
    let t = api(
        port,
        "POST",
        &format!("/api/migration/jobs/{job}/sync"),
        Some(json!({ "kind": kind })),
    )
    .await?;
    let task = t["task"].as_i64().context("task id")?;
    loop {
        let t = api(port, "GET", &format!("/api/customers/bench/tasks/{task}"), None).await?;
        match t["state"].as_str() {
            Some("succeeded") => return Ok((t["result"].clone(), started.elapsed())),
            Some("failed" | "cancelled") => anyhow::bail!("{kind} sync failed: {t}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn doveadm_backup(src: &Dovecot, dst: &Dovecot) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new("doveadm")
        .arg("-c")
        .arg(dst.conf())
        .args([
            "-o",
            "imapc_host=127.0.0.1",
            "-o",
            &format!("imapc_port={}", src.port),
            "-o",
            &format!("imapc_user={SRC_USER}"),
            "-o",
            &format!("imapc_password={PW}"),
            "-o",
            "imapc_features=rfc822.size fetch-headers",
            "-o",
            "mail_prefetch_count=20",
            "backup",
            "-R",
            "-u",
            DOVEADM_USER,
            "imapc:",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "doveadm backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(started.elapsed())
}

/// Runs the scenario; false if Portico's copy was not exact.
pub async fn run(out: &Path, quick: bool) -> anyhow::Result<bool> {
    if !Dovecot::available() {
        eprintln!("\n*** mail: SKIPPED, no dovecot (apt-get install dovecot-imapd) ***\n");
        return Ok(true);
    }
    let n = if quick { 500 } else { 5_000 };
    let src = Dovecot::start(".", &[], &[(SRC_USER, PW)]);
    let dst = Dovecot::start("/", &[("Sent", "\\Sent")], &[(DST_USER, PW), (DOVEADM_USER, PW)]);
    eprintln!("== mail: filling the source with {n} messages");
    let mut bytes = 0u64;
    {
        let mut imap = src.imap(SRC_USER, PW);
        for i in 0..n {
            let m = message(i);
            bytes += m.len() as u64;
            imap.append(
                "INBOX",
                if i % 3 == 0 { "" } else { "\\Seen" },
                "01-Jan-2020 10:00:00 +0000",
                &m,
            );
        }
    }
    let mb = bytes as f64 / 1e6;
    let pg = Postgres::start();
    let root = tempfile::tempdir()?;
    let port = free_port();
    let env = vec![
        ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}")),
        ("PORTICO_JOBS__POSTGRES_URL", pg.url()),
        ("PORTICO_JOBS__CUSTOMERS_ROOT", root.path().display().to_string()),
        (
            "PORTICO_JOBS__PG_BIN_DIR",
            pg_bin("pg_dump").parent().unwrap().display().to_string(),
        ),
        (
            "PORTICO_JOBS__MAIL__KEYS__K1",
            "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=".into(),
        ),
        ("PORTICO_JOBS__MAIL__ACTIVE_KEY", "k1".into()),
    ];
    let _jobs = Service::start(&bins::jobs(), &[], &env, port);
    api(
        port,
        "POST",
        "/api/customers",
        Some(json!({ "id": "bench", "domain": "bench.test" })),
    )
    .await?;
    let job = api(
        port,
        "POST",
        "/api/migration/jobs",
        Some(
            json!({ "customer": "bench", "domain": "bench.test", "source_type": "imap",
                     "source": { "host": "127.0.0.1", "port": src.port, "tls": false },
                     "destination": { "host": "127.0.0.1", "port": dst.port, "tls": false } }),
        ),
    )
    .await?["id"]
        .as_i64()
        .context("job id")?;
    api(
        port,
        "POST",
        &format!("/api/migration/jobs/{job}/mailboxes"),
        Some(json!({ "source_login": SRC_USER, "source_password": PW, "dest_login": DST_USER, "dest_password": PW })),
    )
    .await?;
    eprintln!("== mail: Portico initial sync of {n} messages, {mb:.0} MB");
    let (initial, t_initial) = sync(port, job, "initial").await?;
    let (delta, t_delta) = sync(port, job, "delta").await?;
    let exact =
        initial["copied"] == json!(n) && initial["ratio"] == json!(1.0) && delta["copied"] == json!(0);
    eprintln!("== mail: doveadm backup over imapc");
    let d_initial = doveadm_backup(&src, &dst)?;
    let d_again = doveadm_backup(&src, &dst)?;
    let doveadm_count = dst.counts(DOVEADM_USER).values().sum::<usize>();
    let rate = |d: Duration| (n as f64 / d.as_secs_f64(), mb / d.as_secs_f64());
    let (p_mps, p_mbps) = rate(t_initial);
    let (d_mps, d_mbps) = rate(d_initial);
    let r = json!({
        "messages": n, "megabytes": mb,
        "portico": { "initial_secs": t_initial.as_secs_f64(), "messages_per_sec": p_mps, "mb_per_sec": p_mbps,
                     "delta_secs": t_delta.as_secs_f64(), "copied": initial["copied"], "delta_copied": delta["copied"], "ratio": initial["ratio"] },
        "doveadm_backup": { "initial_secs": d_initial.as_secs_f64(), "messages_per_sec": d_mps, "mb_per_sec": d_mbps,
                            "again_secs": d_again.as_secs_f64(), "messages": doveadm_count },
    });
    std::fs::write(out.join("mail.json"), serde_json::to_string_pretty(&r)?)?;
    let table = format!(
        "# Mail migration: Portico against `doveadm backup`\n\n`cargo run --release -p loadtest -- bench --scenarios mail{}`: \
         {n} messages ({mb:.0} MB; 1% of 2-10 MB, 9% of 0.1-1 MB, the rest 1-31 kB) in one INBOX of a Dovecot, copied to \
         another Dovecot on the same machine (loopback, plain IMAP) by the jobs service, and by Dovecot's own \
         `doveadm backup -R` over imapc into another user of the destination.\n\n\
         | | initial copy | messages/s | MB/s | again, nothing new |\n|---|---|---|---|---|\n\
         | Portico (`initial`, then `delta`) | {:.1} s | {p_mps:.0} | {p_mbps:.1} | {:.2} s |\n\
         | `doveadm backup` (imapc) | {:.1} s | {d_mps:.0} | {d_mbps:.1} | {:.2} s |\n\n\
         Portico copied {} messages (ratio {}), the delta {}; doveadm's copy holds {doveadm_count}.\n",
        if quick { " --quick" } else { "" },
        t_initial.as_secs_f64(),
        t_delta.as_secs_f64(),
        d_initial.as_secs_f64(),
        d_again.as_secs_f64(),
        initial["copied"],
        initial["ratio"],
        delta["copied"],
    );
    std::fs::write(out.join("mail.md"), &table)?;
    println!("\n{table}");
    Ok(exact)
}
