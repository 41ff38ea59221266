//! The embedded store: SQLite in one file under the data directory, for
//! one-machine installs (`portico up`, a lone shard). History, offsets,
//! memberships and read receipts survive a restart and a SIGKILL: the
//! database runs in WAL mode and every call is one transaction, so a killed
//! process leaves either all of an append or none of it.
//!
//! One connection behind a mutex, used from the blocking pool: SQLite
//! serializes writers anyway, and an append is a handful of microseconds.
//! The semantics are the PostgreSQL store's, checked by the same contract
//! tests ([`super::contract`]): offsets 1, 2, 3 … per conversation assigned
//! under the conversation's row update (which also checks membership), a
//! retry of the same (sender, client id) answered with the stored message.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Appended, ConvSummary, NewMessage, Page, Store, StoreError, now_millis};
use crate::protocol::{ConvId, Message};

/// Schema versions, applied in order (`PRAGMA user_version` counts them).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY,
    latest_offset INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);
CREATE TABLE members (
    conv        TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL,
    read_offset INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, user_id)
);
CREATE INDEX members_by_user ON members (user_id, conv);
CREATE TABLE messages (
    conv      TEXT    NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    "offset"  INTEGER NOT NULL,
    client_id TEXT    NOT NULL,
    sender    TEXT    NOT NULL,
    ts        INTEGER NOT NULL,
    body      TEXT    NOT NULL,
    PRIMARY KEY (conv, "offset"),
    UNIQUE (conv, sender, client_id)
);
"#];

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating) the database at `path` and applies migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        // WAL: readers never wait for the writer, and a commit survives a
        // killed process (`synchronous = NORMAL` trades only power loss).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(unavailable)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute_batch(sql).map_err(unavailable)?;
            tx.pragma_update(None, "user_version", i + 1)
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
        }
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| unavailable("store connection poisoned"))?;
            f(&mut conn)
        })
        .await
        .map_err(unavailable)?
    }
}

fn message(conv: &ConvId, r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        conv: conv.clone(),
        offset: r.get::<_, i64>("offset")? as u64,
        id: r.get("client_id")?,
        from: r.get("sender")?,
        ts: r.get::<_, i64>("ts")? as u64,
        body: r.get("body")?,
    })
}

fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_conversation(&self, conv: &ConvId, members: &[String]) -> Result<(), StoreError> {
        let (conv, members) = (conv.clone(), members.to_vec());
        self.call(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO conversations (id, created_at) VALUES (?1, ?2)",
                    params![conv.as_str(), now_millis() as i64],
                )
                .map_err(unavailable)?;
            if inserted == 0 {
                return Err(StoreError::Exists(conv));
            }
            for m in &members {
                tx.execute(
                    "INSERT OR IGNORE INTO members (conv, user_id) VALUES (?1, ?2)",
                    params![conv.as_str(), m],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn add_member(&self, conv: &ConvId, user: &str) -> Result<(), StoreError> {
        let (conv, user) = (conv.clone(), user.to_string());
        self.call(move |c| {
            let exists: bool = c
                .query_row(
                    "SELECT 1 FROM conversations WHERE id = ?1",
                    [conv.as_str()],
                    |_| Ok(true),
                )
                .optional()
                .map_err(unavailable)?
                .unwrap_or(false);
            if !exists {
                return Err(StoreError::NoSuchConversation(conv));
            }
            c.execute(
                "INSERT OR IGNORE INTO members (conv, user_id) VALUES (?1, ?2)",
                params![conv.as_str(), user],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn remove_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        let (conv, user) = (conv.clone(), user.to_string());
        self.call(move |c| {
            let n = c
                .execute(
                    "DELETE FROM members WHERE conv = ?1 AND user_id = ?2",
                    params![conv.as_str(), user],
                )
                .map_err(unavailable)?;
            Ok(n > 0)
        })
        .await
    }

    async fn mark_read(&self, conv: &ConvId, user: &str, offset: u64) -> Result<u64, StoreError> {
        let (conv, user) = (conv.clone(), user.to_string());
        self.call(move |c| {
            c.query_row(
                "UPDATE members SET read_offset = MAX(read_offset,
                     MIN(?3, (SELECT latest_offset FROM conversations WHERE id = ?1)))
                 WHERE conv = ?1 AND user_id = ?2 RETURNING read_offset",
                params![conv.as_str(), user, clamp(offset)],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(unavailable)?
            .map(|o| o as u64)
            .ok_or(StoreError::NotMember(conv))
        })
        .await
    }

    async fn conversations_of(&self, user: &str, limit: u32) -> Result<Vec<ConvSummary>, StoreError> {
        let user = user.to_string();
        self.call(move |c| {
            let mut stmt = c
                .prepare_cached(
                    r#"SELECT c.id, c.latest_offset, m.read_offset,
                              msg."offset", msg.client_id, msg.sender, msg.ts, msg.body
                       FROM members m
                       JOIN conversations c ON c.id = m.conv
                       LEFT JOIN messages msg ON msg.conv = c.id AND msg."offset" = c.latest_offset
                       WHERE m.user_id = ?1
                       ORDER BY msg.ts DESC NULLS LAST, c.id
                       LIMIT ?2"#,
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![user, i64::from(limit)], |r| {
                    let id: String = r.get("id")?;
                    let latest = r.get::<_, i64>("latest_offset")? as u64;
                    let read = r.get::<_, i64>("read_offset")? as u64;
                    let has_last = r.get::<_, Option<i64>>("offset")?.is_some();
                    Ok((id, latest, read, has_last))
                })
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, latest, read, has_last) in rows {
                let conv = ConvId::parse(&id).map_err(|_| unavailable("bad conversation id in database"))?;
                let last_message = if has_last {
                    c.query_row(
                        r#"SELECT "offset", client_id, sender, ts, body FROM messages WHERE conv = ?1 AND "offset" = ?2"#,
                        params![conv.as_str(), latest as i64],
                        |r| message(&conv, r),
                    )
                    .optional()
                    .map_err(unavailable)?
                } else {
                    None
                };
                out.push(ConvSummary {
                    id: conv,
                    latest_offset: latest,
                    read_offset: read,
                    unread: latest - read,
                    last_message,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn is_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        let (conv, user) = (conv.clone(), user.to_string());
        self.call(move |c| {
            c.query_row(
                "SELECT 1 FROM members WHERE conv = ?1 AND user_id = ?2",
                params![conv.as_str(), user],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(unavailable)
        })
        .await
    }

    async fn append(&self, conv: &ConvId, msg: NewMessage) -> Result<Appended, StoreError> {
        let conv = conv.clone();
        self.call(move |c| {
            // IMMEDIATE: the write lock first, so the offset and the retry
            // check see one state (as PostgreSQL's row lock does).
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let existing = tx
                .query_row(
                    r#"SELECT "offset", client_id, sender, ts, body FROM messages
                       WHERE conv = ?1 AND sender = ?2 AND client_id = ?3"#,
                    params![conv.as_str(), msg.from, msg.client_id],
                    |r| message(&conv, r),
                )
                .optional()
                .map_err(unavailable)?;
            let offset: Option<i64> = tx
                .query_row(
                    "UPDATE conversations SET latest_offset = latest_offset + 1 WHERE id = ?1
                     AND (NOT ?3 OR EXISTS (SELECT 1 FROM members WHERE conv = ?1 AND user_id = ?2))
                     RETURNING latest_offset",
                    params![conv.as_str(), msg.from, msg.members_only],
                    |r| r.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            let Some(offset) = offset else {
                return Err(StoreError::NotMember(conv));
            };
            if let Some(message) = existing {
                // A retry: the increment is rolled back with the transaction.
                return Ok(Appended {
                    message,
                    duplicate: true,
                });
            }
            let ts = now_millis() as i64;
            tx.execute(
                r#"INSERT INTO messages (conv, "offset", client_id, sender, ts, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#,
                params![conv.as_str(), offset, msg.client_id, msg.from, ts, msg.body],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(Appended {
                message: Message {
                    conv,
                    offset: offset as u64,
                    id: msg.client_id,
                    from: msg.from,
                    ts: ts as u64,
                    body: msg.body,
                },
                duplicate: false,
            })
        })
        .await
    }

    async fn page(&self, conv: &ConvId, page: Page, limit: u32) -> Result<Vec<Message>, StoreError> {
        let conv = conv.clone();
        self.call(move |c| {
            let (sql, bound) = match page {
                Page::After(after) => (
                    r#"SELECT "offset", client_id, sender, ts, body FROM messages
                       WHERE conv = ?1 AND "offset" > ?2 ORDER BY "offset" LIMIT ?3"#,
                    clamp(after),
                ),
                Page::Before(before) => (
                    r#"SELECT * FROM (SELECT "offset", client_id, sender, ts, body FROM messages
                       WHERE conv = ?1 AND "offset" < ?2 ORDER BY "offset" DESC LIMIT ?3)
                       ORDER BY "offset""#,
                    clamp(before),
                ),
            };
            let mut stmt = c.prepare_cached(sql).map_err(unavailable)?;
            stmt.query_map(params![conv.as_str(), bound, i64::from(limit)], |r| {
                message(&conv, r)
            })
            .map_err(unavailable)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)
        })
        .await
    }

    async fn latest_offset(&self, conv: &ConvId) -> Result<u64, StoreError> {
        let conv = conv.clone();
        self.call(move |c| {
            c.query_row(
                "SELECT latest_offset FROM conversations WHERE id = ?1",
                [conv.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(unavailable)?
            .map(|o| o as u64)
            .ok_or(StoreError::NoSuchConversation(conv))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn keeps_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("chat.sqlite3")).unwrap());
        super::super::contract::check(store, "t").await;
    }

    #[tokio::test]
    async fn history_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/chat.sqlite3");
        let conv = ConvId::parse("c").unwrap();
        {
            let s = SqliteStore::open(&path).unwrap();
            s.create_conversation(&conv, &["ann".into()]).await.unwrap();
            for i in 0..3 {
                let m = NewMessage {
                    client_id: format!("m{i}"),
                    from: "ann".into(),
                    body: "hi".into(),
                    members_only: true,
                };
                s.append(&conv, m).await.unwrap();
            }
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.latest_offset(&conv).await.unwrap(), 3);
        assert!(s.is_member(&conv, "ann").await.unwrap());
        let next = NewMessage {
            client_id: "m3".into(),
            from: "ann".into(),
            body: "again".into(),
            members_only: true,
        };
        assert_eq!(s.append(&conv, next).await.unwrap().message.offset, 4);
    }
}
