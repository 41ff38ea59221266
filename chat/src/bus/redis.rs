//! The Redis bus (fred): each published message goes to the channel
//! `portico:conv:{<id>}`; a shard subscribes only to the channels of
//! conversations its clients hold. On one Redis server it uses classic
//! pub/sub; on a Redis Cluster ([`Sharding::Cluster`]) sharded pub/sub
//! (`SPUBLISH`/`SSUBSCRIBE`): a message travels only through the node
//! that owns its conversation's slot (classic pub/sub would broadcast it to
//! every node), and the presence key is in the same slot.
//!
//! Redis pub/sub is fire-and-forget: whatever is published while a shard is
//! disconnected never reaches it. So after every reconnect the shard
//! resubscribes and then asks its hub to catch up from the store
//! ([`Hub::catch_up`]); the same happens if the shard falls behind its own
//! receive buffer. The braces in the channel name are a Redis Cluster hash
//! tag, ready for sharded pub/sub (`SSUBSCRIBE`) where one subscription must
//! stay within one hash slot.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClusterInterface, KeysInterface, SortedSetsInterface};
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy, TcpConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;

use super::{Bus, BusError};
use crate::hub::Hub;
use crate::protocol::{ConvId, Event, Message};

/// Messages a shard may fall behind on its subscription before it catches
/// up from the store instead.
const RECEIVE_BUFFER: usize = 16 * 1024;
/// A publish waits at most this long for Redis (e.g. while it reconnects).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a shard on a cluster reloads the slot map (a move of a slot
/// to another live node is seen no later than this).
const TOPOLOGY_POLL: Duration = Duration::from_secs(2);

/// Which node owns each slot range, as the client's routing table says.
fn slot_owners(client: &Client) -> Option<Vec<(u16, u16, String)>> {
    client.cached_cluster_state().map(|state| {
        state
            .slots()
            .iter()
            .map(|r| (r.start, r.end, r.primary.to_string()))
            .collect()
    })
}

/// Presence entries live this long unless refreshed (a crashed shard's
/// users drop out after it).
const PRESENCE_TTL_SECS: u64 = 60;

fn channel(conv: &ConvId) -> String {
    format!("portico:conv:{{{conv}}}")
}

fn presence_key(conv: &ConvId) -> String {
    format!("portico:presence:{{{conv}}}")
}

/// What travels on a conversation's channel.
#[derive(Serialize, Deserialize)]
#[serde(tag = "k", content = "v", rename_all = "snake_case")]
enum BusFrame {
    Message(Message),
    Event(Event),
}

fn err(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// Which pub/sub the bus speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// One Redis server: `PUBLISH`/`SUBSCRIBE`.
    Off,
    /// A Redis Cluster: `SPUBLISH`/`SSUBSCRIBE`, routed by slot.
    Cluster,
}

pub struct RedisBus {
    sharding: Sharding,
    publisher: Client,
    subscriber: SubscriberClient,
    hub: Weak<Hub>,
    /// The receive, presence and reconnect tasks: they hold the bus and
    /// the hub only weakly, and end (aborted) when the bus is dropped.
    tasks: std::sync::Mutex<JoinSet<()>>,
    /// Serializes subscribe/unsubscribe so a late release cannot undo a
    /// newer hold of the same conversation.
    subscriptions: Mutex<()>,
}

