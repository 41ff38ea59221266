//! Database URLs take libpq's `sslmode`/`sslrootcert` (every service
//! connects through `portico_common::pg`): against the harness's
//! PostgreSQL with a certificate, `verify-full` with the right root is
//! encrypted (the server says so), a wrong root or a plain server with
//! `require` is refused with a clear error, and the jobs service runs on a
//! verified TLS connection.

use portico_common::pg;
use portico_tests::servers::{Postgres, Service};
use portico_tests::{bins, free_port};

/// Whether the server sees this session as TLS.
async fn encrypted(url: &str) -> Result<bool, String> {
    let c = pg::connect(url).await.map_err(|e| e.to_string())?;
    let row = c
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_is_honoured_and_jobs_runs_over_verified_tls() {
    let pg = Postgres::start_tls();
    let root = pg.tls_root();
    let url = pg.url();
    let with = |q: String| format!("{url}?{q}");
    let full = with(format!("sslmode=verify-full&sslrootcert={}", root.display()));
    assert_eq!(
        encrypted(&full).await,
        Ok(true),
        "verify-full with the right root"
    );
    assert_eq!(
        encrypted(&with(format!("sslmode=verify-ca&sslrootcert={}", root.display()))).await,
        Ok(true)
    );
    assert_eq!(encrypted(&with("sslmode=require".into())).await, Ok(true));
    assert_eq!(encrypted(&with("sslmode=prefer".into())).await, Ok(true));
    assert_eq!(encrypted(&url).await, Ok(false), "no sslmode: plain (disable)");

    // Another root: refused, and the error says why.
    let other = tempfile::tempdir().unwrap();
    portico_tests::servers::test_ca(other.path(), "stranger");
    let e = encrypted(&with(format!(
        "sslmode=verify-full&sslrootcert={}",
        other.path().join("root.pem").display()
    )))
    .await
    .unwrap_err();
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    let e = encrypted(&with("sslmode=verify-full&sslrootcert=/nonexistent.pem".into()))
        .await
        .unwrap_err();
    assert!(e.contains("sslrootcert /nonexistent.pem"), "{e}");
    let e = encrypted(&with("sslmode=sometimes".into())).await.unwrap_err();
    assert!(e.contains("sslmode `sometimes`"), "{e}");

    // A server without TLS: `require` refuses, `prefer` goes plain.
    let plain = Postgres::start();
    let e = encrypted(&format!("{}?sslmode=require", plain.url()))
        .await
        .unwrap_err();
    assert!(
        e.to_lowercase().contains("tls") || e.to_lowercase().contains("ssl"),
        "{e}"
    );
    assert_eq!(
        encrypted(&format!("{}?sslmode=prefer", plain.url())).await,
        Ok(false)
    );

    // The jobs service on verify-full: ready, and it works.
    let port = free_port();
    let jobs = Service::start(
        &bins::jobs(),
        &[],
        &[
            ("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{port}")),
            ("PORTICO_JOBS__POSTGRES_URL", full.clone()),
        ],
        port,
    );
    assert_eq!(
        portico_tests::servers::http_status(port, "/readyz"),
        Some(200),
        "{}",
        jobs.proc.log()
    );
    let c = pg::connect(&full).await.unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.application_name <> 'x' AND a.backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        n >= 2,
        "the jobs service's connections are TLS too ({n} TLS sessions)"
    );
    // A bad sslmode stops jobs at start, naming the key.
    let out = std::process::Command::new(bins::jobs())
        .env_remove("PORTICO_CONFIG")
        .env("PORTICO_AUTH__JWT_SECRET", portico_tests::TEST_SECRET)
        .env("PORTICO_JOBS__LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("PORTICO_JOBS__POSTGRES_URL", format!("{url}?sslmode=sometimes"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("jobs.postgres_url") && err.contains("sslmode `sometimes`"),
        "{err}"
    );
}
