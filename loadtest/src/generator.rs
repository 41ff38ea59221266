//! The load generator: C connections in conversations of S members, M
//! messages per second for D seconds; latency, and an exact account of
//! every acknowledged message.
//!
//! It behaves as the chat protocol asks of clients, so that faults show up
//! as what they cost, not as artefacts: a connection that ends (close frame
//! or not) reconnects with exponential backoff and jitter, resumes its
//! subscription from the last offset it saw and re-sends every publish not
//! yet acknowledged, with the same id.
//!
//! The account is per message, not netted: each member records where it
//! subscribed (it expects every later message), the newest offset delivered
//! and the offsets it was skipped over; each `ack` names an offset. At the
//! end, **lost** = acknowledged offsets never delivered to a member that
//! stayed subscribed (connected at the end); a repeated offset is a
//! **duplicate**, a skipped one delivered later a **reorder**. Members that
//! were not connected at the end are reported as dead, not counted.
//! Every message body starts with its send time (microseconds since the run
//! began) for the publish→receive latency histogram.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use portico_common::auth::Tokens;
use portico_config::Secret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::report::Report;

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// `ws://host:port/ws` or `wss://…`; with several, connections go to
    /// them in turn (e.g. straight to each shard).
    pub urls: Vec<url::Url>,
    /// Base URL of the chat REST API (`http(s)://host:port`), used to create
    /// the conversations with a service token.
    pub api: url::Url,
    /// PEM certificate(s) to trust for wss/https (self-signed gateway).
    pub ca: Option<Vec<u8>>,
    /// The deployment's JWT secret (tokens are minted for synthetic users).
    pub secret: Secret,
    pub connections: usize,
    pub connect_rate: u32,
    pub group_size: usize,
    /// Messages per second in total; 0 holds connections idle.
    pub rate: u32,
    pub duration: Duration,
    /// Local addresses to connect from (more than ~28k connections to one
    /// server address need several: 127.0.0.2, 127.0.0.3, …).
    pub sources: Vec<IpAddr>,
    pub body_bytes: usize,
    /// Prefix of user and conversation ids, unique per run.
    pub prefix: String,
    /// How long to wait after the last publish for deliveries to arrive.
    pub drain: Duration,
    /// Test hook: connection 0 ignores its first delivery, as if it never
    /// arrived (the run must then report it lost and fail).
    pub drop_one_delivery: bool,
}

/// Live counters shared by all connection tasks (progress while running;
/// the exact account comes from the [`Member`]s at the end).
#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    failed: AtomicUsize,
    sent: AtomicU64,
    acked: AtomicU64,
    publish_errors: AtomicU64,
    not_sent_backlog: AtomicU64,
    received: AtomicU64,
    reconnects: AtomicU64,
    /// Microseconds since the epoch of the last ack and delivery, and the
    /// longest stretch without one (how long a fault stopped the flow).
    last_ack: AtomicU64,
    last_delivery: AtomicU64,
    ack_gap: AtomicU64,
    delivery_gap: AtomicU64,
    /// Error frames by code (codes are a small fixed set).
    error_codes: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// What one connection saw over the whole run, handed back at its end.
#[derive(Debug, Default, Clone)]
pub struct Member {
    pub conv: usize,
    /// The conversation's newest offset when this member first subscribed:
    /// every later message is expected.
    pub initial: Option<u64>,
    /// Newest offset delivered.
    pub last: u64,
    /// Offsets jumped over (inclusive ranges), until delivered late.
    pub gaps: Vec<(u64, u64)>,
    pub received: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// (offset, publish sequence number) of this member's acks (re-sends
    /// may repeat them).
    pub acked: Vec<(u64, u64)>,
    /// Connected (and subscribed) when the run stopped.
    pub connected_at_end: bool,
    /// Its resume was refused (more missed than the server replays).
    pub resume_failed: bool,
    pub reconnects: u64,
    /// How its connections ended: close code (1006: no close frame).
    pub closes: std::collections::BTreeMap<u16, u64>,
    /// Longest time from losing a connection to being subscribed again.
    pub longest_outage: Duration,
    /// Publishes never acknowledged (still pending at the end).
    pub unacked: u64,
}

