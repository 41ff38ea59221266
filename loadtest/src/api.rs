//! `bench --scenarios api`: the chat REST API through the gateway while
//! the `dm` WebSocket load runs beside it (from 3 s after every WebSocket
//! is up, while the messages flow; `p95_ms_by_second` in `api-rest.json`
//! shows where in time the tail sits). An open-loop schedule calls the
//! conversation list, a history page and publish over REST, each at a fixed
//! rate from many users and source addresses; every answer's latency goes
//! into a histogram per endpoint. Seed 002's target: p95 < 200 ms for each.
//! Writes `loadtest/results/api.md` and `api-rest.json` (the WebSocket side: `api.json`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use portico_tests::client::token;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Users calling the API (each with one conversation it shares with the next).
const USERS: usize = 100;
/// Requests per second, per endpoint.
const RATE: u64 = 100;
/// Requests in flight at most; beyond, a scheduled call is counted as not sent.
const IN_FLIGHT: usize = 512;

#[derive(Clone, Copy)]
enum Endpoint {
    List,
    History,
    Publish,
}

impl Endpoint {
    const ALL: [Endpoint; 3] = [Endpoint::List, Endpoint::History, Endpoint::Publish];

    fn name(self) -> &'static str {
        match self {
            Endpoint::List => "GET /api/conversations",
            Endpoint::History => "GET /api/conversations/{id}/messages?limit=50",
            Endpoint::Publish => "POST /api/conversations/{id}/messages",
        }
    }
}

struct Tally {
    hist: Histogram<u64>,
    errors: u64,
    not_sent: u64,
    /// Latency (µs) of the calls started in each second of the run: where
    /// the tail sits in time (a stall, the ramp, or spread evenly).
    by_second: Vec<Histogram<u64>>,
}

fn clients(ca: &[u8], sources: &[IpAddr], https: u16) -> anyhow::Result<Vec<reqwest::Client>> {
    sources
        .iter()
        .map(|ip| {
            Ok(reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(ca)?)
                .resolve("localhost", ([127, 0, 0, 1], https).into())
                .local_address(*ip)
                .timeout(Duration::from_secs(10))
                .build()?)
        })
        .collect()
}

/// The users, their conversations and the clients of the API load, made
/// before the WebSocket load starts.
pub struct Setup {
    clients: Arc<Vec<reqwest::Client>>,
    base: Arc<String>,
    tokens: Arc<Vec<String>>,
    convs: Arc<Vec<String>>,
}

