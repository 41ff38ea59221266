//! The in-process bus: publishing hands the message straight to every
//! shard's hub in this process (no queue, so nothing to overflow).

use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;

use super::{Bus, BusError};
use crate::hub::Hub;
use crate::protocol::{ConvId, Message};

/// Shared by all shards of one process.
#[derive(Default)]
pub struct MemoryBus {
    hubs: RwLock<Vec<Weak<Hub>>>,
}

impl MemoryBus {
    /// Adds a shard's hub as a receiver.
    pub fn attach(&self, hub: &Arc<Hub>) {
        let mut hubs = self.hubs.write().expect("bus lock poisoned");
        hubs.retain(|h| h.strong_count() > 0);
        hubs.push(Arc::downgrade(hub));
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, msg: &Message) -> Result<(), BusError> {
        let hubs: Vec<Arc<Hub>> = {
            let hubs = self.hubs.read().expect("bus lock poisoned");
            hubs.iter().filter_map(Weak::upgrade).collect()
        };
        for hub in hubs {
            hub.deliver(msg.clone());
        }
        Ok(())
    }

    async fn hold(&self, _conv: &ConvId) -> Result<(), BusError> {
        Ok(())
    }

    async fn release(&self, _conv: &ConvId) -> Result<(), BusError> {
        Ok(())
    }
}
