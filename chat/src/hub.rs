//! The shard's registry: who is subscribed to what, and the fan-out of
//! messages to them in offset order, exactly once per subscriber.
//!
//! Per conversation held on this shard, [`Hub`] keeps the next offset it
//! expects; messages from the bus that arrive early wait in a bounded
//! reorder buffer, duplicates are dropped, and a gap that does not close by
//! itself within [`GAP_WAIT`] is filled from the store. Each subscriber has
//! a cursor (the last offset it was sent), which makes the hand-over from
//! history (resume) to live messages seamless.
//!
//! All state sits in a `DashMap` and is touched only in short synchronous
//! sections: no lock is held across an `.await`. Sending to a connection is
//! `try_send` on its bounded queue; a full queue closes the connection as a
//! slow consumer instead of buffering without end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::protocol::{ConvId, ErrorCode, Event, EventKind, Message, ServerFrame, close};
use crate::store::{Page, Store};

/// Most messages replayed by one resume; beyond it the client pages history.
pub const MAX_RESUME: u64 = 1000;
/// How long an out-of-order message waits for the gap before it is filled
/// from the store.
pub const GAP_WAIT: Duration = Duration::from_millis(250);
/// Messages held per conversation while waiting for a gap.
const MAX_PENDING: usize = 4096;

pub type ConnId = u64;

/// One item of a connection's outbound queue.
///
/// Kept to two words: Tokio's channel allocates its slots 32 at a time, the
/// first 32 when the channel is made, so every connection, idle or not,
/// holds 32 of these (0.5 KiB; 1.3 KiB with a `Utf8Bytes` inline).
#[derive(Debug)]
pub enum Out {
    /// One frame; the recipients of a fan-out share it.
    Frame(Arc<Utf8Bytes>),
    /// Several frames that count as one queue slot (a resume replay).
    Batch(Box<Vec<Utf8Bytes>>),
    /// The connection's heartbeat (a WebSocket ping).
    Ping,
}

/// Lets the hub close a connection (slow consumer) and the connection say why.
#[derive(Debug, Default)]
pub struct ConnCtl {
    reason: OnceLock<(u16, &'static str)>,
    token: CancellationToken,
    /// The writer took items off the queue: room may be free again.
    drained: tokio::sync::Notify,
}

impl ConnCtl {
    pub fn new(token: CancellationToken) -> Self {
        ConnCtl {
            reason: OnceLock::new(),
            token,
            drained: tokio::sync::Notify::new(),
        }
    }
    pub fn drained(&self) -> &tokio::sync::Notify {
        &self.drained
    }
    /// Asks the connection to close with `code`; the first reason wins.
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set((code, reason));
        self.token.cancel();
    }
    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.get().copied()
    }
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// What a connection gives the hub so it can be sent frames.
#[derive(Debug, Clone)]
pub struct Outlet {
    pub id: ConnId,
    /// The connection's user.
    pub user: Arc<str>,
    pub tx: mpsc::Sender<Out>,
    pub ctl: Arc<ConnCtl>,
}