/// Makes the users' conversations (with some history to page) through
/// the gateway on `https`.
pub async fn setup(https: u16, ca: &[u8], sources: &[IpAddr], prefix: &str) -> anyhow::Result<Setup> {
    let clients = Arc::new(clients(ca, sources, https)?);
    let base = Arc::new(format!("https://localhost:{https}"));
    let users: Vec<String> = (0..USERS).map(|i| format!("{prefix}-api{i}")).collect();
    let tokens: Arc<Vec<String>> = Arc::new(users.iter().map(|u| token(u)).collect());
    // Each user's conversation with the next, with some history to page.
    let mut convs = Vec::with_capacity(USERS);
    for (i, u) in users.iter().enumerate() {
        let other = &users[(i + 1) % USERS];
        let c = &clients[i % clients.len()];
        let r: Value = c
            .post(format!("{base}/api/conversations"))
            .bearer_auth(&tokens[i])
            .json(&json!({ "members": [other] }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = r["id"]
            .as_str()
            .or(r["conv"].as_str())
            .unwrap_or_default()
            .to_string();
        anyhow::ensure!(!id.is_empty(), "no conversation id for {u}: {r}");
        for m in 0..20 {
            c.post(format!("{base}/api/conversations/{id}/messages"))
                .bearer_auth(&tokens[i])
                .json(&json!({ "id": format!("seed-{m}"), "body": "seed message" }))
                .send()
                .await?
                .error_for_status()?;
        }
        convs.push(id);
    }
    Ok(Setup {
        clients,
        base,
        tokens,
        convs: Arc::new(convs),
    })
}

/// Runs the API load for `duration`; the per-endpoint results (and
/// whether each p95 is under 200 ms with nothing failed).
pub async fn load(s: Setup, duration: Duration) -> anyhow::Result<(Value, bool)> {
    let Setup {
        clients,
        base,
        tokens,
        convs,
    } = s;
    let tallies: Arc<Vec<Mutex<Tally>>> = Arc::new(
        Endpoint::ALL
            .iter()
            .map(|_| {
                Mutex::new(Tally {
                    hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
                    errors: 0,
                    not_sent: 0,
                    by_second: Vec::new(),
                })
            })
            .collect(),
    );
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let started = Instant::now();
    let mut schedulers = Vec::new();
    for (e_idx, e) in Endpoint::ALL.into_iter().enumerate() {
        let (clients, base, tokens, convs, tallies, slots) = (
            clients.clone(),
            base.clone(),
            tokens.clone(),
            convs.clone(),
            tallies.clone(),
            slots.clone(),
        );
        schedulers.push(tokio::spawn(async move {
            let every = Duration::from_micros(1_000_000 / RATE);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n: u64 = 0;
            let mut inflight = Vec::new();
            while started.elapsed() < duration {
                tick.tick().await;
                n += 1;
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tallies[e_idx].lock().expect("tally").not_sent += 1;
                    continue;
                };
                let u = (n as usize * 7 + e_idx) % USERS;
                let c = clients[u % clients.len()].clone();
                let (base, tok, conv, tallies) =
                    (base.clone(), tokens[u].clone(), convs[u].clone(), tallies.clone());
                inflight.push(tokio::spawn(async move {
                    let t0 = Instant::now();
                    let second = started.elapsed().as_secs() as usize;
                    let req = match e {
                        Endpoint::List => c.get(format!("{base}/api/conversations?limit=20")),
                        Endpoint::History => {
                            c.get(format!("{base}/api/conversations/{conv}/messages?limit=50"))
                        }
                        Endpoint::Publish => c
                            .post(format!("{base}/api/conversations/{conv}/messages"))
                            .json(&json!({ "id": format!("api-{n}"), "body": "hello over REST" })),
                    };
                    let ok = match req.bearer_auth(tok).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    let us = t0.elapsed().as_micros() as u64;
                    let mut t = tallies[e_idx].lock().expect("tally");
                    if ok {
                        let _ = t.hist.record(us.max(1));
                        if t.by_second.len() <= second {
                            t.by_second.resize_with(second + 1, || {
                                Histogram::new_with_bounds(1, 60_000_000, 2).expect("histogram bounds")
                            });
                        }
                        let _ = t.by_second[second].record(us.max(1));
                    } else {
                        t.errors += 1;
                    }
                    drop(permit);
                }));
            }
            for h in inflight {
                let _ = h.await;
            }
        }));
    }
    for s in schedulers {
        s.await?;
    }
    let mut rows = Vec::new();
    let mut ok = true;
    for (i, e) in Endpoint::ALL.iter().enumerate() {
        let t = tallies[i].lock().expect("tally");
        let ms = |q: f64| t.hist.value_at_quantile(q) as f64 / 1000.0;
        let p95 = ms(0.95);
        ok &= p95 < 200.0 && t.errors == 0 && t.not_sent == 0;
        let p95_by_second: Vec<f64> = t
            .by_second
            .iter()
            .map(|h| (h.value_at_quantile(0.95) as f64 / 100.0).round() / 10.0)
            .collect();
        rows.push(json!({
            "endpoint": e.name(), "requests": t.hist.len(), "errors": t.errors, "not_sent": t.not_sent,
            "p50_ms": ms(0.5), "p95_ms": p95, "p99_ms": ms(0.99), "max_ms": t.hist.max() as f64 / 1000.0,
            "p95_ms_by_second": p95_by_second,
        }));
    }
    Ok((
        json!({ "rate_per_endpoint": RATE, "users": USERS, "endpoints": rows }),
        ok,
    ))
}
