//! Chat shards on a real Redis Cluster (three masters, three replicas,
//! sharded pub/sub): fan-out, presence and resume across shards, messages
//! travelling only through the node that owns their conversation's slot,
//! and a master killed under load (its replica promoted) with nothing
//! acknowledged lost and live delivery back within seconds.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use portico_tests::client::{Ws, create_conversation, token};
use portico_tests::servers::{ChatCluster, RedisCluster};
use serde_json::json;

fn shard_channels(port: u16) -> String {
    RedisCluster::cli(port, &["pubsub", "shardchannels"])
}

fn classic_channels(port: u16) -> String {
    RedisCluster::cli(port, &["pubsub", "channels"])
}

/// Conversations in different slots, members on both shards, publishers
/// on both at once: every member gets every message once and in order;
/// each conversation's channel is a shard channel on the master owning
/// its slot (and no classic channel exists); presence spans the shards;
/// a client resuming on the other shard gets exactly what it missed.
#[tokio::test]
async fn fan_out_presence_and_resume_on_a_redis_cluster() {
    let mut c = ChatCluster::start_on_redis_cluster(2, &[]);
    let convs = ["alpha", "bravo", "charlie", "delta"];
    let users = ["u1", "u2", "u3", "u4"];
    for conv in convs {
        create_conversation(c.port(0), "u1", conv, &users[1..]).await;
    }
    let mut members = Vec::new();
    for (i, u) in users.iter().enumerate() {
        for conv in convs {
            members.push((conv, Ws::joined(c.port(i % 2), u, conv).await));
        }
    }
    // The subscriptions are sharded and live where their slot lives.
    let rc = c.redis_cluster();
    let mut masters = std::collections::BTreeSet::new();
    for conv in convs {
        let channel = format!("portico:conv:{{{conv}}}");
        let master = rc.master_of(&channel);
        masters.insert(master);
        assert!(
            shard_channels(master).contains(&channel),
            "{channel} is a shard channel on {master}: {}",
            shard_channels(master)
        );
        assert!(classic_channels(master).trim().is_empty());
    }
    assert!(
        masters.len() >= 2,
        "the conversations spread over several masters"
    );

    const PER_PUBLISHER: usize = 25;
    let publishers = (0..4).map(|p| {
        let port = c.port(p % 2);
        async move {
            let mut ws = Ws::connect(port, &token(&format!("u{}", p + 1))).await.unwrap();
            ws.recv().await;
            for i in 0..PER_PUBLISHER {
                for conv in convs {
                    let ack = ws.publish(conv, &format!("p{p}-{i}"), "hello").await;
                    assert_eq!(ack["duplicate"], false);
                }
            }
        }
    });
    join_all(publishers).await;
    let total = 4 * PER_PUBLISHER;
    for (conv, ws) in &mut members {
        assert_eq!(
            ws.offsets(total).await,
            (1..=total as u64).collect::<Vec<_>>(),
            "{conv}"
        );
    }
    for (_, ws) in &mut members {
        assert!(
            ws.no_message_within(Duration::from_millis(200)).await,
            "nothing twice"
        );
    }
    drop(members);

    // Presence across shards, through the cluster's presence keys.
    create_conversation(c.port(0), "alice", "dm", &["bob"]).await;
    let mut alice = Ws::joined(c.port(0), "alice", "dm").await;
    let mut bob = Ws::joined(c.port(1), "bob", "dm").await;
    bob.send(json!({"type": "presence", "conv": "dm"})).await;
    assert_eq!(bob.recv_type("presence").await["users"], json!(["alice", "bob"]));

    // Resume on the other shard.
    alice.publish("dm", "m0", "seen").await;
    let seen = bob.recv_type("message").await["offset"].as_u64().unwrap();
    drop(bob);
    for i in 1..=5 {
        alice
            .publish("dm", &format!("m{i}"), &format!("missed {i}"))
            .await;
    }
    let mut bob = Ws::join(c.port(0), "bob", "dm", Some(seen)).await;
    assert_eq!(bob.recv().await["type"], "subscribed");
    assert_eq!(bob.offsets(5).await, vec![2, 3, 4, 5, 6]);
    alice.publish("dm", "m6", "live").await;
    assert_eq!(bob.recv_type("message").await["offset"], 7);
}

