//! Slow consumers are told why, and prompt readers are never taken for
//! them: clients that stop reading are evicted and each finds close code
//! 4008 when it reads again; a client that sends thousands of requests in a
//! burst while reading its answers is slowed down, not evicted.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use portico_tests::client::{Ws, create_conversation, metrics, token};
use portico_tests::servers::Service;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_that_never_read_are_evicted_and_each_gets_4008() {
    let (_chat, port) = Service::chat(&[
        ("PORTICO_CHAT__OUTBOUND_QUEUE", "16".into()),
        ("PORTICO_CHAT__PUBLISH_PER_SEC", "1000000".into()),
    ]);
    let members: Vec<String> = (0..50).map(|i| format!("sloth{i}")).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    create_conversation(port, "alice", "busy", &refs).await;
    let mut sloths = Vec::new();
    for m in &members {
        let mut ws = Ws::connect_slow(port, &token(m)).await.unwrap();
        ws.send(json!({"type": "subscribe", "conv": "busy"})).await;
        sloths.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut alice = Ws::connect(port, &token("alice")).await.unwrap();
    alice.recv().await;
    let body = "x".repeat(4000);
    let mut sent = 0;
    loop {
        alice.publish("busy", &format!("m{sent}"), &body).await;
        sent += 1;
        if sent % 50 == 0
            && metrics(port)
                .await
                .contains("portico_chat_slow_consumers_total 50")
        {
            break;
        }
        assert!(sent < 5000, "not all fifty evicted after {sent} messages");
    }
    // (While publishing continued and the evicted sockets sat closing.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    // They read at last: behind what was already on its way, the reason.
    // All at once: each may wait for TCP's next zero-window probe, and fifty
    // such waits in a row outlast the test's time on a loaded machine.
    let waits = sloths
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| async move { (i, ws.expect_close_within(Duration::from_secs(60)).await) });
    for (i, code) in futures_util::future::join_all(waits).await {
        assert_eq!(code, 4008, "sloth{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_five_thousand_pings_from_a_reader_is_not_evicted() {
    let (_chat, port) = Service::chat(&[("PORTICO_CHAT__OUTBOUND_QUEUE", "16".into())]);
    let ws = portico_tests::client::ws_direct(port, &token("eager")).await;
    let (mut tx, mut rx) = ws.split();
    const N: usize = 5000;
    let writer = tokio::spawn(async move {
        let ping: Message = Message::Text(json!({"type": "ping"}).to_string().into());
        for _ in 0..N {
            tx.feed(ping.clone()).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    let mut pongs = 0;
    while pongs < N {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"pong\"") => pongs += 1,
            Ok(Some(Ok(Message::Close(f)))) => panic!("closed after {pongs} pongs: {f:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("after {pongs} pongs: {other:?}"),
        }
    }
    let _tx = writer.await.unwrap();
    assert!(
        !metrics(port)
            .await
            .contains("portico_chat_slow_consumers_total 1"),
        "evicted"
    );
}
