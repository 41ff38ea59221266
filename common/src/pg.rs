//! PostgreSQL plumbing for the services that keep state there (the chat
//! store, jobs): a bounded connection pool, and schema migrations applied
//! once each, in order, under an advisory lock so that several processes
//! starting together do not race. Queries stay with their service.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL does not parse (the caller names the config key).
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> PgError {
    PgError::Unavailable(e.to_string())
}

/// A pool of at most `size` connections to `url`; waiting for, creating
/// and recycling a connection each give up after `timeout`. Nothing is
/// connected yet: the server need not be up.
pub fn pool(url: &str, size: usize, timeout: Duration) -> Result<Pool, PgError> {
    let cfg: tokio_postgres::Config = url.parse().map_err(|e| PgError::Url(format!("{e}")))?;
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(unavailable)
}

/// Applies the `migrations` not yet recorded in `version_table`, in one
/// transaction holding advisory lock `lock`.
pub async fn migrate(
    pool: &Pool,
    version_table: &str,
    lock: i64,
    migrations: &[&str],
) -> Result<(), PgError> {
    let mut client = pool.get().await.map_err(unavailable)?;
    let tx = client.transaction().await.map_err(unavailable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .map_err(unavailable)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {version_table} (version int NOT NULL)"
    ))
    .await
    .map_err(unavailable)?;
    let done: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {version_table}"), &[])
        .await
        .map_err(unavailable)?
        .get(0);
    for (i, sql) in migrations.iter().enumerate().skip(done as usize) {
        tx.batch_execute(sql).await.map_err(unavailable)?;
        tx.execute(
            &format!("INSERT INTO {version_table} VALUES ($1)"),
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(unavailable)?;
        tracing::info!(schema = version_table, version = i + 1, "schema migrated");
    }
    tx.commit().await.map_err(unavailable)
}
