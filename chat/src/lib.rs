//! Portico chat: one shard of the sharded realtime chat server.
//!
//! Code map: [`protocol`] (frames and codes) → [`http`] (handshake, REST) →
//! [`conn`] (one WebSocket) → [`hub`] (registry, ordered fan-out) →
//! [`bus`] (between shards) and [`store`] (history, offsets).
//! [`server`] wires them and drains on shutdown.

pub mod bus;
pub mod conn;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod socket;
pub mod store;

pub use server::{Bound, Engines, bind};