impl Outlet {
    /// Queues one item; a full queue closes the connection as slow.
    pub fn send(&self, item: Out) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.ctl.reason().is_none() {
                    metrics::counter!("portico_chat_slow_consumers_total").increment(1);
                }
                self.ctl.close(close::SLOW_CONSUMER, "slow consumer");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

struct Sub {
    outlet: Outlet,
    /// Last offset this subscriber was sent (or chose to skip).
    cursor: u64,
    /// While the subscription is syncing: live messages seen meanwhile.
    syncing: Option<Vec<(u64, Utf8Bytes)>>,
}

#[derive(Default)]
struct ConvState {
    /// Next offset to fan out; `None` until the first subscriber synced.
    next: Option<u64>,
    pending: BTreeMap<u64, Message>,
    subs: HashMap<ConnId, Sub>,
    /// Synced subscriptions per user on this shard (presence).
    users: HashMap<Arc<str>, u32>,
    fill_scheduled: bool,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub ErrorCode);

/// The registry of one shard.
pub struct Hub {
    shard: u16,
    store: Arc<dyn Store>,
    bus: OnceLock<Arc<dyn Bus>>,
    convs: DashMap<ConvId, ConvState>,
    next_conn: AtomicU64,
    connections: AtomicUsize,
    max_connections: usize,
    sync_buffer: usize,
    /// Gap fills in flight (each holds the hub weakly and ends after one
    /// store call).
    fills: tokio_util::task::TaskTracker,
    meters: Meters,
}

/// The hub's metric handles, labelled with its shard once: fan-out records
/// per message without formatting the label or looking the series up.
struct Meters {
    connections: metrics::Gauge,
    subscriptions: metrics::Gauge,
    deliveries: metrics::Counter,
    fanout_latency: metrics::Histogram,
}

impl Meters {
    fn new(shard: u16) -> Self {
        let label = || ("shard", shard.to_string());
        Meters {
            connections: metrics::gauge!(crate::metrics::CONNECTIONS, &[label()]),
            subscriptions: metrics::gauge!(crate::metrics::SUBSCRIPTIONS, &[label()]),
            deliveries: metrics::counter!("portico_chat_deliveries_total", &[label()]),
            fanout_latency: metrics::histogram!("portico_chat_fanout_latency_seconds", &[label()]),
        }
    }
}

impl Hub {
    pub fn new(shard: u16, store: Arc<dyn Store>, max_connections: usize, queue: usize) -> Arc<Self> {
        Arc::new(Hub {
            shard,
            store,
            bus: OnceLock::new(),
            convs: DashMap::new(),
            next_conn: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            max_connections,
            sync_buffer: queue,
            fills: tokio_util::task::TaskTracker::new(),
            meters: Meters::new(shard),
        })
    }

