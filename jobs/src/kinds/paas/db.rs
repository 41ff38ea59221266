//! The `apps` table: each hosted app's source and the container that
//! serves it now.

use serde::Serialize;
use tokio_postgres::error::SqlState;

use crate::queue::db::{Claimed, Db, DbError, unavailable};

/// A hosted app: its source and what serves it now.
#[derive(Debug, Clone, Serialize)]
pub struct App {
    pub name: String,
    pub repo: String,
    pub git_ref: Option<String>,
    /// The container port (none: the generated image's, or the one the
    /// image exposes).
    pub port: Option<i32>,
    pub health_path: String,
    /// `running` or `stopped` (by the API).
    pub desired: String,
    /// The detected type of the deployed code.
    pub kind: Option<String>,
    pub container: Option<String>,
    pub image: Option<String>,
    /// Where Docker publishes the container on 127.0.0.1 (private).
    pub host_port: Option<i32>,
    pub deployed_at: Option<String>,
    pub created_by: String,
    pub created_at: String,
}

const APP_COLUMNS: &str = "name, repo, git_ref, port, health_path, desired, kind, container, image, host_port, \
     to_char(deployed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), created_by, \
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

fn app_from(r: &tokio_postgres::Row) -> App {
    App {
        name: r.get(0),
        repo: r.get(1),
        git_ref: r.get(2),
        port: r.get(3),
        health_path: r.get(4),
        desired: r.get(5),
        kind: r.get(6),
        container: r.get(7),
        image: r.get(8),
        host_port: r.get(9),
        deployed_at: r.get(10),
        created_by: r.get(11),
        created_at: r.get(12),
    }
}

impl Db {
    /// Registers an app unless `max` apps exist already (`Exists` for a
    /// taken name, `Unavailable` naming the cap when full).
    pub async fn add_app(&self, a: &App, max: usize) -> Result<(), DbError> {
        let r = self
            .client()
            .await?
            .execute(
                "INSERT INTO apps (name, repo, git_ref, port, health_path, created_by)
                 SELECT $1, $2, $3, $4, $5, $6 WHERE (SELECT count(*) FROM apps) < $7",
                &[
                    &a.name,
                    &a.repo,
                    &a.git_ref,
                    &a.port,
                    &a.health_path,
                    &a.created_by,
                    &(max as i64),
                ],
            )
            .await;
        match r {
            Ok(1) => Ok(()),
            Ok(_) => Err(DbError::Full(format!("{max} apps exist already (paas.max_apps)"))),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(DbError::Exists(format!("app {}", a.name)))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    pub async fn app(&self, name: &str) -> Result<Option<App>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {APP_COLUMNS} FROM apps WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(app_from))
    }

    pub async fn apps(&self) -> Result<Vec<App>, DbError> {
        let rows = self
            .client()
            .await?
            .query(&format!("SELECT {APP_COLUMNS} FROM apps ORDER BY name"), &[])
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(app_from).collect())
    }

    /// Points the app at a new container, if `t` still holds its lease
    /// (a deploy whose attempt was taken over switches nothing). Returns
    /// the previous container and image, or `None` when fenced off.
    pub async fn switch_app(
        &self,
        t: &Claimed,
        name: &str,
        kind: &str,
        container: &str,
        image: &str,
        host_port: u16,
    ) -> Result<Option<(Option<String>, Option<String>)>, DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let Some(old) = tx
            .query_opt(
                "SELECT container, image FROM apps WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let n = tx
            .execute(
                "UPDATE apps SET kind = $2, container = $3, image = $4, host_port = $5,
                        desired = 'running', deployed_at = now()
                 WHERE name = $1 AND EXISTS (SELECT 1 FROM tasks WHERE id = $6 AND attempt = $7 AND state = 'running')",
                &[&name, &kind, &container, &image, &i32::from(host_port), &t.id, &t.attempt],
            )
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok((n == 1).then(|| (old.get(0), old.get(1))))
    }

    /// Records where Docker publishes the app's container now (it may pick
    /// another port after a restart); `None` when it publishes none.
    pub async fn set_app_port(
        &self,
        name: &str,
        container: &str,
        host_port: Option<u16>,
    ) -> Result<bool, DbError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE apps SET host_port = $3 WHERE name = $1 AND container = $2 AND host_port IS DISTINCT FROM $3",
                &[&name, &container, &host_port.map(i32::from)],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    pub async fn set_app_desired(&self, name: &str, desired: &str) -> Result<(), DbError> {
        self.client()
            .await?
            .execute("UPDATE apps SET desired = $2 WHERE name = $1", &[&name, &desired])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn delete_app(&self, name: &str) -> Result<bool, DbError> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM apps WHERE name = $1", &[&name])
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }
}
