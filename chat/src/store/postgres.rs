//! The PostgreSQL store (deadpool-postgres), for production shards.
//!
//! Offsets come from `conversations.latest_offset`, incremented under the
//! conversation's row lock in the same transaction that inserts the
//! message, so they are dense and assigned once. `UNIQUE (conv, sender,
//! client_id)` makes retries idempotent. Indexes: the messages primary key
//! `(conv, offset)` serves "latest messages of a conversation";
//! `members_by_user` serves "conversations of a user".
//!
//! Every call has a deadline ([`QUERY_TIMEOUT`]): with the database down a
//! publish fails fast with `Unavailable` instead of hanging.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use portico_common::pg;
use tokio_postgres::error::SqlState;

use super::{Appended, ConvSummary, NewMessage, Page, Store, StoreError, now_millis};
use crate::protocol::{ConvId, Message};

/// Longest any store call may take, pool wait included.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema versions, applied in order, each once (see [`PgStore::connect`]).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE conversations (
    id            text PRIMARY KEY,
    latest_offset bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE members (
    conv        text NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    read_offset bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, user_id)
);
CREATE INDEX members_by_user ON members (user_id, conv);
CREATE TABLE messages (
    conv      text   NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    "offset"  bigint NOT NULL,
    client_id text   NOT NULL,
    sender    text   NOT NULL,
    ts        bigint NOT NULL,
    body      text   NOT NULL,
    PRIMARY KEY (conv, "offset"),
    UNIQUE (conv, sender, client_id)
);
"#];

/// An append in one statement: one round trip and one implicit transaction
/// (it was four: BEGIN, numbering, INSERT, COMMIT; PostgreSQL spent more
/// CPU per message than the shards, measured by `bench --scenarios dm`).
/// The UPDATE takes the conversation's row lock (serializing appends to it,
/// checking membership) and numbers the message; the INSERT stores it. No
/// row back: not a member, or no such conversation. A client id already
/// stored (a retry) violates `RETRY_KEY` and undoes the whole statement,
/// the increment included; the earlier message is then read (`FIND_RETRY`,
/// a new snapshot that sees it committed).
const APPEND: &str = r#"WITH next AS (
         UPDATE conversations SET latest_offset = latest_offset + 1 WHERE id = $1
         AND (NOT $3 OR EXISTS (SELECT 1 FROM members WHERE conv = $1 AND user_id = $2))
         RETURNING latest_offset)
     INSERT INTO messages (conv, "offset", client_id, sender, ts, body)
     SELECT $1, latest_offset, $4, $2, $5, $6 FROM next
     RETURNING "offset""#;
/// The unique key of a sender's client ids in a conversation (its default
/// name from the schema).
const RETRY_KEY: &str = "messages_conv_sender_client_id_key";
const FIND_RETRY: &str = r#"SELECT "offset", client_id, sender, ts, body FROM messages
     WHERE conv = $1 AND sender = $2 AND client_id = $3"#;

/// Any number that both shards agree on: serializes concurrent migrations.
const MIGRATION_LOCK: i64 = 0x706f_7274_6963_6f01;

pub struct PgStore {
    pool: Pool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A pool error with its causes (a TLS failure says which check failed).
fn pool_unavailable(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(pg::describe(&e))
}

impl PgStore {
    /// Connects (the URL is checked, the server need not be up yet) and
    /// applies pending migrations when it is.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let pool = pg::pool(url, pool_size, QUERY_TIMEOUT).map_err(|e| match e {
            pg::PgError::Url(e) => StoreError::Unavailable(format!("chat.postgres_url: {e}")),
            e => unavailable(e),
        })?;
        let store = PgStore { pool };
        deadline(async {
            pg::migrate(&store.pool, "chat_schema", MIGRATION_LOCK, MIGRATIONS)
                .await
                .map_err(unavailable)
        })
        .await?;
        Ok(store)
    }
}

async fn deadline<T>(f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(QUERY_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable("database call timed out".into())))
}

fn message(conv: &ConvId, row: &tokio_postgres::Row) -> Message {
    Message {
        conv: conv.clone(),
        offset: row.get::<_, i64>("offset") as u64,
        id: row.get("client_id"),
        from: row.get("sender"),
        ts: row.get::<_, i64>("ts") as u64,
        body: row.get("body"),
    }
}

