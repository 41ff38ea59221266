//! The bus carries published messages to every shard that holds a
//! subscriber of their conversation.
//!
//! Delivery is at-least-once and may reorder across publishers; the
//! receiving [`Hub`](crate::hub::Hub) restores offset order, drops
//! duplicates and fills gaps from the store. Engines: [`memory`] (shards in
//! one process) and [`redis`] (pub/sub between processes).

pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::protocol::{ConvId, Event, Message};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends a stored message to every shard holding its conversation.
    async fn publish(&self, msg: &Message) -> Result<(), BusError>;
    /// Sends an ephemeral event to every shard holding its conversation.
    async fn publish_event(&self, ev: &Event) -> Result<(), BusError>;
    /// Records whether `user` has a connection on this shard in `conv`.
    async fn set_presence(&self, conv: &ConvId, user: &str, online: bool) -> Result<(), BusError>;
    /// Users with a connection in `conv` on any shard, sorted.
    async fn presence(&self, conv: &ConvId) -> Result<Vec<String>, BusError>;
    /// This shard now has subscribers in `conv`.
    async fn hold(&self, conv: &ConvId) -> Result<(), BusError>;
    /// This shard has no subscribers left in `conv`.
    async fn release(&self, conv: &ConvId) -> Result<(), BusError>;
    /// Whether the bus is usable now (for `/readyz`).
    async fn ready(&self) -> Result<(), BusError> {
        Ok(())
    }
}