impl RedisBus {
    /// Connects both clients (Redis must answer now; later outages are
    /// survived by reconnecting with backoff) and starts the receive task.
    pub async fn connect(url: &str, sharding: Sharding, hub: &Arc<Hub>) -> Result<Arc<Self>, BusError> {
        let config = Config::from_url(url).map_err(|e| err(format!("chat.redis_url: {e}")))?;
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(3);
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..TcpConfig::default()
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
                p.broadcast_channel_capacity = RECEIVE_BUFFER;
            });
        let publisher = builder.build().map_err(err)?;
        let subscriber = builder.build_subscriber_client().map_err(err)?;
        publisher.init().await.map_err(err)?;
        subscriber.init().await.map_err(err)?;
        let bus = Arc::new(RedisBus {
            sharding,
            publisher,
            subscriber,
            hub: Arc::downgrade(hub),
            subscriptions: Mutex::new(()),
            tasks: std::sync::Mutex::new(JoinSet::new()),
        });
        bus.clone().spawn_receiver();
        bus.clone().spawn_presence_refresh();
        bus.clone().spawn_reconnect_watch();
        if sharding == Sharding::Cluster {
            bus.clone().spawn_topology_watch();
        }
        Ok(bus)
    }

    /// Runs a background task owned by the bus.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.lock().expect("bus tasks lock").spawn(task);
    }

    /// Feeds every received message to the hub, in arrival order.
    fn spawn_receiver(self: Arc<Self>) {
        let mut rx = self.subscriber.message_rx();
        let hub = self.hub.clone();
        self.spawn(async move {
            loop {
                // The hub is held only while a message is handled, never
                // across the wait: hub and bus must be free to go.
                let received = rx.recv().await;
                let Some(hub) = hub.upgrade() else { return };
                match received {
                    Ok(msg) => match msg.value.as_bytes().map(serde_json::from_slice::<BusFrame>) {
                        Some(Ok(BusFrame::Message(m))) => hub.deliver(m),
                        Some(Ok(BusFrame::Event(e))) => hub.deliver_event(&e),
                        _ => tracing::warn!(channel = %msg.channel, "ignoring a malformed bus message"),
                    },
                    Err(RecvError::Lagged(n)) => {
                        metrics::counter!("portico_chat_bus_lagged_total").increment(n);
                        tracing::warn!(
                            skipped = n,
                            "bus receiver fell behind; catching up from the store"
                        );
                        hub.catch_up().await;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    /// Keeps this shard's presence entries alive while its users stay.
    fn spawn_presence_refresh(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        self.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(PRESENCE_TTL_SECS / 3));
            loop {
                tick.tick().await;
                let Some(bus) = weak.upgrade() else { return };
                let Some(hub) = bus.hub.upgrade() else { return };
                for (conv, users) in hub.local_presence() {
                    for user in users {
                        if let Err(e) = bus.set_presence(&conv, &user, true).await {
                            tracing::debug!(error = %e, "presence refresh failed");
                        }
                    }
                }
            }
        });
    }

    fn presence_member(&self, user: &str) -> String {
        let shard = self.hub.upgrade().map_or(0, |h| h.shard());
        format!("{user}\u{0}{shard}")
    }

    /// On a cluster, a failover or resharding moves slots to other nodes,
    /// and Redis ends the shard-channel subscriptions of a moved slot
    /// without telling the client library. So the shard watches the slot
    /// map itself: it reloads it every [`TOPOLOGY_POLL`] and whenever
    /// either client reports a change (a `MOVED` reply, a node lost), and
    /// when the owner of any slot changed, subscribes again to every held
    /// conversation (from the hub's list, not the client's, which a
    /// server-side unsubscribe may have emptied) and catches up from the
    /// store.
    fn spawn_topology_watch(self: Arc<Self>) {
        let mut sub_rx = self.subscriber.cluster_change_rx();
        let mut pub_rx = self.publisher.cluster_change_rx();
        let weak = Arc::downgrade(&self);
        self.spawn(async move {
            let mut tick = tokio::time::interval(TOPOLOGY_POLL);
            let mut known = None;
            loop {
                let polled = tokio::select! {
                    _ = tick.tick() => true,
                    r = sub_rx.recv() => {
                        if matches!(r, Err(RecvError::Closed)) { return; }
                        false
                    }
                    r = pub_rx.recv() => {
                        if matches!(r, Err(RecvError::Closed)) { return; }
                        false
                    }
                };
                let Some(bus) = weak.upgrade() else { return };
                if polled {
                    // The subscriber routes SSUBSCRIBE by its own map.
                    let _ = bus.publisher.sync_cluster().await;
                    let _ = bus.subscriber.sync_cluster().await;
                }
                let now = slot_owners(&bus.publisher);
                if known.is_some() && now.is_some() && known != now {
                    metrics::counter!("portico_chat_bus_topology_changes_total").increment(1);
                    tracing::info!("redis cluster slots moved; subscribing again");
                    if !polled {
                        let _ = bus.subscriber.sync_cluster().await;
                    }
                    bus.resubscribe_held().await;
                }
                if now.is_some() {
                    known = now;
                }
            }
        });
    }

    /// Subscribes again to every conversation the hub holds, then catches
    /// up from the store.
    async fn resubscribe_held(&self) {
        let Some(hub) = self.hub.upgrade() else { return };
        {
            let _one_at_a_time = self.subscriptions.lock().await;
            for conv in hub.held() {
                if let Err(e) = self.subscribe(&conv).await {
                    tracing::warn!(error = %e, %conv, "subscribing again failed");
                }
            }
        }
        hub.catch_up().await;
    }

    /// Subscribes to a conversation's channel, classic or sharded (the
    /// caller holds `subscriptions`).
    async fn subscribe(&self, conv: &ConvId) -> Result<(), BusError> {
        match self.sharding {
            Sharding::Off => self.subscriber.subscribe(channel(conv)).await,
            Sharding::Cluster => self.subscriber.ssubscribe(channel(conv)).await,
        }
        .map_err(err)
    }

    /// Publishes a frame on a conversation's channel.
    async fn send(&self, conv: &ConvId, frame: &BusFrame) -> Result<(), BusError> {
        let payload = serde_json::to_vec(frame).expect("bus frames serialize");
        let _: i64 = match self.sharding {
            Sharding::Off => self.publisher.publish(channel(conv), payload).await,
            Sharding::Cluster => self.publisher.spublish(channel(conv), payload).await,
        }
        .map_err(err)?;
        Ok(())
    }

    /// After a reconnect: resubscribe, then fetch what was missed.
    fn spawn_reconnect_watch(self: Arc<Self>) {
        let mut rx = self.subscriber.reconnect_rx();
        let weak = Arc::downgrade(&self);
        self.spawn(async move {
            while rx.recv().await.is_ok() {
                let Some(bus) = weak.upgrade() else { return };
                metrics::counter!("portico_chat_bus_reconnects_total").increment(1);
                tracing::info!("redis reconnected; resubscribing");
                if let Err(e) = bus.subscriber.resubscribe_all().await {
                    tracing::warn!(error = %e, "resubscribe failed");
                }
                if let Some(hub) = bus.hub.upgrade() {
                    hub.catch_up().await;
                }
            }
        });
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(&self, msg: &Message) -> Result<(), BusError> {
        self.send(&msg.conv, &BusFrame::Message(msg.clone())).await
    }

    async fn publish_event(&self, ev: &Event) -> Result<(), BusError> {
        self.send(&ev.conv, &BusFrame::Event(ev.clone())).await
    }

    async fn set_presence(&self, conv: &ConvId, user: &str, online: bool) -> Result<(), BusError> {
        let key = presence_key(conv);
        let member = self.presence_member(user);
        if online {
            let until = (portico_common::auth::now_secs() + PRESENCE_TTL_SECS) as f64;
            let _: i64 = self
                .publisher
                .zadd(&key, None, None, false, false, (until, member))
                .await
                .map_err(err)?;
            let _: i64 = self
                .publisher
                .expire(&key, 2 * PRESENCE_TTL_SECS as i64, None)
                .await
                .map_err(err)?;
        } else {
            let _: i64 = self.publisher.zrem(&key, member).await.map_err(err)?;
        }
        Ok(())
    }

    async fn presence(&self, conv: &ConvId) -> Result<Vec<String>, BusError> {
        let now = portico_common::auth::now_secs() as f64;
        let members: Vec<String> = self
            .publisher
            .zrangebyscore(presence_key(conv), now, "+inf", false, None)
            .await
            .map_err(err)?;
        let mut users: Vec<String> = members
            .into_iter()
            .filter_map(|m| m.split('\u{0}').next().map(str::to_string))
            .collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    async fn hold(&self, conv: &ConvId) -> Result<(), BusError> {
        let _one_at_a_time = self.subscriptions.lock().await;
        self.subscribe(conv).await
    }

    async fn release(&self, conv: &ConvId) -> Result<(), BusError> {
        let _one_at_a_time = self.subscriptions.lock().await;
        if self.hub.upgrade().is_some_and(|h| h.holds(conv)) {
            return Ok(()); // held again meanwhile
        }
        match self.sharding {
            Sharding::Off => self.subscriber.unsubscribe(channel(conv)).await,
            Sharding::Cluster => self.subscriber.sunsubscribe(channel(conv)).await,
        }
        .map_err(err)
    }

    async fn ready(&self) -> Result<(), BusError> {
        let _: String = self.publisher.ping(None).await.map_err(err)?;
        Ok(())
    }
}
