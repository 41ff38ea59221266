//! The in-process bus: publishing hands the message straight to every
//! shard's hub in this process (no queue, so nothing to overflow).

use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;

use super::{Bus, BusError};
use crate::hub::Hub;
use crate::protocol::{ConvId, Event, Message};

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

impl MemoryBus {
    fn hubs(&self) -> Vec<Arc<Hub>> {
        let hubs = self.hubs.read().expect("bus lock poisoned");
        hubs.iter().filter_map(Weak::upgrade).collect()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, msg: &Message) -> Result<(), BusError> {
        for hub in self.hubs() {
            hub.deliver(msg.clone());
        }
        Ok(())
    }

    async fn publish_event(&self, ev: &Event) -> Result<(), BusError> {
        for hub in self.hubs() {
            hub.deliver_event(ev);
        }
        Ok(())
    }

    async fn set_presence(&self, _conv: &ConvId, _user: &str, _online: bool) -> Result<(), BusError> {
        Ok(()) // every hub is in this process: `presence` asks them directly
    }

    async fn presence(&self, conv: &ConvId) -> Result<Vec<String>, BusError> {
        let mut users: Vec<String> = self.hubs().iter().flat_map(|h| h.local_users(conv)).collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    async fn hold(&self, _conv: &ConvId) -> Result<(), BusError> {
        Ok(())
    }

    async fn release(&self, _conv: &ConvId) -> Result<(), BusError> {
        Ok(())
    }
}