impl Member {
    /// Whether offset `o` reached this member.
    fn got(&self, o: u64) -> bool {
        o <= self.last && !self.gaps.iter().any(|&(a, b)| (a..=b).contains(&o))
    }

    /// Records a delivered offset.
    fn deliver(&mut self, o: u64) -> bool {
        self.received += 1;
        if o <= self.last {
            match self.gaps.iter().position(|&(a, b)| (a..=b).contains(&o)) {
                Some(i) => {
                    let (a, b) = self.gaps.remove(i);
                    if a < o {
                        self.gaps.push((a, o - 1));
                    }
                    if o < b {
                        self.gaps.push((o + 1, b));
                    }
                    self.reorders += 1;
                }
                None => self.duplicates += 1,
            }
            return false;
        }
        if o > self.last + 1 {
            self.gaps.push((self.last + 1, o - 1));
        }
        self.last = o;
        true
    }
}

/// The exact account over all members.
#[derive(Debug, Clone, Default)]
pub struct Account {
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub received: u64,
    pub acked_messages: u64,
    pub dead_connections: u64,
    pub resume_failed: u64,
    pub reconnects: u64,
    pub closes: std::collections::BTreeMap<u16, u64>,
    pub longest_outage: Duration,
    pub unacked: u64,
}

/// Settles the account: per conversation, every acknowledged offset must
/// have reached every member that subscribed before it and stayed.
pub fn account(members: &[Member], convs: usize) -> Account {
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); convs];
    for m in members {
        acked[m.conv].extend(m.acked.iter().map(|&(o, _)| o));
    }
    for a in &mut acked {
        a.sort_unstable();
        a.dedup();
    }
    let mut out = Account {
        acked_messages: acked.iter().map(|a| a.len() as u64).sum(),
        ..Account::default()
    };
    for m in members {
        out.duplicates += m.duplicates;
        out.reorders += m.reorders;
        out.received += m.received;
        out.reconnects += m.reconnects;
        out.unacked += m.unacked;
        out.longest_outage = out.longest_outage.max(m.longest_outage);
        for (code, n) in &m.closes {
            *out.closes.entry(*code).or_default() += n;
        }
        let Some(initial) = m.initial else { continue };
        if !m.connected_at_end {
            out.dead_connections += 1;
            continue;
        }
        if m.resume_failed {
            out.resume_failed += 1;
            continue;
        }
        for &o in acked[m.conv].iter().filter(|&&o| o > initial) {
            out.expected += 1;
            if !m.got(o) {
                out.lost += 1;
            }
        }
    }
    out
}

/// Latency histograms, sharded so that recording rarely contends.
struct Latencies(Vec<Mutex<Histogram<u64>>>);

const SHARDS: usize = 16;

