//! Customers: the shops whose backups, restores and upgrades run on the
//! queue. [`db`] holds the table, [`api`] the routes (create, list, show,
//! and the customer's tasks).

pub mod api;
pub mod db;

pub use db::Customer;

/// What may run a customer's shop (`kinds::upgrade::pm` drives each).
pub const PROCESS_MANAGERS: [&str; 4] = ["supervisor", "systemd", "pm2", "command"];

use crate::queue::{Claimed, Db, Failure};

/// The customer a task is for; a fatal failure when it is gone.
pub async fn of_task(db: &Db, t: &Claimed) -> Result<Customer, Failure> {
    let id = t.customer_id.as_deref().unwrap_or("?");
    match db.customer(id).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(Failure::fatal(format!("customer {id} is not registered"))),
        Err(e) => Err(Failure::retry(e.to_string())),
    }
}
