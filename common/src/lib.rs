//! What every Portico service shares: logging, metrics, health endpoints,
//! shutdown, user tokens, private files and PostgreSQL plumbing.
//!
//! It exists so that the three services behave the same at their edges
//! (same log format, same `/metrics`, same signal handling, one token format)
//! without each growing its own copy. It holds no service logic.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod feeds;
pub mod files;
pub mod notify;
pub mod pg;
pub mod shutdown;
pub mod telemetry;