impl Latencies {
    fn new() -> Self {
        Latencies((0..SHARDS).map(|_| Mutex::new(new_histogram())).collect())
    }
    fn record(&self, slot: usize, micros: u64) {
        let mut h = self.0[slot % SHARDS].lock().expect("histogram lock");
        let _ = h.record(micros.max(1));
    }
    fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in &self.0 {
            let _ = all.add(&*h.lock().expect("histogram lock"));
        }
        all
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type Ws = WebSocketStream<Pin<Box<dyn Io>>>;

/// One connection's handle for the scheduler: publishes (sequence number,
/// frame) go to the connection's task, which keeps them until acknowledged.
struct Conn {
    conv: usize,
    tx: mpsc::Sender<(u64, Utf8Bytes)>,
}

/// Runs a scenario to the end and reports.
pub async fn run(s: Scenario) -> anyhow::Result<Report> {
    Ok(run_with_acks(s).await?.0)
}

/// One acknowledged publish: conversation id, client id, offset.
pub type Acked = (String, String, u64);

/// [`run`], and every acknowledged publish (for `verify::store`).
pub async fn run_with_acks(s: Scenario) -> anyhow::Result<(Report, Vec<Acked>)> {
    anyhow::ensure!(
        s.connections > 0 && s.group_size > 0,
        "connections and group size must be positive"
    );
    anyhow::ensure!(!s.sources.is_empty(), "at least one source address");
    anyhow::ensure!(!s.urls.is_empty(), "at least one URL");
    let fds = crate::sys::raise_fd_limit();
    anyhow::ensure!(
        fds as usize > s.connections + 64,
        "open-file limit {fds} is too low for {} connections",
        s.connections
    );
    let tokens = Tokens::new(&s.secret);
    let convs = s.connections.div_ceil(s.group_size);
    let tls = s.ca.as_deref().map(tls_config).transpose()?;
    create_conversations(&s, &tokens, convs).await?;

    let stats = Arc::new(Stats::default());
    let lat = Arc::new(Latencies::new());
    let connect_lat = Arc::new(Mutex::new(new_histogram()));
    let stop = CancellationToken::new();
    let epoch = Instant::now();
    let mut addrs = Vec::new();
    for u in &s.urls {
        addrs.push(target_addr(u).await?);
    }

    // Ramp up at the connect rate.
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(s.connections);
    let mut tasks = tokio::task::JoinSet::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<(usize, Option<Conn>)>();
    let gap = Duration::from_secs_f64(1.0 / f64::from(s.connect_rate.max(1)));
    let mut tick = tokio::time::interval(gap);
    let ramp_start = Instant::now();
    for i in 0..s.connections {
        tick.tick().await;
        let ctx = ConnCtx {
            index: i,
            conv: i / s.group_size,
            user: format!("{}-u{i}", s.prefix),
            conv_id: format!("{}-c{}", s.prefix, i / s.group_size),
            source: s.sources[i % s.sources.len()],
            addr: addrs[i % addrs.len()],
            url: s.urls[i % s.urls.len()].clone(),
            tls: tls.clone(),
            token: tokens.issue(&format!("{}-u{i}", s.prefix), &[], Duration::from_secs(3600)),
            stats: stats.clone(),
            lat: lat.clone(),
            connect_lat: connect_lat.clone(),
            stop: stop.clone(),
            epoch,
            ready: ready_tx.clone(),
            drop_one: s.drop_one_delivery && i == 0,
        };
        tasks.spawn(connection(ctx));
    }
    drop(ready_tx);
    conns.resize_with(s.connections, || None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut reported = 0;
    while reported < s.connections {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some((i, conn))) => {
                conns[i] = conn;
                reported += 1;
            }
            _ => break,
        }
    }
    let ramp = ramp_start.elapsed();
    let cpu_start = crate::sys::self_cpu_time();
    // Gaps count from the publish phase on, not from the ramp.
    for a in [
        &stats.ack_gap,
        &stats.last_ack,
        &stats.delivery_gap,
        &stats.last_delivery,
    ] {
        a.store(0, Relaxed);
    }

    // Open loop: message n is due at n / rate seconds, whatever happens.
    let live: Vec<&Conn> = conns.iter().flatten().collect();
    let started = Instant::now();
    if s.rate > 0 && !live.is_empty() {
        let body_pad = "x".repeat(s.body_bytes.saturating_sub(24));
        let mut seq: u64 = 0;
        let total = (f64::from(s.rate) * s.duration.as_secs_f64()) as u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while seq < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * f64::from(s.rate)) as u64).min(total);
            while seq < due {
                let c = live[(seq as usize) % live.len()];
                let sent_at = epoch.elapsed().as_micros() as u64;
                let frame = json!({
                    "type": "publish",
                    "conv": format!("{}-c{}", s.prefix, c.conv),
                    "id": format!("m{seq}"),
                    "body": format!("{sent_at}|{body_pad}"),
                });
                if c.tx.try_send((seq, frame.to_string().into())).is_ok() {
                    stats.sent.fetch_add(1, Relaxed);
                } else {
                    stats.not_sent_backlog.fetch_add(1, Relaxed);
                }
                seq += 1;
            }
        }
    } else {
        tokio::time::sleep(s.duration).await;
    }
    let publish_time = started.elapsed();
    // Let in-flight deliveries land: wait while anything still arrives,
    // until `drain` passes without progress (at most a minute), so a slow
    // server shows up as latency, not as loss.
    let mut last_progress = Instant::now();
    let mut seen = (0, 0);
    let hard_stop = Instant::now() + Duration::from_secs(60);
    while Instant::now() < hard_stop && last_progress.elapsed() < s.drain {
        let now = (
            stats.received.load(Relaxed),
            stats.acked.load(Relaxed) + stats.publish_errors.load(Relaxed),
        );
        if now != seen {
            seen = now;
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = crate::sys::self_cpu_time().saturating_sub(cpu_start);
    stop.cancel();
    drop(conns);
    let mut members = Vec::with_capacity(s.connections);
    while let Some(m) = tasks.join_next().await {
        members.push(m?);
    }
    let account = account(&members, convs);
    let mut acked: Vec<Acked> = members
        .iter()
        .flat_map(|m| {
            let conv = format!("{}-c{}", s.prefix, m.conv);
            m.acked
                .iter()
                .map(move |&(o, seq)| (conv.clone(), format!("m{seq}"), o))
        })
        .collect();
    acked.sort();
    acked.dedup();

    let latency = lat.merged();
    let connect = connect_lat.lock().expect("histogram lock").clone();
    let report = Report::new(
        &s,
        &stats_snapshot(&stats),
        &account,
        &latency,
        &connect,
        ramp,
        publish_time,
        cpu,
    );
    Ok((report, acked))
}

/// The live counters at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub longest_ack_gap: Duration,
    pub longest_delivery_gap: Duration,
    pub connected: u64,
    pub failed: u64,
    pub sent: u64,
    pub acked: u64,
    pub publish_errors: u64,
    pub not_sent_backlog: u64,
    pub error_codes: std::collections::BTreeMap<String, u64>,
}

