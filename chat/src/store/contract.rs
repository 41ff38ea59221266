//! The contract every [`Store`] engine keeps, as one runnable check: the
//! memory and SQLite stores run it in their unit tests, the PostgreSQL
//! store in `tests/` against a real server. It panics on the first broken
//! promise (it is test code, kept in the library so every engine's tests
//! share it). Conversation ids are prefixed with `prefix` so a shared
//! database can host several runs.

use std::sync::Arc;

use super::{NewMessage, Page, Store, StoreError};
use crate::protocol::ConvId;

fn new(id: &str, from: &str) -> NewMessage {
    NewMessage {
        client_id: id.into(),
        from: from.into(),
        body: format!("body of {id}"),
        members_only: true,
    }
}

/// Runs every check against `store`.
pub async fn check(store: Arc<dyn Store>, prefix: &str) {
    let c = ConvId::parse(&format!("{prefix}c")).expect("id");
    let other = ConvId::parse(&format!("{prefix}other")).expect("id");
    let missing = ConvId::parse(&format!("{prefix}missing")).expect("id");
    let s = store.as_ref();

    // Conversations and members.
    s.create_conversation(&c, &["ann".into(), "bob".into()])
        .await
        .expect("create");
    assert!(matches!(
        s.create_conversation(&c, &[]).await,
        Err(StoreError::Exists(_))
    ));
    assert!(s.is_member(&c, "ann").await.unwrap());
    assert!(!s.is_member(&c, "eve").await.unwrap());
    assert!(matches!(
        s.add_member(&missing, "ann").await,
        Err(StoreError::NoSuchConversation(_))
    ));
    assert!(matches!(
        s.latest_offset(&missing).await,
        Err(StoreError::NoSuchConversation(_))
    ));
    assert_eq!(s.latest_offset(&c).await.unwrap(), 0);

    // Offsets 1, 2, 3 …; a retry answers with the stored message.
    for i in 1..=3u64 {
        let a = s.append(&c, new(&format!("m{i}"), "ann")).await.unwrap();
        assert_eq!((a.message.offset, a.duplicate), (i, false));
    }
    let retry = s.append(&c, new("m2", "ann")).await.unwrap();
    assert_eq!((retry.message.offset, retry.duplicate), (2, true));
    assert_eq!(retry.message.body, "body of m2");
    let same_id_other_sender = s.append(&c, new("m2", "bob")).await.unwrap();
    assert_eq!(
        (
            same_id_other_sender.message.offset,
            same_id_other_sender.duplicate
        ),
        (4, false)
    );
    assert_eq!(s.latest_offset(&c).await.unwrap(), 4, "a retry takes no offset");

    // Membership is checked with the append; services may skip it.
    assert!(matches!(
        s.append(&c, new("x", "eve")).await,
        Err(StoreError::NotMember(_))
    ));
    let service = NewMessage {
        members_only: false,
        ..new("svc", "jobs")
    };
    assert_eq!(s.append(&c, service).await.unwrap().message.offset, 5);
    s.add_member(&c, "eve").await.unwrap();
    s.add_member(&c, "eve").await.expect("adding twice is fine");
    assert_eq!(s.append(&c, new("e1", "eve")).await.unwrap().message.offset, 6);
    assert!(s.remove_member(&c, "eve").await.unwrap());
    assert!(!s.remove_member(&c, "eve").await.unwrap());
    assert!(matches!(
        s.append(&c, new("e2", "eve")).await,
        Err(StoreError::NotMember(_))
    ));

    // Pages, oldest first.
    let after: Vec<u64> = s
        .page(&c, Page::After(2), 3)
        .await
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(after, [3, 4, 5]);
    let before: Vec<u64> = s
        .page(&c, Page::Before(5), 2)
        .await
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(before, [3, 4]);
    let newest: Vec<u64> = s
        .page(&c, Page::Before(u64::MAX), 100)
        .await
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(newest, [1, 2, 3, 4, 5, 6]);
    let m = &s.page(&c, Page::After(0), 1).await.unwrap()[0];
    assert_eq!(
        (m.id.as_str(), m.from.as_str(), m.body.as_str()),
        ("m1", "ann", "body of m1")
    );

    // Read receipts: forward only, never past the newest.
    assert_eq!(s.mark_read(&c, "bob", 2).await.unwrap(), 2);
    assert_eq!(s.mark_read(&c, "bob", 1).await.unwrap(), 2, "never back");
    assert_eq!(
        s.mark_read(&c, "bob", 1000).await.unwrap(),
        6,
        "never past the newest"
    );
    assert!(matches!(
        s.mark_read(&c, "eve", 1).await,
        Err(StoreError::NotMember(_))
    ));

    // The conversation list: most recently active first, with unread counts.
    s.create_conversation(&other, &["bob".into()]).await.unwrap();
    let list = s.conversations_of("bob", 10).await.unwrap();
    let mine: Vec<_> = list
        .iter()
        .filter(|x| x.id.as_str().starts_with(prefix))
        .collect();
    assert_eq!(mine.len(), 2, "{list:?}");
    let first = mine.iter().find(|x| x.id == c).unwrap();
    assert_eq!((first.latest_offset, first.read_offset, first.unread), (6, 6, 0));
    assert_eq!(first.last_message.as_ref().map(|m| m.offset), Some(6));
    let empty = mine.iter().find(|x| x.id == other).unwrap();
    assert!(empty.last_message.is_none());
    let ann = s.conversations_of("ann", 10).await.unwrap();
    let ann_c = ann.iter().find(|x| x.id == c).unwrap();
    assert_eq!(ann_c.unread, 6);

    // Concurrent appends: every offset once, none skipped.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (store, c) = (store.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            store
                .append(&c, new(&format!("p{i}"), "ann"))
                .await
                .unwrap()
                .message
                .offset
        }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.unwrap());
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (7..=46).collect::<Vec<_>>());

    // A retry racing its original (a client resending after a reconnect
    // while the first attempt is still in flight): one is stored, the
    // other answers with it, and no offset is taken twice or skipped.
    let mut tasks = Vec::new();
    for i in 0..20 {
        for _ in 0..2 {
            let (store, c) = (store.clone(), c.clone());
            tasks.push(tokio::spawn(async move {
                let a = store.append(&c, new(&format!("r{i}"), "bob")).await.unwrap();
                (i, a.message.offset, a.duplicate)
            }));
        }
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for i in 0..20 {
        let mine: Vec<_> = answers.iter().filter(|a| a.0 == i).collect();
        assert_eq!(mine[0].1, mine[1].1, "both attempts of r{i} name one offset");
        assert_eq!(
            mine.iter().filter(|a| a.2).count(),
            1,
            "one attempt of r{i} is the duplicate"
        );
    }
    let mut offsets: Vec<u64> = answers.iter().filter(|a| !a.2).map(|a| a.1).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (47..=66).collect::<Vec<_>>());
    assert_eq!(
        s.latest_offset(&c).await.unwrap(),
        66,
        "no offset lost to a retry"
    );
    s.ping().await.unwrap();
}
