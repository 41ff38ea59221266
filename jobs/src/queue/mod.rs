//! The queue core: the database ([`db`]: pool, core schema, claim, lease,
//! fencing, retries, cancel, prune, audit) and the workers ([`worker`]:
//! claim loop, heartbeat, reaper) that run tasks through their [`Kind`],
//! reporting through [`progress`] (snapshots and the ops-conversation
//! events).
//! Nothing here knows a task kind; kinds live in [`crate::kinds`].

pub mod db;
pub mod progress;
pub mod worker;

pub use db::{Claimed, Db, DbError, Outcome, Schema, Subject, TaskRecord};
pub use worker::{Failure, Kind, Workers, every};