fn stats_snapshot(s: &Stats) -> Counts {
    Counts {
        longest_ack_gap: Duration::from_micros(s.ack_gap.load(Relaxed)),
        longest_delivery_gap: Duration::from_micros(s.delivery_gap.load(Relaxed)),
        connected: s.connected.load(Relaxed) as u64,
        failed: s.failed.load(Relaxed) as u64,
        sent: s.sent.load(Relaxed),
        acked: s.acked.load(Relaxed),
        publish_errors: s.publish_errors.load(Relaxed),
        not_sent_backlog: s.not_sent_backlog.load(Relaxed),
        error_codes: s.error_codes.lock().expect("stats lock").clone(),
    }
}

struct ConnCtx {
    index: usize,
    conv: usize,
    user: String,
    conv_id: String,
    source: IpAddr,
    addr: SocketAddr,
    url: url::Url,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
    stats: Arc<Stats>,
    lat: Arc<Latencies>,
    connect_lat: Arc<Mutex<Histogram<u64>>>,
    stop: CancellationToken,
    epoch: Instant,
    ready: mpsc::UnboundedSender<(usize, Option<Conn>)>,
    drop_one: bool,
}

/// Attempts at the first connection before it counts as failed.
const FIRST_ATTEMPTS: u32 = 3;

/// Backoff before reconnect attempt `n` (1, 2, …): 50 ms doubling up to
/// 2 s, with full jitter, so that clients cut at once do not return at once.
fn backoff(n: u32) -> Duration {
    let cap = Duration::from_millis(50 << n.min(6)).min(Duration::from_secs(2));
    cap.mul_f64(rand::random::<f64>())
}

