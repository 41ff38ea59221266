//! Customers: the shops this service backs up and upgrades. A customer's
//! root is `customers_root/<domain>`; its database URL is a secret (never
//! serialized, never logged).

use serde::Serialize;
use tokio_postgres::error::SqlState;

use crate::queue::db::{Db, DbError, unavailable};

/// A registered customer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Customer {
    pub id: String,
    pub domain: String,
    pub root: String,
    /// The customer database (a secret: never serialized).
    #[serde(skip)]
    pub db_url: Option<String>,
    pub has_database: bool,
    pub process_manager: String,
}

fn customer_from(r: &tokio_postgres::Row) -> Customer {
    let db_url: Option<String> = r.get(3);
    Customer {
        id: r.get(0),
        domain: r.get(1),
        root: r.get(2),
        has_database: db_url.is_some(),
        db_url,
        process_manager: r.get(4),
    }
}

impl Db {
    pub async fn add_customer(&self, c: &Customer) -> Result<(), DbError> {
        let r = self
            .client()
            .await?
            .execute(
                "INSERT INTO customers (id, domain, root, db_url, process_manager) VALUES ($1, $2, $3, $4, $5)",
                &[&c.id, &c.domain, &c.root, &c.db_url, &c.process_manager],
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(DbError::Exists(format!(
                "customer {} or domain {}",
                c.id, c.domain
            ))),
            Err(e) => Err(unavailable(e)),
        }
    }

    pub async fn customer(&self, id: &str) -> Result<Option<Customer>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, domain, root, db_url, process_manager FROM customers WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(customer_from))
    }

    pub async fn customers(&self) -> Result<Vec<Customer>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, domain, root, db_url, process_manager FROM customers ORDER BY id",
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(customer_from).collect())
    }
}
