//! The chat page in a real browser (Debian's headless Chromium through
//! chromedriver), against `portico up`: two people start a 1:1
//! conversation, see each other online and typing, exchange messages and
//! read receipts; the server is killed and started again, and both pages
//! reconnect by themselves and keep chatting, with nothing lost, no reload
//! and no console error. Screenshots go to `target/screenshots/`.

use std::time::Duration;

use fantoccini::{Client, Locator};
use portico_tests::browser::{WATCH_ERRORS, browser, chromedriver, errors, screenshot, text_of};
use portico_tests::servers::{up_env, up_in};

async fn open(c: &Client, https: u16, name: &str) {
    c.goto(&format!("https://localhost:{https}/")).await.unwrap();
    c.execute(WATCH_ERRORS, vec![]).await.unwrap();
    c.find(Locator::Id("user"))
        .await
        .unwrap()
        .send_keys(name)
        .await
        .unwrap();
    c.find(Locator::Css("#login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(c, "#status", "online", "online").await;
    assert!(
        !c.find(Locator::Id("login"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "the login form goes away"
    );
}

async fn say(c: &Client, text: &str) {
    c.find(Locator::Id("body"))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
    c.find(Locator::Css("#send button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_people_chat_through_a_server_restart() {
    let Some((_driver, driver)) = chromedriver() else {
        return;
    };
    let (env, edge) = up_env(&[]);
    let mut svc = up_in(tempfile::tempdir().unwrap(), &env, &edge);
    let profiles = tempfile::tempdir().unwrap();
    let ana = browser(driver, &profiles.path().join("ana")).await;
    let ben = browser(driver, &profiles.path().join("ben")).await;
    open(&ana, edge.https, "ana").await;
    open(&ben, edge.https, "ben").await;

    // Ana starts a 1:1 with Ben; it appears in Ben's list.
    ana.find(Locator::Id("with"))
        .await
        .unwrap()
        .send_keys("ben")
        .await
        .unwrap();
    ana.find(Locator::Css("#start button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&ana, "#title", "ben", "the conversation with ben").await;
    text_of(&ben, "#convs", "ana", "the conversation in ben's list").await;
    ben.find(Locator::Css("#convs li[data-conv='dm-ana-ben']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&ana, "#presence", "ben", "ben online").await;
    text_of(&ben, "#presence", "ana", "ana online").await;

    // Typing, messages, read receipts.
    ben.find(Locator::Id("body"))
        .await
        .unwrap()
        .send_keys("hel")
        .await
        .unwrap();
    text_of(&ana, "#typing", "ben is typing", "the typing indicator").await;
    ben.find(Locator::Id("body"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    say(
        &ben,
        "hello ana, a-very-long-word-that-must-wrap-instead-of-overflowing-the-layout-of-the-page-at-all",
    )
    .await;
    text_of(&ana, "#log", "hello ana", "ben's message").await;
    say(&ana, "hi ben").await;
    text_of(&ben, "#log", "hi ben", "ana's message").await;
    text_of(&ben, "#log", "read by ana", "ana's read receipt").await;
    text_of(&ana, "#log", "read by ben", "ben's read receipt").await;
    screenshot(&ana, "chat-ana-before-restart").await;
    screenshot(&ben, "chat-ben-before-restart").await;

    // The server dies and comes back on the same data: the pages carry on.
    svc.proc.signal("KILL");
    svc.proc.wait_exit(Duration::from_secs(10));
    text_of(&ana, "#status", "reconnecting", "ana's page noticing").await;
    let dir = std::mem::replace(&mut svc.dir, tempfile::tempdir().unwrap());
    drop(svc);
    let _svc = up_in(dir, &env, &edge);
    text_of(&ana, "#status", "online", "ana back online").await;
    text_of(&ben, "#status", "online", "ben back online").await;
    say(&ana, "still here?").await;
    text_of(&ben, "#log", "still here?", "a message after the restart").await;
    say(&ben, "yes").await;
    let log = text_of(&ana, "#log", "yes", "the answer after the restart").await;
    for want in ["hello ana", "hi ben", "still here?", "yes"] {
        assert!(log.contains(want), "nothing lost: {want} in {log}");
    }
    screenshot(&ana, "chat-ana-after-restart").await;
    screenshot(&ben, "chat-ben-after-restart").await;

    // The long word wraps: the log is no wider than its box.
    let overflow = ben
        .execute(
            "const l = document.getElementById('log'); return l.scrollWidth - l.clientWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "horizontal overflow: {overflow}"
    );
    for (who, c) in [("ana", &ana), ("ben", &ben)] {
        assert_eq!(errors(c).await, Vec::<String>::new(), "{who}'s console");
    }
    ana.close().await.unwrap();
    ben.close().await.unwrap();
}
