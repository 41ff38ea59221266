//! The Redis bus (fred): each published message goes to the channel
//! `portico:conv:{<id>}`; a shard subscribes only to the channels of
//! conversations its clients hold.
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
use fred::interfaces::{KeysInterface, SortedSetsInterface};
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

pub struct RedisBus {
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
    pub async fn connect(url: &str, hub: &Arc<Hub>) -> Result<Arc<Self>, BusError> {
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
            publisher,
            subscriber,
            hub: Arc::downgrade(hub),
            subscriptions: Mutex::new(()),
            tasks: std::sync::Mutex::new(JoinSet::new()),
        });
        bus.clone().spawn_receiver();
        bus.clone().spawn_presence_refresh();
        bus.clone().spawn_reconnect_watch();
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
        let payload = serde_json::to_vec(&BusFrame::Message(msg.clone())).expect("messages serialize");
        let _: i64 = self
            .publisher
            .publish(channel(&msg.conv), payload)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn publish_event(&self, ev: &Event) -> Result<(), BusError> {
        let payload = serde_json::to_vec(&BusFrame::Event(ev.clone())).expect("events serialize");
        let _: i64 = self
            .publisher
            .publish(channel(&ev.conv), payload)
            .await
            .map_err(err)?;
        Ok(())
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
        self.subscriber.subscribe(channel(conv)).await.map_err(err)
    }

    async fn release(&self, conv: &ConvId) -> Result<(), BusError> {
        let _one_at_a_time = self.subscriptions.lock().await;
        if self.hub.upgrade().is_some_and(|h| h.holds(conv)) {
            return Ok(()); // held again meanwhile
        }
        self.subscriber.unsubscribe(channel(conv)).await.map_err(err)
    }

    async fn ready(&self) -> Result<(), BusError> {
        let _: String = self.publisher.ping(None).await.map_err(err)?;
        Ok(())
    }
}
