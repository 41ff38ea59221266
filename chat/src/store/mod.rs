//! History storage: conversations, members and messages with offsets.
//!
//! The store assigns offsets: `append` gives each new message the next
//! offset of its conversation, atomically, and returns the stored message
//! again (flagged `duplicate`) when the same sender retries the same client
//! id. Engines: [`sqlite`] (on disk, one machine: `portico up`'s default),
//! [`postgres`] (several shards), [`memory`] (nothing kept: tests, demos).
//! [`contract`] is what all of them promise, run against each.

pub mod contract;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

use crate::protocol::{ConvId, Message};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conversation {0} does not exist")]
    NoSuchConversation(ConvId),
    #[error("conversation {0} already exists")]
    Exists(ConvId),
    #[error("not a member of conversation {0}")]
    NotMember(ConvId),
    #[error("store is full: {0}")]
    Full(&'static str),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A message to append; the store fills in offset and time.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub client_id: String,
    pub from: String,
    pub body: String,
    /// Refuse unless `from` is a member (checked atomically with the
    /// append). Only trusted services publish without it.
    pub members_only: bool,
}

/// One line of a user's conversation list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ConvSummary {
    #[schema(value_type = String)]
    pub id: ConvId,
    pub latest_offset: u64,
    /// The user's read receipt: the last offset they have read.
    pub read_offset: u64,
    pub unread: u64,
    pub last_message: Option<Message>,
}

/// The result of an append.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: Message,
    /// The same sender already published this client id: nothing new stored.
    pub duplicate: bool,
}

/// Which page of history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Oldest first, offsets greater than this (resume).
    After(u64),
    /// Newest `limit` messages below this offset, returned oldest first.
    Before(u64),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_conversation(&self, conv: &ConvId, members: &[String]) -> Result<(), StoreError>;
    async fn add_member(&self, conv: &ConvId, user: &str) -> Result<(), StoreError>;
    /// Removes a member; `false` if they were not one.
    async fn remove_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError>;
    /// Moves the user's read receipt forward (never back, never past the
    /// newest offset); returns the receipt now stored.
    async fn mark_read(&self, conv: &ConvId, user: &str, offset: u64) -> Result<u64, StoreError>;
    /// The user's conversations, most recently active first.
    async fn conversations_of(&self, user: &str, limit: u32) -> Result<Vec<ConvSummary>, StoreError>;
    async fn is_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError>;
    async fn append(&self, conv: &ConvId, msg: NewMessage) -> Result<Appended, StoreError>;
    /// Messages of one page, oldest first, at most `limit`.
    async fn page(&self, conv: &ConvId, page: Page, limit: u32) -> Result<Vec<Message>, StoreError>;
    /// The newest offset (0 for an empty conversation).
    async fn latest_offset(&self, conv: &ConvId) -> Result<u64, StoreError>;
    /// A cheap round trip to the backend, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
