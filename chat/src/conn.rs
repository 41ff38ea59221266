//! One WebSocket connection: a reader loop that executes client commands and
//! a writer that drains the connection's bounded outbound queue, both in
//! the connection's one task.
//!
//! The connection ends on client close, idle timeout, token expiry, protocol
//! violation, slow consumption or server drain; each has its close code
//! (see [`close`]), which the client always receives: an evicted slow
//! consumer's queue is dropped and its socket given room for the close
//! frame (see [`crate::socket`]). On the way out it leaves every
//! conversation it joined.
//!
//! Two kinds of traffic share the queue. Fan-out from the hub is `try_send`:
//! a client that cannot keep up is evicted (4008). The client's own
//! requests are answered only while a quarter of the queue is free: a
//! client that asks faster than it reads waits (its reads stop, TCP pushes
//! back), and never pushes its own fan-out over the edge.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use tracing::Instrument;

use crate::hub::{ConnCtl, ConnGuard, Out, Outlet};
use crate::protocol::{
    self, ClientFrame, ConvId, ErrorCode, Event, EventKind, MAX_HISTORY_PAGE, ServerFrame, close,
};
use crate::shard::{Budget, PublishError, Shard};
use crate::socket::Socket;
use crate::store::{NewMessage, Page, StoreError};
use portico_common::auth::{Claims, now_secs};

/// Conversations one connection may be subscribed to at once.
pub const MAX_SUBSCRIPTIONS: usize = 100;
/// Frames written before one flush.
const WRITE_BATCH: usize = 64;
/// How long a close frame may take to be written.
const CLOSE_WRITE: Duration = Duration::from_secs(5);
/// How long to wait for the client's close after ours: its input is read
/// meanwhile, so the socket closes with a FIN behind what is still unsent
/// (unread input would make it a reset, which discards that).
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Serves a connection from its upgrade until it ends: `upgrade` yields
/// the upgraded stream (or why there is none), `socket` is the TCP socket
/// under it, when there is one (room for a last close frame).
///
/// Memory per idle connection is this one future, so it is built with care:
/// the reader and the writer are two futures joined in the connection's one
/// task (not a second task), and everything is set up before the future and
/// used in place by it. An `async fn` would keep each argument twice, once
/// as given and once where its body moved it.
pub fn serve<S, U, E>(
    shard: Arc<Shard>,
    upgrade: U,
    cfg: WebSocketConfig,
    socket: Option<Socket>,
    claims: Claims,
    guard: ConnGuard,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: Future<Output = Result<S, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let span = tracing::info_span!("conn", id = guard.id, user = %claims.sub, shard = shard.hub.shard());
    let (tx, rx) = mpsc::channel(shard.cfg.outbound_queue);
    let ctl = Arc::new(ConnCtl::new(shard.shutdown.child_token()));
    let mut conn = Conn {
        reserve: (shard.cfg.outbound_queue / 4).max(1),
        outlet: Outlet {
            id: guard.id,
            user: Arc::from(claims.sub.as_str()),
            tx,
            ctl: ctl.clone(),
        },
        shard,
        claims,
        subscribed: HashSet::new(),
    };
    // Queued now, written first once the writer runs.
    conn.send(&ServerFrame::Welcome {
        user: &conn.claims.sub,
        shard: conn.shard.hub.shard(),
        protocol: protocol::SUBPROTOCOL,
    });
    async move {
        let io = match upgrade.await {
            Ok(io) => io,
            Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(cfg)).await;
        let (sink, mut stream) = ws.split();
        let reader = async {
            let client_closed = conn.read_loop(&mut stream).await;
            if ctl.reason().is_none() {
                ctl.close(close::NORMAL, ""); // the client left
            }
            if let Some((code, reason)) = ctl.reason() {
                tracing::debug!(code, reason, "closing");
            }
            client_closed
        };
        // The writer ends once the reader asked it to close (or on a write
        // error, which ends the reader through the same token).
        let writer = write_loop(sink, rx, &ctl, socket.as_ref());
        let (client_closed, ()) = tokio::join!(reader, writer);
        if !client_closed {
            let _ =
                tokio::time::timeout(CLOSE_LINGER, async { while stream.next().await.is_some() {} }).await;
        }
        for conv in conn.subscribed.drain() {
            conn.shard.hub.unsubscribe(conn.outlet.id, &conv).await;
        }
        drop(guard);
    }
    .instrument(span)
}