#[async_trait]
impl Store for PgStore {
    async fn create_conversation(&self, conv: &ConvId, members: &[String]) -> Result<(), StoreError> {
        deadline(async {
            let mut client = self.pool.get().await.map_err(pool_unavailable)?;
            let tx = client.transaction().await.map_err(unavailable)?;
            let inserted = tx
                .execute(
                    "INSERT INTO conversations (id) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&conv.as_str()],
                )
                .await
                .map_err(unavailable)?;
            if inserted == 0 {
                return Err(StoreError::Exists(conv.clone()));
            }
            tx.execute(
                "INSERT INTO members (conv, user_id) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                &[&conv.as_str(), &members],
            )
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)
        })
        .await
    }

    async fn add_member(&self, conv: &ConvId, user: &str) -> Result<(), StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            client
                .execute(
                    "INSERT INTO members (conv, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&conv.as_str(), &user],
                )
                .await
                .map_err(|e| match e.code() {
                    Some(&SqlState::FOREIGN_KEY_VIOLATION) => StoreError::NoSuchConversation(conv.clone()),
                    _ => unavailable(e),
                })?;
            Ok(())
        })
        .await
    }

    async fn remove_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            let n = client
                .execute(
                    "DELETE FROM members WHERE conv = $1 AND user_id = $2",
                    &[&conv.as_str(), &user],
                )
                .await
                .map_err(unavailable)?;
            Ok(n > 0)
        })
        .await
    }

    async fn mark_read(&self, conv: &ConvId, user: &str, offset: u64) -> Result<u64, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            let offset = offset.min(i64::MAX as u64) as i64;
            let row = client
                .query_opt(
                    "UPDATE members m SET read_offset = GREATEST(m.read_offset, LEAST($3, c.latest_offset))
                     FROM conversations c WHERE c.id = m.conv AND m.conv = $1 AND m.user_id = $2
                     RETURNING m.read_offset",
                    &[&conv.as_str(), &user, &offset],
                )
                .await
                .map_err(unavailable)?
                .ok_or_else(|| StoreError::NotMember(conv.clone()))?;
            Ok(row.get::<_, i64>(0) as u64)
        })
        .await
    }

    async fn conversations_of(&self, user: &str, limit: u32) -> Result<Vec<ConvSummary>, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            let rows = client
                .query(
                    r#"SELECT c.id, c.latest_offset, m.read_offset,
                              msg."offset", msg.client_id, msg.sender, msg.ts, msg.body
                       FROM members m
                       JOIN conversations c ON c.id = m.conv
                       LEFT JOIN messages msg ON msg.conv = c.id AND msg."offset" = c.latest_offset
                       WHERE m.user_id = $1
                       ORDER BY msg.ts DESC NULLS LAST, c.id
                       LIMIT $2"#,
                    &[&user, &i64::from(limit)],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|r| {
                    let id = ConvId::parse(r.get::<_, &str>("id"))
                        .map_err(|_| unavailable("bad conversation id in database"))?;
                    let latest = r.get::<_, i64>("latest_offset") as u64;
                    let read = r.get::<_, i64>("read_offset") as u64;
                    let last_message = r.get::<_, Option<i64>>("offset").map(|_| message(&id, r));
                    Ok(ConvSummary {
                        id,
                        latest_offset: latest,
                        read_offset: read,
                        unread: latest - read,
                        last_message,
                    })
                })
                .collect()
        })
        .await
    }

    async fn is_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            let row = client
                .query_opt(
                    "SELECT 1 FROM members WHERE conv = $1 AND user_id = $2",
                    &[&conv.as_str(), &user],
                )
                .await
                .map_err(unavailable)?;
            Ok(row.is_some())
        })
        .await
    }

    async fn append(&self, conv: &ConvId, msg: NewMessage) -> Result<Appended, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            // Prepared once per connection.
            let (append, find) =
                futures_util::try_join!(client.prepare_cached(APPEND), client.prepare_cached(FIND_RETRY))
                    .map_err(unavailable)?;
            let id = conv.as_str();
            let ts = now_millis() as i64;
            let stored = client
                .query_opt(
                    &append,
                    &[&id, &msg.from, &msg.members_only, &msg.client_id, &ts, &msg.body],
                )
                .await;
            match stored {
                Ok(Some(row)) => Ok(Appended {
                    message: Message {
                        conv: conv.clone(),
                        offset: row.get::<_, i64>(0) as u64,
                        id: msg.client_id,
                        from: msg.from,
                        ts: ts as u64,
                        body: msg.body,
                    },
                    duplicate: false,
                }),
                Ok(None) => Err(StoreError::NotMember(conv.clone())),
                Err(e) if e.as_db_error().and_then(|d| d.constraint()) == Some(RETRY_KEY) => {
                    // A retry: answer with the original.
                    let row = client
                        .query_opt(&find, &[&id, &msg.from, &msg.client_id])
                        .await
                        .map_err(unavailable)?
                        .ok_or_else(|| unavailable("a message reported stored twice is not stored"))?;
                    Ok(Appended {
                        message: message(conv, &row),
                        duplicate: true,
                    })
                }
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn page(&self, conv: &ConvId, page: Page, limit: u32) -> Result<Vec<Message>, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            let limit = i64::from(limit);
            let rows = match page {
                Page::After(after) => {
                    client
                        .query(
                            r#"SELECT "offset", client_id, sender, ts, body FROM messages
                               WHERE conv = $1 AND "offset" > $2 ORDER BY "offset" LIMIT $3"#,
                            &[&conv.as_str(), &(after.min(i64::MAX as u64) as i64), &limit],
                        )
                        .await
                }
                Page::Before(before) => {
                    client
                        .query(
                            r#"SELECT * FROM (SELECT "offset", client_id, sender, ts, body FROM messages
                               WHERE conv = $1 AND "offset" < $2 ORDER BY "offset" DESC LIMIT $3) p
                               ORDER BY "offset""#,
                            &[&conv.as_str(), &(before.min(i64::MAX as u64) as i64), &limit],
                        )
                        .await
                }
            }
            .map_err(unavailable)?;
            Ok(rows.iter().map(|r| message(conv, r)).collect())
        })
        .await
    }

    async fn latest_offset(&self, conv: &ConvId) -> Result<u64, StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            let row = client
                .query_opt(
                    "SELECT latest_offset FROM conversations WHERE id = $1",
                    &[&conv.as_str()],
                )
                .await
                .map_err(unavailable)?
                .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
            Ok(row.get::<_, i64>(0) as u64)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        deadline(async {
            let client = self.pool.get().await.map_err(pool_unavailable)?;
            client.simple_query("SELECT 1").await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}