/// One synthetic client for the whole run: connect and subscribe; then
/// publish what the scheduler hands over and account for what arrives; on
/// any end of the connection, reconnect, resume and re-send.
async fn connection(ctx: ConnCtx) -> Member {
    let mut m = Member {
        conv: ctx.conv,
        ..Member::default()
    };
    let (tx, mut rx) = mpsc::channel::<(u64, Utf8Bytes)>(64);
    let mut tx = Some(tx);
    // Publishes sent and not yet acknowledged, re-sent after a reconnect.
    let mut pending: Vec<(u64, Utf8Bytes)> = Vec::new();
    let mut dropped = !ctx.drop_one;
    let t0 = Instant::now();
    let mut attempt = 0;
    let mut down_since: Option<Instant> = None;
    let mut rx_open = true;
    'run: loop {
        let since = m.initial.map(|_| m.last);
        let (mut ws, subscribed) = match open(&ctx, since).await {
            Ok(x) => x,
            Err(e) => {
                attempt += 1;
                if m.initial.is_none() && attempt >= FIRST_ATTEMPTS {
                    if ctx.stats.failed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("connection {} ({}) failed: {e:#}", ctx.index, ctx.user);
                    }
                    let _ = ctx.ready.send((ctx.index, None));
                    return m;
                }
                if format!("{e:#}").contains("resume_too_far") {
                    // It cannot catch up from here: from now on it only
                    // counts as a connection, not as a member that stayed.
                    m.resume_failed = true;
                    m.initial = None;
                }
                tokio::select! {
                    _ = ctx.stop.cancelled() => break 'run,
                    _ = tokio::time::sleep(backoff(attempt)) => continue 'run,
                }
            }
        };
        attempt = 0;
        match m.initial {
            None if m.resume_failed => {
                m.initial = Some(subscribed);
                m.last = subscribed;
            }
            None => {
                m.initial = Some(subscribed);
                m.last = subscribed;
                let _ = ctx
                    .connect_lat
                    .lock()
                    .expect("histogram lock")
                    .record(t0.elapsed().as_micros() as u64);
                ctx.stats.connected.fetch_add(1, Relaxed);
                let conn = tx.take().map(|tx| Conn { conv: ctx.conv, tx });
                let _ = ctx.ready.send((ctx.index, conn));
            }
            Some(_) => {
                m.reconnects += 1;
                ctx.stats.reconnects.fetch_add(1, Relaxed);
            }
        }
        if let Some(d) = down_since.take() {
            m.longest_outage = m.longest_outage.max(d.elapsed());
        }
        let mut ended = None;
        for (_, text) in &pending {
            if ws.send(Message::Text(text.clone())).await.is_err() {
                ended = Some(1006);
                break;
            }
        }
        while ended.is_none() {
            tokio::select! {
                _ = ctx.stop.cancelled() => {
                    m.connected_at_end = true;
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break 'run;
                }
                out = rx.recv(), if rx_open => {
                    let Some((seq, text)) = out else {
                        rx_open = false;
                        continue;
                    };
                    pending.push((seq, text.clone()));
                    if ws.send(Message::Text(text)).await.is_err() {
                        ended = Some(1006);
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => on_frame(&ctx, &text, &mut m, &mut pending, &mut dropped),
                    Some(Ok(Message::Close(f))) => ended = Some(f.map_or(1005, |f| u16::from(f.code))),
                    Some(Ok(_)) => {}
                    // No close frame: what a browser reports as 1006.
                    None | Some(Err(_)) => ended = Some(1006),
                },
            }
        }
        *m.closes.entry(ended.unwrap_or(1006)).or_default() += 1;
        down_since = Some(Instant::now());
    }
    m.unacked = pending.len() as u64;
    m
}

/// Notes an event now in `last`, and the time since the previous one in
/// `longest` if it is the longest yet.
fn stretch(last: &AtomicU64, longest: &AtomicU64, epoch: Instant) {
    let now = epoch.elapsed().as_micros() as u64;
    let before = last.swap(now, Relaxed);
    if before > 0 {
        longest.fetch_max(now.saturating_sub(before), Relaxed);
    }
}