struct Conn {
    /// Free queue slots a request of the client's own waits for.
    reserve: usize,
    shard: Arc<Shard>,
    claims: Claims,
    outlet: Outlet,
    subscribed: HashSet<ConvId>,
}

impl Conn {
    fn send(&self, frame: &ServerFrame<'_>) {
        self.outlet.send(Out::Frame(Arc::new(frame.to_json().into())));
    }

    fn error(&self, code: ErrorCode, conv: Option<&ConvId>) {
        metrics::counter!("portico_chat_errors_total", "code" => format!("{code:?}")).increment(1);
        self.send(&ServerFrame::error(code, conv));
    }

    /// Reads and executes client frames until the connection ends; `true`
    /// if the client closed it (nothing more to read).
    async fn read_loop<St>(&mut self, stream: &mut St) -> bool
    where
        St: futures_util::Stream<Item = Result<WsMessage, WsError>> + Unpin,
    {
        let idle = Duration::from_secs(self.shard.cfg.idle_timeout_secs);
        let heartbeat = Duration::from_secs(self.shard.cfg.heartbeat_secs);
        let start = Instant::now();
        let expiry = start + Duration::from_secs(self.claims.exp.saturating_sub(now_secs()));
        // When the client was last heard from, and when to ping it next.
        let (mut heard, mut ping_at) = (start, start + heartbeat);
        // One timer serves the heartbeat, the idle limit and the token's
        // expiry. It is moved only when it fires: a frame just notes the
        // time, so reading never touches the timer wheel.
        let due = |heard: Instant, ping_at: Instant| ping_at.min(heard + idle).min(expiry);
        let timer = tokio::time::sleep_until(due(heard, ping_at));
        tokio::pin!(timer);
        let ctl = self.outlet.ctl.clone();
        loop {
            let next = tokio::select! {
                _ = ctl.token().cancelled() => {
                    if ctl.reason().is_none() {
                        ctl.close(close::GOING_AWAY, "server shutting down");
                    }
                    return false;
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= expiry {
                        ctl.close(close::TOKEN_EXPIRED, "token expired");
                        return false;
                    }
                    if now >= heard + idle {
                        ctl.close(close::IDLE_TIMEOUT, "idle timeout");
                        return false;
                    }
                    if now >= ping_at {
                        // A full queue is traffic enough: no ping then.
                        let _ = self.outlet.tx.try_send(Out::Ping);
                        ping_at = now + heartbeat;
                    }
                    timer.as_mut().reset(due(heard, ping_at));
                    continue;
                }
                next = stream.next() => next,
            };
            heard = Instant::now();
            let msg = match next {
                None => return true,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                    ctl.close(close::TOO_BIG, "message too big");
                    return false;
                }
                Some(Err(WsError::Protocol(_))) => {
                    ctl.close(close::PROTOCOL_ERROR, "protocol error");
                    return false;
                }
                Some(Err(_)) => return true,
                Some(Ok(m)) => m,
            };
            if !matches!(msg, WsMessage::Ping(_) | WsMessage::Pong(_)) && !self.room().await {
                return false;
            }
            match msg {
                WsMessage::Text(text) => {
                    metrics::counter!("portico_chat_frames_in_total").increment(1);
                    // Boxed: the command futures (subscribe with its store
                    // calls, publish) are large, and an idle connection
                    // should not reserve their space while it waits.
                    Box::pin(self.handle(&text)).await;
                }
                WsMessage::Binary(_) => self.error(ErrorCode::BinaryNotSupported, None),
                WsMessage::Close(_) => return true,
                // Pings are answered by tungstenite; pongs only reset `idle`.
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
            }
        }
    }

    /// Waits until the queue has `reserve` free slots, so the answer to a
    /// request never takes the room fan-out needs; `false` if the
    /// connection is closing meanwhile.
    async fn room(&self) -> bool {
        let ctl = &self.outlet.ctl;
        while self.outlet.tx.capacity() < self.reserve {
            tokio::select! {
                _ = ctl.drained().notified() => {}
                _ = ctl.token().cancelled() => return false,
            }
        }
        true
    }

    async fn handle(&mut self, text: &str) {
        let frame = match protocol::parse(text) {
            Ok(f) => f,
            Err(code) => return self.error(code, None),
        };
        match frame {
            ClientFrame::Ping {} => self.send(&ServerFrame::Pong),
            ClientFrame::Subscribe { conv, since } => self.subscribe(conv, since).await,
            ClientFrame::Unsubscribe { conv } => {
                if !self.subscribed.remove(&conv) {
                    return self.error(ErrorCode::NotSubscribed, Some(&conv));
                }
                self.shard.hub.unsubscribe(self.outlet.id, &conv).await;
                self.send(&ServerFrame::Unsubscribed {
                    conv: &conv,
                    reason: None,
                });
            }
            ClientFrame::Typing { conv } => {
                if !self.subscribed.contains(&conv) {
                    return self.error(ErrorCode::NotSubscribed, Some(&conv));
                }
                if self.rate_limited(&conv) {
                    return;
                }
                self.event(conv, EventKind::Typing).await;
            }
            ClientFrame::Read { conv, offset } => {
                match self
                    .shard
                    .hub
                    .store()
                    .mark_read(&conv, &self.claims.sub, offset)
                    .await
                {
                    Ok(offset) => self.event(conv, EventKind::Read { offset }).await,
                    Err(e) => self.store_error(&conv, e),
                }
            }
            ClientFrame::Presence { conv } => {
                if !self.is_member(&conv).await {
                    return;
                }
                match self.shard.hub.bus().presence(&conv).await {
                    Ok(users) => self.send(&ServerFrame::Presence {
                        conv: &conv,
                        users: &users,
                    }),
                    Err(e) => {
                        tracing::warn!(%conv, error = %e, "presence failed");
                        self.error(ErrorCode::Unavailable, Some(&conv));
                    }
                }
            }
            ClientFrame::Publish { conv, id, body } => self.publish(conv, id, body).await,
            ClientFrame::History { conv, before, limit } => {
                if !self.is_member(&conv).await {
                    return;
                }
                let limit = limit.unwrap_or(50).clamp(1, MAX_HISTORY_PAGE);
                let page = Page::Before(before.unwrap_or(u64::MAX));
                match self.shard.hub.store().page(&conv, page, limit).await {
                    Ok(messages) => self.send(&ServerFrame::History {
                        conv: &conv,
                        messages: &messages,
                    }),
                    Err(e) => {
                        tracing::warn!(%conv, error = %e, "history failed");
                        self.error(ErrorCode::Unavailable, Some(&conv));
                    }
                }
            }
        }
    }

    async fn subscribe(&mut self, conv: ConvId, since: Option<u64>) {
        if self.subscribed.contains(&conv) {
            // Re-subscribing restarts the subscription (e.g. to resume).
            self.shard.hub.unsubscribe(self.outlet.id, &conv).await;
            self.subscribed.remove(&conv);
        } else if self.subscribed.len() >= MAX_SUBSCRIPTIONS {
            return self.error(ErrorCode::TooManySubscriptions, Some(&conv));
        }
        // Counted before the await so that a concurrent drop cleans it up.
        self.subscribed.insert(conv.clone());
        let hub = self.shard.hub.clone();
        match hub.subscribe(&self.outlet, &conv, &self.claims.sub, since).await {
            Ok(_) => {}
            Err(refused) => {
                self.subscribed.remove(&conv);
                self.error(refused.0, Some(&conv));
            }
        }
    }

    /// Charges the user's budget (typing events); on refusal answers
    /// `rate_limited`.
    fn rate_limited(&self, conv: &ConvId) -> bool {
        match self.shard.charge(&self.claims.sub) {
            Ok(()) => false,
            Err(e) => {
                self.publish_error(conv, None, e);
                true
            }
        }
    }

    /// The error frame for a refused publish (`id`: the client's id).
    fn publish_error(&self, conv: &ConvId, id: Option<&str>, e: PublishError) {
        match e {
            PublishError::RateLimited(wait) => self.send(&ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: ErrorCode::RateLimited.message(),
                conv: Some(conv),
                id,
                retry_after_ms: Some(wait.as_millis() as u64 + 1),
            }),
            PublishError::Store(e) => {
                let code = self.store_error_code(conv, e);
                self.send(&ServerFrame::Error {
                    code,
                    message: code.message(),
                    conv: Some(conv),
                    id,
                    retry_after_ms: None,
                });
            }
        }
    }

    /// Broadcasts an ephemeral event from this user.
    async fn event(&self, conv: ConvId, event: EventKind) {
        let ev = Event {
            conv,
            user: self.claims.sub.clone(),
            event,
        };
        if let Err(e) = self.shard.hub.bus().publish_event(&ev).await {
            tracing::debug!(conv = %ev.conv, error = %e, "event not sent");
        }
    }

    fn store_error(&self, conv: &ConvId, e: StoreError) {
        let code = self.store_error_code(conv, e);
        self.error(code, Some(conv))
    }

    fn store_error_code(&self, conv: &ConvId, e: StoreError) -> ErrorCode {
        match e {
            StoreError::NotMember(_) | StoreError::NoSuchConversation(_) => ErrorCode::NotMember,
            e => {
                metrics::counter!("portico_chat_store_errors_total").increment(1);
                tracing::warn!(%conv, error = %e, "store call failed");
                ErrorCode::Unavailable
            }
        }
    }

    async fn publish(&mut self, conv: ConvId, id: String, body: String) {
        // Membership is checked by the store, atomically with the append.
        let new = NewMessage {
            client_id: id.clone(),
            from: self.claims.sub.clone(),
            body,
            members_only: true,
        };
        match self.shard.publish(&conv, new, Budget::User).await {
            Ok(a) => self.send(&ServerFrame::Ack {
                conv: &a.message.conv,
                id: &a.message.id,
                offset: a.message.offset,
                duplicate: a.duplicate,
            }),
            Err(e) => self.publish_error(&conv, Some(&id), e),
        }
    }

    /// Checks membership (asked each time: members can be removed); on
    /// `false` the error was sent.
    async fn is_member(&self, conv: &ConvId) -> bool {
        match self.shard.hub.store().is_member(conv, &self.claims.sub).await {
            Ok(true) => true,
            Ok(false) => {
                self.error(ErrorCode::NotMember, Some(conv));
                false
            }
            Err(e) => {
                self.store_error(conv, e);
                false
            }
        }
    }
}

