//! The in-memory store: bounded, lost on restart. Used by `portico up`.

use std::collections::{HashMap, HashSet, VecDeque};

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{Appended, ConvSummary, NewMessage, Page, Store, StoreError, now_millis};
use crate::protocol::{ConvId, Message};

/// Limits that keep memory bounded whatever clients do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_conversations: usize,
    /// Older messages are forgotten (offsets keep counting).
    pub messages_per_conversation: usize,
    pub members_per_conversation: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conversations: 100_000,
            messages_per_conversation: 5_000,
            members_per_conversation: 10_000,
        }
    }
}

#[derive(Default)]
struct Conv {
    /// Member → read receipt (last offset read).
    members: HashMap<String, u64>,
    /// Retained messages; `messages[i].offset == first_offset + i`.
    messages: VecDeque<Message>,
    latest: u64,
    /// (sender, client id) → offset, for retained messages only.
    seen: HashMap<(String, String), u64>,
}

#[derive(Default)]
pub struct MemoryStore {
    convs: DashMap<ConvId, Conv>,
    /// User → their conversations. Locked only after (never while holding)
    /// a `convs` entry is released, so the two maps cannot deadlock.
    by_user: DashMap<String, HashSet<ConvId>>,
    limits: Limits,
}

impl MemoryStore {
    pub fn new(limits: Limits) -> Self {
        MemoryStore {
            convs: DashMap::new(),
            by_user: DashMap::new(),
            limits,
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_conversation(&self, conv: &ConvId, members: &[String]) -> Result<(), StoreError> {
        if self.convs.len() >= self.limits.max_conversations {
            return Err(StoreError::Full("too many conversations"));
        }
        if members.len() > self.limits.members_per_conversation {
            return Err(StoreError::Full("too many members"));
        }
        match self.convs.entry(conv.clone()) {
            Entry::Occupied(_) => return Err(StoreError::Exists(conv.clone())),
            Entry::Vacant(v) => {
                v.insert(Conv {
                    members: members.iter().map(|m| (m.clone(), 0)).collect(),
                    ..Conv::default()
                });
            }
        }
        for m in members {
            self.by_user.entry(m.clone()).or_default().insert(conv.clone());
        }
        Ok(())
    }

    async fn add_member(&self, conv: &ConvId, user: &str) -> Result<(), StoreError> {
        let mut c = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
        if c.members.len() >= self.limits.members_per_conversation && !c.members.contains_key(user) {
            return Err(StoreError::Full("too many members"));
        }
        c.members.entry(user.to_string()).or_insert(0);
        drop(c);
        self.by_user
            .entry(user.to_string())
            .or_default()
            .insert(conv.clone());
        Ok(())
    }

    async fn remove_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        let mut c = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
        let was = c.members.remove(user).is_some();
        drop(c);
        if let Some(mut convs) = self.by_user.get_mut(user) {
            convs.remove(conv);
        }
        self.by_user.remove_if(user, |_, convs| convs.is_empty());
        Ok(was)
    }

    async fn mark_read(&self, conv: &ConvId, user: &str, offset: u64) -> Result<u64, StoreError> {
        let mut c = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
        let latest = c.latest;
        let read = c
            .members
            .get_mut(user)
            .ok_or_else(|| StoreError::NotMember(conv.clone()))?;
        *read = (*read).max(offset.min(latest));
        Ok(*read)
    }

    async fn conversations_of(&self, user: &str, limit: u32) -> Result<Vec<ConvSummary>, StoreError> {
        let ids: Vec<ConvId> = self
            .by_user
            .get(user)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default();
        let mut out: Vec<ConvSummary> = ids
            .iter()
            .filter_map(|id| {
                let c = self.convs.get(id)?;
                let read_offset = *c.members.get(user)?;
                Some(ConvSummary {
                    id: id.clone(),
                    latest_offset: c.latest,
                    read_offset,
                    unread: c.latest - read_offset,
                    last_message: c.messages.back().cloned(),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            let ts = |s: &ConvSummary| s.last_message.as_ref().map_or(0, |m| m.ts);
            ts(b).cmp(&ts(a)).then_with(|| a.id.cmp(&b.id))
        });
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn is_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        Ok(self.convs.get(conv).is_some_and(|c| c.members.contains_key(user)))
    }

    async fn append(&self, conv: &ConvId, msg: NewMessage) -> Result<Appended, StoreError> {
        let mut c = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
        if msg.members_only && !c.members.contains_key(&msg.from) {
            return Err(StoreError::NotMember(conv.clone()));
        }
        let key = (msg.from, msg.client_id);
        if let Some(&offset) = c.seen.get(&key) {
            let first = c.messages.front().map_or(0, |m| m.offset);
            let message = c.messages[(offset - first) as usize].clone();
            return Ok(Appended {
                message,
                duplicate: true,
            });
        }
        c.latest += 1;
        let message = Message {
            conv: conv.clone(),
            offset: c.latest,
            id: key.1.clone(),
            from: key.0.clone(),
            ts: now_millis(),
            body: msg.body,
        };
        c.seen.insert(key, message.offset);
        c.messages.push_back(message.clone());
        if c.messages.len() > self.limits.messages_per_conversation
            && let Some(old) = c.messages.pop_front()
        {
            c.seen.remove(&(old.from, old.id));
        }
        Ok(Appended {
            message,
            duplicate: false,
        })
    }

    async fn page(&self, conv: &ConvId, page: Page, limit: u32) -> Result<Vec<Message>, StoreError> {
        let c = self
            .convs
            .get(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
        let limit = limit as usize;
        let out = match page {
            Page::After(after) => c
                .messages
                .iter()
                .skip_while(|m| m.offset <= after)
                .take(limit)
                .cloned()
                .collect(),
            Page::Before(before) => {
                let below: Vec<&Message> = c.messages.iter().take_while(|m| m.offset < before).collect();
                below[below.len().saturating_sub(limit)..]
                    .iter()
                    .map(|m| (*m).clone())
                    .collect()
            }
        };
        Ok(out)
    }

    async fn latest_offset(&self, conv: &ConvId) -> Result<u64, StoreError> {
        self.convs
            .get(conv)
            .map(|c| c.latest)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread")]
    async fn keeps_the_store_contract() {
        let store = std::sync::Arc::new(super::MemoryStore::default());
        crate::store::contract::check(store, "t").await;
    }

    use super::*;

    fn conv() -> ConvId {
        ConvId::parse("c").unwrap()
    }
    fn msg(id: &str) -> NewMessage {
        NewMessage {
            client_id: id.into(),
            from: "u".into(),
            body: "b".into(),
            members_only: false,
        }
    }

    #[tokio::test]
    async fn offsets_are_dense_and_retries_dedupe() {
        let s = MemoryStore::default();
        s.create_conversation(&conv(), &["u".into()]).await.unwrap();
        assert_eq!(s.append(&conv(), msg("a")).await.unwrap().message.offset, 1);
        assert_eq!(s.append(&conv(), msg("b")).await.unwrap().message.offset, 2);
        let again = s.append(&conv(), msg("a")).await.unwrap();
        let stranger = NewMessage {
            from: "eve".into(),
            members_only: true,
            ..msg("z")
        };
        assert!(matches!(
            s.append(&conv(), stranger).await,
            Err(StoreError::NotMember(_))
        ));
        assert_eq!(
            s.mark_read(&conv(), "u", 99).await.unwrap(),
            2,
            "capped at the newest"
        );
        assert_eq!(s.mark_read(&conv(), "u", 1).await.unwrap(), 2, "never back");
        let list = s.conversations_of("u", 10).await.unwrap();
        assert_eq!((list.len(), list[0].unread), (1, 0));
        assert!(again.duplicate);
        assert_eq!(again.message.offset, 1);
        assert_eq!(s.latest_offset(&conv()).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn pages_and_bounds() {
        let limits = Limits {
            messages_per_conversation: 3,
            ..Limits::default()
        };
        let s = MemoryStore::new(limits);
        s.create_conversation(&conv(), &[]).await.unwrap();
        for i in 0..5 {
            s.append(&conv(), msg(&format!("m{i}"))).await.unwrap();
        }
        let after: Vec<u64> = s
            .page(&conv(), Page::After(3), 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(after, vec![4, 5]);
        let before: Vec<u64> = s
            .page(&conv(), Page::Before(5), 1)
            .await
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(before, vec![4]);
        assert_eq!(
            s.page(&conv(), Page::After(0), 10).await.unwrap().len(),
            3,
            "bounded"
        );
    }
}
