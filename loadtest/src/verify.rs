//! `--verify-store`: after a run, the chat store must hold every
//! acknowledged message at the offset its `ack` named, and each of the
//! run's conversations must number its messages 1, 2, 3 … without a gap.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;

use crate::generator::Acked;

/// Checks `acked` against the PostgreSQL chat store at `url`; returns the
/// conversations and messages checked, and the problems found.
pub async fn store(url: &str, prefix: &str, acked: &[Acked]) -> anyhow::Result<(usize, usize, Vec<String>)> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the chat store")?;
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            r#"SELECT conv, "offset", client_id FROM messages WHERE conv LIKE $1 ORDER BY conv, "offset""#,
            &[&format!("{prefix}-c%")],
        )
        .await
        .context("reading the run's messages")?;
    driver.abort();
    let mut stored: BTreeMap<String, HashMap<String, i64>> = BTreeMap::new();
    let mut offsets: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &rows {
        let (conv, offset, id): (String, i64, String) = (r.get(0), r.get(1), r.get(2));
        stored.entry(conv.clone()).or_default().insert(id, offset);
        offsets.entry(conv).or_default().push(offset);
    }
    let mut problems = Vec::new();
    for (conv, list) in &offsets {
        if let Some(at) = list.iter().enumerate().position(|(i, &o)| o != i as i64 + 1) {
            problems.push(format!(
                "store: {conv} has offset {} where {} belongs",
                list[at],
                at + 1
            ));
        }
    }
    let mut missing = 0;
    for (conv, id, offset) in acked {
        match stored.get(conv).and_then(|m| m.get(id)) {
            Some(&o) if o as u64 == *offset => {}
            Some(&o) => problems.push(format!("store: {conv}/{id} acked at {offset}, stored at {o}")),
            None => missing += 1,
        }
    }
    if missing > 0 {
        problems.push(format!(
            "store: {missing} acknowledged messages are not in the store"
        ));
    }
    Ok((offsets.len(), rows.len(), problems))
}
