//! The in-memory store: bounded, lost on restart. Used by `portico up`.

use std::collections::{HashMap, HashSet, VecDeque};

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{Appended, NewMessage, Page, Store, StoreError, now_millis};
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
    members: HashSet<String>,
    /// Retained messages; `messages[i].offset == first_offset + i`.
    messages: VecDeque<Message>,
    latest: u64,
    /// (sender, client id) → offset, for retained messages only.
    seen: HashMap<(String, String), u64>,
}

#[derive(Default)]
pub struct MemoryStore {
    convs: DashMap<ConvId, Conv>,
    limits: Limits,
}

impl MemoryStore {
    pub fn new(limits: Limits) -> Self {
        MemoryStore {
            convs: DashMap::new(),
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
            Entry::Occupied(_) => Err(StoreError::Exists(conv.clone())),
            Entry::Vacant(v) => {
                v.insert(Conv {
                    members: members.iter().cloned().collect(),
                    ..Conv::default()
                });
                Ok(())
            }
        }
    }

    async fn add_member(&self, conv: &ConvId, user: &str) -> Result<(), StoreError> {
        let mut c = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
        if c.members.len() >= self.limits.members_per_conversation && !c.members.contains(user) {
            return Err(StoreError::Full("too many members"));
        }
        c.members.insert(user.to_string());
        Ok(())
    }

    async fn is_member(&self, conv: &ConvId, user: &str) -> Result<bool, StoreError> {
        Ok(self.convs.get(conv).is_some_and(|c| c.members.contains(user)))
    }

    async fn append(&self, conv: &ConvId, msg: NewMessage) -> Result<Appended, StoreError> {
        let mut c = self
            .convs
            .get_mut(conv)
            .ok_or_else(|| StoreError::NoSuchConversation(conv.clone()))?;
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
    use super::*;

    fn conv() -> ConvId {
        ConvId::parse("c").unwrap()
    }
    fn msg(id: &str) -> NewMessage {
        NewMessage {
            client_id: id.into(),
            from: "u".into(),
            body: "b".into(),
        }
    }

    #[tokio::test]
    async fn offsets_are_dense_and_retries_dedupe() {
        let s = MemoryStore::default();
        s.create_conversation(&conv(), &["u".into()]).await.unwrap();
        assert_eq!(s.append(&conv(), msg("a")).await.unwrap().message.offset, 1);
        assert_eq!(s.append(&conv(), msg("b")).await.unwrap().message.offset, 2);
        let again = s.append(&conv(), msg("a")).await.unwrap();
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
