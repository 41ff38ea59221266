//! Portico chat: one shard of the sharded realtime chat server.
//!
//! Code map: [`server`] (binds, wires, drains) → [`http`] (handshake, REST)
//! → [`conn`] (one WebSocket) → [`shard`] (shared state, the one publish
//! path) → [`hub`] (registry, ordered fan-out) → [`bus`] (between shards)
//! and [`store`] (history, offsets); [`socket`] is the TCP under it all,
//! [`protocol`] the frames and codes.

pub mod bus;
pub mod conn;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod socket;
pub mod store;

pub use server::{Bound, Engines, bind};