fn on_frame(
    ctx: &ConnCtx,
    text: &str,
    m: &mut Member,
    pending: &mut Vec<(u64, Utf8Bytes)>,
    dropped: &mut bool,
) {
    let Ok(f) = serde_json::from_str::<Value>(text) else {
        return;
    };
    // Publish ids are `m<seq>`.
    let seq_of = |f: &Value| {
        f["id"]
            .as_str()
            .and_then(|id| id.strip_prefix('m'))
            .and_then(|n| n.parse::<u64>().ok())
    };
    match f["type"].as_str() {
        Some("message") => {
            let offset = f["offset"].as_u64().unwrap_or(0);
            ctx.stats.received.fetch_add(1, Relaxed);
            if !*dropped {
                // The test hook: as if this delivery never arrived.
                *dropped = true;
                return;
            }
            if !m.deliver(offset) {
                return;
            }
            stretch(&ctx.stats.last_delivery, &ctx.stats.delivery_gap, ctx.epoch);
            if let Some(sent) = f["body"]
                .as_str()
                .and_then(|b| b.split('|').next())
                .and_then(|t| t.parse::<u64>().ok())
            {
                let now = ctx.epoch.elapsed().as_micros() as u64;
                ctx.lat.record(ctx.index, now.saturating_sub(sent));
            }
        }
        Some("ack") => {
            ctx.stats.acked.fetch_add(1, Relaxed);
            stretch(&ctx.stats.last_ack, &ctx.stats.ack_gap, ctx.epoch);
            if let Some(seq) = seq_of(&f) {
                pending.retain(|(s, _)| *s != seq);
            }
            if let (Some(o), Some(seq)) = (f["offset"].as_u64(), seq_of(&f)) {
                m.acked.push((o, seq));
            }
        }
        Some("error") => {
            // A refused publish (unavailable, rate limited) is not stored:
            // nothing to wait for.
            if let Some(seq) = seq_of(&f) {
                pending.retain(|(s, _)| *s != seq);
                ctx.stats.publish_errors.fetch_add(1, Relaxed);
            }
            let code = f["code"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(32)
                .collect::<String>();
            *ctx.stats
                .error_codes
                .lock()
                .expect("stats lock")
                .entry(code)
                .or_default() += 1;
        }
        _ => {}
    }
}

/// TCP (from the chosen source address), TLS, WebSocket, subscribe
/// (resuming after `since`); the conversation's newest offset.
async fn open(ctx: &ConnCtx, since: Option<u64>) -> anyhow::Result<(Ws, u64)> {
    let sock = if ctx.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(ctx.source, 0))
        .with_context(|| format!("bind {}", ctx.source))?;
    sock.set_nodelay(true)?;
    let tcp: TcpStream = sock.connect(ctx.addr).await.context("connect")?;
    let stream: Pin<Box<dyn Io>> = match &ctx.tls {
        None => Box::pin(tcp),
        Some(cfg) => {
            let host = ctx.url.host_str().unwrap_or("localhost").to_string();
            let name = ServerName::try_from(host).context("server name")?;
            Box::pin(
                tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .context("TLS")?,
            )
        }
    };
    let mut req = ctx.url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("portico.v1, bearer.{}", ctx.token).parse()?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .context("handshake")?;
    let mut sub = json!({"type": "subscribe", "conv": ctx.conv_id});
    if let Some(since) = since {
        sub["since"] = since.into();
    }
    ws.send(Message::Text(sub.to_string().into())).await?;
    let wait = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = ws.next().await {
            if let Message::Text(t) = frame? {
                let f: Value = serde_json::from_str(&t)?;
                match f["type"].as_str() {
                    Some("subscribed") => return Ok(f["offset"].as_u64().unwrap_or(0)),
                    Some("error") => bail!("subscribe refused: {f}"),
                    _ => {}
                }
            }
        }
        bail!("closed before subscribed")
    });
    let last = wait.await.context("subscribe timed out")??;
    Ok((ws, last))
}

async fn target_addr(url: &url::Url) -> anyhow::Result<SocketAddr> {
    let host = url.host_str().context("URL has no host")?;
    let port = url.port_or_known_default().context("URL has no port")?;
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4())
        .context("no IPv4 address")?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "load is only sent to loopback addresses, not {}",
        addr.ip()
    );
    Ok(addr)
}

fn tls_config(ca_pem: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.context("CA PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Creates the run's conversations through the REST API (service token).
async fn create_conversations(s: &Scenario, tokens: &Tokens, convs: usize) -> anyhow::Result<()> {
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(pem) = &s.ca {
        http = http.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
    }
    let http = http.build()?;
    let token = tokens.issue("portico-loadtest", &["service"], Duration::from_secs(3600));
    let url = s.api.join("/api/conversations")?;
    let limit = Arc::new(Semaphore::new(32));
    let mut jobs = tokio::task::JoinSet::new();
    for c in 0..convs {
        let members: Vec<String> = (c * s.group_size..((c + 1) * s.group_size).min(s.connections))
            .map(|i| format!("{}-u{i}", s.prefix))
            .collect();
        let body = json!({ "id": format!("{}-c{c}", s.prefix), "members": members });
        let (http, url, token, limit) = (http.clone(), url.clone(), token.clone(), limit.clone());
        jobs.spawn(async move {
            let _permit = limit.acquire().await?;
            let r = http.post(url).bearer_auth(token).json(&body).send().await?;
            anyhow::ensure!(
                r.status().is_success(),
                "creating a conversation: {} {}",
                r.status(),
                r.text().await?
            );
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = jobs.join_next().await {
        r??;
    }
    Ok(())
}
