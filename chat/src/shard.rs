//! A shard's shared state: what every connection and request handler of
//! it needs, and the one publish path (budget, store, bus) that WebSocket
//! and REST publishing share.

use governor::DefaultKeyedRateLimiter;
use portico_common::auth::Tokens;
use portico_config::ChatConfig;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::protocol::ConvId;
use crate::store::{Appended, NewMessage, StoreError};

/// Everything a connection or request handler of this shard needs.
pub struct Shard {
    pub cfg: ChatConfig,
    pub hub: Arc<Hub>,
    pub tokens: Tokens,
    pub limiter: DefaultKeyedRateLimiter<String>,
    /// Fires when the shard drains; connections close with "going away".
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Why a publish was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The user's publish budget is spent: retry after this long.
    #[error("publishing too fast: retry in {0:?}")]
    RateLimited(std::time::Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who a publish is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// A user: `chat.publish_per_sec` (burst 2×), over WebSocket and REST alike.
    User,
    /// A service token (jobs' progress events): not limited.
    Service,
}

impl Shard {
    /// Charges one publish (or typing event) to `user`'s budget.
    pub fn charge(&self, user: &str) -> Result<(), PublishError> {
        let Err(not_until) = self.limiter.check_key(&user.to_string()) else {
            return Ok(());
        };
        metrics::counter!("portico_chat_rate_limited_total").increment(1);
        let now = governor::clock::Clock::now(&governor::clock::DefaultClock::default());
        Err(PublishError::RateLimited(not_until.wait_time_from(now)))
    }

    /// The one publish path, for WebSocket and REST: the sender's budget,
    /// then the store (assigning the offset), then the bus. `Ok` means
    /// stored: the message is durable whatever the bus does.
    pub async fn publish(
        &self,
        conv: &ConvId,
        msg: NewMessage,
        budget: Budget,
    ) -> Result<Appended, PublishError> {
        if budget == Budget::User {
            self.charge(&msg.from)?;
        }
        let appended = self.hub.store().append(conv, msg).await?;
        metrics::counter!("portico_chat_messages_in_total").increment(1);
        let m = &appended.message;
        // Republished even when a duplicate: the first attempt may have died
        // between store and bus; hubs drop what they already delivered.
        if let Err(e) = self.hub.bus().publish(m).await {
            // Members catch up via gap fill, reconnect catch-up or resume.
            metrics::counter!("portico_chat_bus_errors_total").increment(1);
            tracing::warn!(conv = %m.conv, offset = m.offset, error = %e, "bus publish failed");
        }
        Ok(appended)
    }
}