/// A conversation's slot moves to another master (resharding) while its
/// members are subscribed: Redis ends the shard channel's subscriptions,
/// the shards subscribe again where the slot now lives, and messages keep
/// arriving, none lost.
#[tokio::test]
async fn resharding_a_conversation_s_slot_keeps_delivering() {
    let mut c = ChatCluster::start_on_redis_cluster(2, &[]);
    create_conversation(c.port(0), "alice", "moving", &["bob"]).await;
    let mut alice = Ws::joined(c.port(0), "alice", "moving").await;
    let mut bob = Ws::joined(c.port(1), "bob", "moving").await;
    for i in 1..=5 {
        alice.publish("moving", &format!("b{i}"), "before").await;
    }
    assert_eq!(bob.offsets(5).await, vec![1, 2, 3, 4, 5]);
    let channel = "portico:conv:{moving}";
    let to = c.redis_cluster().move_slot_of(channel);
    assert_eq!(c.redis_cluster().master_of(channel), to);
    for i in 6..=10 {
        alice.publish("moving", &format!("a{i}"), "after").await;
    }
    assert_eq!(
        bob.offsets(5).await,
        vec![6, 7, 8, 9, 10],
        "delivered after the move"
    );
    // The subscription lives on the new owner.
    portico_tests::eventually(
        Duration::from_secs(10),
        "resubscribed on the new owner",
        || async { shard_channels(to).contains(channel).then_some(()) },
    )
    .await;
}

/// The master owning a conversation's slot is SIGKILLed while both shards
/// publish: every acknowledged message reaches the member on the other
/// shard (live or caught up from the store), none twice, and once the
/// replica has taken over, a new message arrives live within seconds.
#[tokio::test]
async fn a_master_killed_under_load_loses_nothing_acknowledged() {
    let mut c = ChatCluster::start_on_redis_cluster(2, &[]);
    create_conversation(c.port(0), "alice", "room", &["bob", "carol"]).await;
    let mut bob = Ws::joined(c.port(1), "bob", "room").await;
    let mut carol = Ws::joined(c.port(0), "carol", "room").await;
    let master = c.redis_cluster().master_of("portico:conv:{room}");

    let publish = |port: u16, who: &'static str, from: usize, to: usize| async move {
        let mut ws = Ws::connect(port, &token(who)).await.unwrap();
        ws.recv().await;
        let mut acked = 0;
        for i in from..to {
            let ack = ws.publish("room", &format!("{who}-{i}"), "x").await;
            assert_eq!(ack["duplicate"], false);
            acked += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        acked
    };
    // Two publishers, one per shard, 300 messages each over a few seconds;
    // the master dies a second in.
    let p0 = c.port(0);
    let p1 = c.port(1);
    let before = tokio::spawn(async move {
        let (a, b) = tokio::join!(publish(p0, "alice", 0, 150), publish(p1, "carol", 0, 150));
        a + b
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.redis_cluster().kill(master);
    eprintln!("killed master {master}");
    let acked = tokio::time::timeout(Duration::from_secs(40), before)
        .await
        .expect("publishing went on through the failover")
        .unwrap();
    eprintln!("acked {acked}");
    assert_eq!(acked, 300, "the store acknowledges while the bus fails over");
    c.redis_cluster().wait_ok();
    let new_master = c.redis_cluster().master_of("portico:conv:{room}");
    assert_ne!(new_master, master, "the replica took over");

    eprintln!("new master {new_master}");
    // Everything acknowledged reaches bob (other shard) and carol.
    for (name, ws) in [("bob", &mut bob), ("carol", &mut carol)] {
        assert_eq!(
            ws.offsets(300).await,
            (1..=300).collect::<Vec<_>>(),
            "{name}: every acknowledged message, in order"
        );
    }
    // Live again: a new message arrives within seconds.
    let started = Instant::now();
    let mut alice = Ws::connect(c.port(0), &token("alice")).await.unwrap();
    alice.recv().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    loop {
        n += 1;
        alice.publish("room", &format!("after-{n}"), "live").await;
        if let Some(f) = bob.try_recv(Duration::from_millis(500)).await
            && f["type"] == "message"
        {
            break;
        }
        assert!(Instant::now() < deadline, "no live delivery after the failover");
    }
    eprintln!(
        "live delivery back {:?} after the failover settled ({n} tries)",
        started.elapsed()
    );
}