    /// Connects the hub to its bus (once, at start-up).
    pub fn set_bus(&self, bus: Arc<dyn Bus>) {
        let _ = self.bus.set(bus);
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        self.bus.get().expect("bus set at start-up")
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Reserves a connection slot; `None` when the shard is full.
    pub fn admit(self: &Arc<Self>) -> Option<ConnGuard> {
        let n = self.connections.fetch_add(1, Ordering::AcqRel);
        if n >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.meters.connections.increment(1.0);
        Some(ConnGuard {
            hub: self.clone(),
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Subscribes `outlet` to `conv`. With `since`, everything after that
    /// offset is replayed first. Returns the newest offset at subscription.
    pub async fn subscribe(
        self: &Arc<Self>,
        outlet: &Outlet,
        conv: &ConvId,
        user: &str,
        since: Option<u64>,
    ) -> Result<u64, Refused> {
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(%conv, error = %e, "subscribe failed");
            Refused(ErrorCode::Unavailable)
        };
        match self.store.is_member(conv, user).await {
            Ok(true) => {}
            Ok(false) => return Err(Refused(ErrorCode::NotMember)),
            Err(e) => return Err(unavailable(&e)),
        }
        let first = {
            let mut st = self.convs.entry(conv.clone()).or_default();
            let first = st.subs.is_empty();
            st.subs.insert(
                outlet.id,
                Sub {
                    outlet: outlet.clone(),
                    cursor: 0,
                    syncing: Some(Vec::new()),
                },
            );
            first
        };
        if first && let Err(e) = self.bus().hold(conv).await {
            self.unsubscribe(outlet.id, conv).await;
            return Err(unavailable(&e));
        }
        let latest = match self.store.latest_offset(conv).await {
            Ok(l) => l,
            Err(e) => {
                self.unsubscribe(outlet.id, conv).await;
                return Err(unavailable(&e));
            }
        };
        let history = match since {
            Some(s) if latest.saturating_sub(s) > MAX_RESUME => {
                self.unsubscribe(outlet.id, conv).await;
                return Err(Refused(ErrorCode::ResumeTooFar));
            }
            Some(s) if s < latest => match self.store.page(conv, Page::After(s), MAX_RESUME as u32).await {
                Ok(h) => h,
                Err(e) => {
                    self.unsubscribe(outlet.id, conv).await;
                    return Err(unavailable(&e));
                }
            },
            _ => Vec::new(),
        };

        let Some(mut st) = self.convs.get_mut(conv) else {
            return Ok(latest); // the connection went away meanwhile
        };
        if st.next.is_none() {
            st.next = Some(latest + 1);
            self.drain_pending(conv, &mut st);
        }
        let Some(sub) = st.subs.get_mut(&outlet.id) else {
            return Ok(latest);
        };
        let mut cursor = since.unwrap_or(latest).min(latest);
        let mut batch = vec![Utf8Bytes::from(
            ServerFrame::Subscribed { conv, offset: latest }.to_json(),
        )];
        for m in &history {
            if m.offset > cursor {
                batch.push(ServerFrame::Message(m).to_json().into());
                cursor = m.offset;
            }
        }
        for (offset, text) in sub.syncing.take().unwrap_or_default() {
            if offset > cursor {
                batch.push(text);
                cursor = offset;
            }
        }
        sub.cursor = cursor;
        sub.outlet.send(Out::Batch(Box::new(batch)));
        self.meters.subscriptions.increment(1.0);
        let count = st.users.entry(outlet.user.clone()).or_insert(0);
        *count += 1;
        let joined = *count == 1;
        drop(st);
        if joined {
            self.announce(conv, &outlet.user, EventKind::Joined).await;
        }
        Ok(latest)
    }

    /// Publishes a presence change (best effort: logged on failure).
    async fn announce(&self, conv: &ConvId, user: &str, kind: EventKind) {
        let online = matches!(kind, EventKind::Joined);
        let bus = self.bus();
        let ev = Event {
            conv: conv.clone(),
            user: user.to_string(),
            event: kind,
        };
        if let Err(e) = bus.set_presence(conv, user, online).await {
            tracing::debug!(%conv, error = %e, "presence update failed");
        }
        if let Err(e) = bus.publish_event(&ev).await {
            tracing::debug!(%conv, error = %e, "presence event not sent");
        }
    }

    /// An ephemeral event from the bus: to every synced subscriber (typing
    /// events not back to their author). A `removed` event also ends the
    /// removed user's subscriptions here.
    pub fn deliver_event(&self, ev: &Event) {
        let Some(mut st) = self.convs.get_mut(&ev.conv) else {
            return;
        };
        let text = Arc::new(Utf8Bytes::from(ServerFrame::Event(ev).to_json()));
        let mut removed = Vec::new();
        for (id, sub) in st.subs.iter() {
            if sub.syncing.is_some() || (ev.event == EventKind::Typing && *sub.outlet.user == *ev.user) {
                continue;
            }
            sub.outlet.send(Out::Frame(text.clone()));
            if ev.event == EventKind::Removed && *sub.outlet.user == *ev.user {
                let bye = ServerFrame::Unsubscribed {
                    conv: &ev.conv,
                    reason: Some("removed"),
                };
                sub.outlet.send(Out::Frame(Arc::new(bye.to_json().into())));
                removed.push(*id);
            }
        }
        for id in removed {
            st.subs.remove(&id);
            self.meters.subscriptions.decrement(1.0);
        }
        if ev.event == EventKind::Removed {
            st.users.remove(ev.user.as_str());
        }
    }

    /// Users subscribed to `conv` on this shard.
    pub fn local_users(&self, conv: &ConvId) -> Vec<String> {
        self.convs
            .get(conv)
            .map(|st| st.users.keys().map(|u| u.to_string()).collect())
            .unwrap_or_default()
    }

    /// Every (conversation, users) held on this shard, for presence refresh.
    pub fn local_presence(&self) -> Vec<(ConvId, Vec<String>)> {
        self.convs
            .iter()
            .filter(|e| !e.users.is_empty())
            .map(|e| (e.key().clone(), e.users.keys().map(|u| u.to_string()).collect()))
            .collect()
    }

    /// Removes one subscription; the last one on this shard releases the
    /// conversation on the bus.
    pub async fn unsubscribe(&self, conn: ConnId, conv: &ConvId) {
        let mut left = None;
        let emptied = {
            if let Some(mut st) = self.convs.get_mut(conv)
                && let Some(sub) = st.subs.remove(&conn)
                && sub.syncing.is_none()
                && let Some(n) = st.users.get_mut(&sub.outlet.user)
            {
                self.meters.subscriptions.decrement(1.0);
                *n -= 1;
                if *n == 0 {
                    st.users.remove(&sub.outlet.user);
                    left = Some(sub.outlet.user.clone());
                }
            }
            self.convs.remove_if(conv, |_, st| st.subs.is_empty()).is_some()
        };
        if let Some(user) = left {
            self.announce(conv, &user, EventKind::Left).await;
        }
        if emptied && let Err(e) = self.bus().release(conv).await {
            tracing::warn!(%conv, error = %e, "bus release failed");
        }
    }

    /// Whether any subscriber on this shard holds `conv`.
    pub fn holds(&self, conv: &ConvId) -> bool {
        self.convs.contains_key(conv)
    }

    /// The conversations this shard has subscribers in.
    pub fn held(&self) -> Vec<ConvId> {
        self.convs.iter().map(|e| e.key().clone()).collect()
    }

    /// Loads from the store whatever the bus may have lost (after a
    /// reconnect or an overflow) for every conversation held here.
    pub async fn catch_up(self: &Arc<Self>) {
        let held: Vec<(ConvId, u64)> = self
            .convs
            .iter()
            .filter_map(|e| e.value().next.map(|n| (e.key().clone(), n)))
            .collect();
        for (conv, next) in held {
            match self
                .store
                .page(&conv, Page::After(next - 1), MAX_RESUME as u32)
                .await
            {
                Ok(found) => {
                    for m in found {
                        self.deliver(m);
                    }
                }
                Err(e) => tracing::warn!(%conv, error = %e, "catch-up failed"),
            }
        }
    }

    /// A message from the bus: fan out in order, exactly once per subscriber.
    pub fn deliver(self: &Arc<Self>, msg: Message) {
        let conv = msg.conv.clone();
        let Some(mut st) = self.convs.get_mut(&conv) else {
            return; // nobody here holds this conversation
        };
        match st.next {
            Some(next) if msg.offset < next => {} // duplicate
            Some(next) if msg.offset == next => {
                self.fan_out(&mut st, &msg);
                st.next = Some(next + 1);
                self.drain_pending(&conv, &mut st);
            }
            _ => {
                // Early (or before the first sync): wait for the gap.
                if st.pending.len() < MAX_PENDING {
                    st.pending.insert(msg.offset, msg);
                }
                if st.next.is_some() && !st.fill_scheduled {
                    st.fill_scheduled = true;
                    self.schedule_gap_fill(conv.clone());
                }
            }
        }
    }

    fn drain_pending(&self, _conv: &ConvId, st: &mut ConvState) {
        let Some(mut next) = st.next else { return };
        while let Some((&offset, _)) = st.pending.first_key_value() {
            if offset < next {
                st.pending.pop_first();
            } else if offset == next {
                let (_, m) = st.pending.pop_first().expect("checked non-empty");
                self.fan_out(st, &m);
                next += 1;
            } else {
                break;
            }
        }
        st.next = Some(next);
    }

    fn fan_out(&self, st: &mut ConvState, msg: &Message) {
        let text = Arc::new(Utf8Bytes::from(ServerFrame::Message(msg).to_json()));
        let mut sent = 0u64;
        for sub in st.subs.values_mut() {
            if msg.offset <= sub.cursor {
                continue;
            }
            if let Some(buf) = &mut sub.syncing {
                if buf.len() >= self.sync_buffer {
                    sub.outlet.ctl.close(close::SLOW_CONSUMER, "slow consumer");
                } else {
                    buf.push((msg.offset, Utf8Bytes::clone(&text)));
                }
                continue;
            }
            sub.cursor = msg.offset;
            if sub.outlet.send(Out::Frame(text.clone())) {
                sent += 1;
            }
        }
        self.meters.deliveries.increment(sent);
        let age = crate::store::now_millis().saturating_sub(msg.ts) as f64 / 1000.0;
        self.meters.fanout_latency.record(age);
    }

    /// After [`GAP_WAIT`], loads missing offsets from the store.
    fn schedule_gap_fill(self: &Arc<Self>, conv: ConvId) {
        let hub = Arc::downgrade(self);
        self.fills.spawn(async move {
            tokio::time::sleep(GAP_WAIT).await;
            let Some(hub) = hub.upgrade() else { return };
            let gap = hub.convs.get_mut(&conv).and_then(|mut st| {
                st.fill_scheduled = false;
                let next = st.next?;
                let first = *st.pending.keys().next()?;
                let last = *st.pending.keys().next_back()?;
                (first > next).then_some((next, first, last))
            });
            let Some((next, first, last)) = gap else { return };
            // Everything up to the newest parked message in one page: all
            // the gaps among them at once (parked copies are duplicates).
            let want = (last - next).min(MAX_RESUME) as u32;
            match hub.store.page(&conv, Page::After(next - 1), want).await {
                Ok(found) => {
                    let found_any = !found.is_empty();
                    for m in found {
                        hub.deliver(m);
                    }
                    if !found_any && let Some(mut st) = hub.convs.get_mut(&conv) {
                        // The store no longer has them: skip ahead, loudly.
                        tracing::warn!(%conv, from = next, to = first, "history gap cannot be filled");
                        if st.next == Some(next) {
                            st.next = Some(first);
                            hub.drain_pending(&conv, &mut st);
                        }
                    }
                    // Another gap further on (or one wider than a page):
                    // nothing else would fill it until the next message.
                    if let Some(mut st) = hub.convs.get_mut(&conv)
                        && !st.fill_scheduled
                        && st
                            .next
                            .is_some_and(|n| st.pending.keys().next().is_some_and(|&p| p > n))
                    {
                        st.fill_scheduled = true;
                        drop(st);
                        hub.schedule_gap_fill(conv);
                    }
                }
                Err(e) => {
                    tracing::warn!(%conv, error = %e, "gap fill failed; retrying");
                    if let Some(mut st) = hub.convs.get_mut(&conv)
                        && !st.fill_scheduled
                    {
                        st.fill_scheduled = true;
                        drop(st);
                        hub.schedule_gap_fill(conv);
                    }
                }
            }
        });
    }
}

/// A reserved connection slot; released on drop.
pub struct ConnGuard {
    hub: Arc<Hub>,
    pub id: ConnId,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.hub.connections.fetch_sub(1, Ordering::AcqRel);
        self.hub.meters.connections.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    //! The hub's ordering on its own: whatever the bus does (late, twice,
    //! out of order, not at all), each subscriber gets every offset exactly
    //! once, in order; gaps are filled from the store.

    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::store::NewMessage;
    use crate::store::memory::{Limits, MemoryStore};
    use proptest::prelude::*;

    struct Fixture {
        hub: Arc<Hub>,
        store: Arc<MemoryStore>,
        conv: ConvId,
        rx: mpsc::Receiver<Out>,
        _outlet: Outlet,
    }

    async fn fixture() -> Fixture {
        let store = Arc::new(MemoryStore::new(Limits::default()));
        let conv = ConvId::parse("c").unwrap();
        store
            .create_conversation(&conv, &["u".to_string()])
            .await
            .unwrap();
        let hub = Hub::new(1, store.clone(), 10, 4096);
        let bus = Arc::new(MemoryBus::default());
        bus.attach(&hub);
        hub.set_bus(bus);
        let (tx, rx) = mpsc::channel(4096);
        let outlet = Outlet {
            id: 1,
            user: Arc::from("u"),
            tx,
            ctl: Arc::new(ConnCtl::new(CancellationToken::new())),
        };
        hub.subscribe(&outlet, &conv, "u", None).await.unwrap();
        Fixture {
            hub,
            store,
            conv,
            rx,
            _outlet: outlet,
        }
    }

    /// Stores `n` messages without telling the hub (the bus is the test's).
    async fn stored(f: &Fixture, n: u64) -> Vec<Message> {
        let mut out = Vec::new();
        for i in 0..n {
            let new = NewMessage {
                client_id: format!("m{i}"),
                from: "u".into(),
                body: "b".into(),
                members_only: true,
            };
            out.push(f.store.append(&f.conv, new).await.unwrap().message);
        }
        out
    }

    /// The offsets of the message frames the subscriber got so far.
    fn received(rx: &mut mpsc::Receiver<Out>) -> Vec<u64> {
        let mut offsets = Vec::new();
        let mut frame = |t: &Utf8Bytes| {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            if v["type"] == "message" {
                offsets.push(v["offset"].as_u64().unwrap());
            }
        };
        while let Ok(item) = rx.try_recv() {
            match item {
                Out::Frame(t) => frame(&t),
                Out::Batch(ts) => ts.iter().for_each(&mut frame),
                Out::Ping => {}
            }
        }
        offsets
    }

    fn run(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(test);
    }

    /// Every connection holds 32 queue slots from its start (see [`Out`]).
    #[test]
    fn a_queue_slot_is_two_words() {
        assert!(std::mem::size_of::<Out>() <= 2 * std::mem::size_of::<usize>());
    }

    #[test]
    fn duplicates_are_dropped_and_early_messages_wait_for_their_turn() {
        run(async {
            let mut f = fixture().await;
            let m = stored(&f, 3).await;
            for i in [1, 0, 0, 2, 1, 2] {
                f.hub.deliver(m[i].clone());
            }
            assert_eq!(received(&mut f.rx), [1, 2, 3]);
        });
    }

    #[test]
    fn a_gap_is_filled_from_the_store_after_the_wait() {
        run(async {
            let mut f = fixture().await;
            let m = stored(&f, 4).await;
            f.hub.deliver(m[0].clone());
            f.hub.deliver(m[3].clone()); // 2 and 3 never come over the bus
            assert_eq!(received(&mut f.rx), [1], "4 waits for 2 and 3");
            tokio::time::sleep(GAP_WAIT * 2).await;
            assert_eq!(received(&mut f.rx), [2, 3, 4]);
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any delivery order, with repeats and omissions, as long as the
        /// newest message arrives once: exactly 1..=n, in order.
        #[test]
        fn any_bus_behaviour_gives_each_offset_once_in_order(
            n in 1u64..40,
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..120),
        ) {
            run(async move {
                let mut f = fixture().await;
                let m = stored(&f, n).await;
                for p in &picks {
                    f.hub.deliver(m[p.index(n as usize)].clone());
                }
                f.hub.deliver(m[n as usize - 1].clone());
                tokio::time::sleep(GAP_WAIT * 4).await;
                let got = received(&mut f.rx);
                assert_eq!(got, (1..=n).collect::<Vec<_>>(), "picks {:?}", picks.iter().map(|p| p.index(n as usize)).collect::<Vec<_>>());
            });
        }
    }
}