/// Drains the queue into the socket until the token is cancelled, then
/// writes the close frame. A plain `fn`: its arguments live in the future
/// once, not twice (see [`serve`]).
#[allow(clippy::manual_async_fn)]
fn write_loop<'a, Si>(
    mut sink: Si,
    mut rx: mpsc::Receiver<Out>,
    ctl: &'a ConnCtl,
    socket: Option<&'a Socket>,
) -> impl Future<Output = ()> + 'a
where
    Si: futures_util::Sink<WsMessage, Error = WsError> + Unpin + 'a,
{
    async move {
        let written = async {
            while let Some(item) = rx.recv().await {
                feed(&mut sink, item).await?;
                // Write what else is queued, then flush once.
                for _ in 0..WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(item) => feed(&mut sink, item).await?,
                        Err(_) => break,
                    }
                }
                sink.flush().await?;
                ctl.drained().notify_one();
            }
            Ok::<_, WsError>(())
        };
        // A write waiting on a full socket is cut short by the token too: an
        // evicted slow consumer still gets its close frame.
        let token = ctl.token();
        tokio::select! {
            _ = token.cancelled() => {}
            _ = written => {
                // A write failed (or the queue closed): nobody to say goodbye to.
                token.cancel();
                return;
            }
        }
        // Cancelled without a reason: the shard's drain got here first.
        let (code, reason) = ctl
            .reason()
            .unwrap_or((close::GOING_AWAY, "server shutting down"));
        if code == close::SLOW_CONSUMER {
            // What is queued would never be read in time: drop it, and give
            // the full socket room for the close frame, so the client learns
            // why as soon as it reads.
            rx.close();
            while rx.try_recv().is_ok() {}
            if let Some(s) = socket {
                s.make_room();
            }
        }
        let frame = CloseFrame {
            code: code.into(),
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(CLOSE_WRITE, async {
            sink.send(WsMessage::Close(Some(frame))).await?;
            sink.close().await
        })
        .await;
        // Whether or not the close frame made it in time: the client must see
        // the end of the stream behind what was sent, not a silent socket.
        if let Some(s) = socket {
            s.shutdown_write();
        }
    }
}

async fn feed<Si>(sink: &mut Si, item: Out) -> Result<(), WsError>
where
    Si: futures_util::Sink<WsMessage, Error = WsError> + Unpin,
{
    match item {
        Out::Frame(t) => sink.feed(WsMessage::Text(Arc::unwrap_or_clone(t))).await,
        Out::Ping => sink.feed(WsMessage::Ping(Default::default())).await,
        Out::Batch(frames) => {
            for t in *frames {
                sink.feed(WsMessage::Text(t)).await?;
            }
            Ok(())
        }
    }
}
