//! The upgrade kinds' tables: `shop_sites` (which release serves each
//! customer now, on which instances and ports, and the one before: what a
//! rollback goes back to) and `upgrade_approvals` (`.env` changes approved
//! for a waiting task).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::queue::db::{Claimed, Db, DbError, Schema, unavailable};

pub static SCHEMA: Schema = Schema {
    version_table: "jobs_upgrade_schema",
    migrations: &[r#"
CREATE TABLE shop_sites (
    customer_id        text PRIMARY KEY REFERENCES customers(id) ON DELETE CASCADE,
    version            text NOT NULL,
    instances          jsonb NOT NULL,
    previous_version   text,
    previous_instances jsonb,
    task_id            bigint NOT NULL,
    switched_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE upgrade_approvals (
    task_id     bigint PRIMARY KEY,
    approved_by text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
"#],
};

/// One running instance of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub port: u16,
}

/// Instances by service (backend, admin, store).
pub type Instances = std::collections::BTreeMap<String, Instance>;

/// What serves a customer's shop.
#[derive(Debug, Clone, Serialize)]
pub struct Site {
    pub customer: String,
    pub domain: String,
    pub version: String,
    pub instances: Instances,
    pub previous_version: Option<String>,
    pub previous_instances: Option<Instances>,
    /// The task that made the last switch.
    pub task: i64,
}

fn instances(v: Option<Value>) -> Option<Instances> {
    v.and_then(|v| serde_json::from_value(v).ok())
}

const SITE_COLUMNS: &str =
    "s.customer_id, c.domain, s.version, s.instances, s.previous_version, s.previous_instances, s.task_id";

fn site_from(r: &tokio_postgres::Row) -> Site {
    Site {
        customer: r.get(0),
        domain: r.get(1),
        version: r.get(2),
        instances: instances(Some(r.get(3))).unwrap_or_default(),
        previous_version: r.get(4),
        previous_instances: instances(r.get(5)),
        task: r.get(6),
    }
}

impl Db {
    pub async fn site(&self, customer: &str) -> Result<Option<Site>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {SITE_COLUMNS} FROM shop_sites s JOIN customers c ON c.id = s.customer_id WHERE s.customer_id = $1"
                ),
                &[&customer],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(site_from))
    }

    /// Every served shop (the gateway's route table).
    pub async fn sites(&self) -> Result<Vec<Site>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {SITE_COLUMNS} FROM shop_sites s JOIN customers c ON c.id = s.customer_id ORDER BY 1"),
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(site_from).collect())
    }

    /// Sends the customer's traffic to `instances` of `version`, keeping
    /// what served before as the previous release — if `t` still holds its
    /// lease. `to_previous`: a switch back after a failed check (the failed
    /// release is not kept as previous). `None`: fenced off.
    pub async fn switch_site(
        &self,
        t: &Claimed,
        customer: &str,
        version: &str,
        instances: &Instances,
        to_previous: bool,
    ) -> Result<Option<()>, DbError> {
        let inst = serde_json::to_value(instances).unwrap_or_default();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let owned = tx
            .query_opt(
                "SELECT 1 FROM tasks WHERE id = $1 AND attempt = $2 AND state = 'running' FOR UPDATE",
                &[&t.id, &t.attempt],
            )
            .await
            .map_err(unavailable)?
            .is_some();
        if !owned {
            return Ok(None);
        }
        let sql = if to_previous {
            "UPDATE shop_sites SET version = $2, instances = $3, previous_version = NULL,
                    previous_instances = NULL, task_id = $4, switched_at = now()
             WHERE customer_id = $1"
        } else {
            "INSERT INTO shop_sites (customer_id, version, instances, task_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT (customer_id) DO UPDATE SET
                previous_version = CASE WHEN shop_sites.task_id = $4 THEN shop_sites.previous_version ELSE shop_sites.version END,
                previous_instances = CASE WHEN shop_sites.task_id = $4 THEN shop_sites.previous_instances ELSE shop_sites.instances END,
                version = $2, instances = $3, task_id = $4, switched_at = now()"
        };
        tx.execute(sql, &[&customer, &version, &inst, &t.id])
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(()))
    }

    pub async fn approve(&self, task: i64, by: &str) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO upgrade_approvals (task_id, approved_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&task, &by],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn approved(&self, task: i64) -> Result<bool, DbError> {
        Ok(self
            .client()
            .await?
            .query_opt("SELECT 1 FROM upgrade_approvals WHERE task_id = $1", &[&task])
            .await
            .map_err(unavailable)?
            .is_some())
    }
}
