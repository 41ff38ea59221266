//! Live progress: what a running task is doing ([`Progress`]), and the
//! events that carry it to people ([`Events`]): messages on the customer's
//! `ops-<customer>` conversation, published through the chat server's
//! HTTP API with a `service`-role token. Events are best effort (the task's
//! own record in the database is the truth) and never block a task: each
//! publish has a short timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portico_common::auth::Tokens;
use serde::Serialize;
use serde_json::{Value, json};

use super::db::Subject;
use crate::archive::Meter;

/// What a running task reports.
#[derive(Debug)]
pub struct Progress {
    pub meter: Arc<Meter>,
    started: Instant,
    state: Mutex<(String, u64)>,
    /// The latest output lines (build logs), newest last.
    lines: Mutex<std::collections::VecDeque<String>>,
}

/// Output lines kept in a progress reading.
const LINES: usize = 8;

/// One progress reading, as stored and published.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub step: String,
    pub percent: u32,
    pub bytes: u64,
    pub total_bytes: u64,
    pub eta_secs: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl Progress {
    pub fn new(meter: Arc<Meter>) -> Arc<Progress> {
        Arc::new(Progress {
            meter,
            started: Instant::now(),
            state: Mutex::new(("starting".into(), 0)),
            lines: Mutex::new(Default::default()),
        })
    }

    /// Adds an output line (cut to 300 bytes); the last few travel with
    /// each progress event.
    pub fn line(&self, line: &str) {
        let mut end = line.len().min(300);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let mut lines = self.lines.lock().expect("progress lock");
        if lines.len() == LINES {
            lines.pop_front();
        }
        lines.push_back(line[..end].to_string());
    }

    pub fn step(&self, step: &str) {
        self.state.lock().expect("progress lock").0 = step.to_string();
    }

    /// The estimated total, from the pre-check.
    pub fn set_total(&self, total: u64) {
        self.state.lock().expect("progress lock").1 = total;
    }

    /// Adds to the estimated total (work discovered as a task goes).
    pub fn add_total(&self, more: u64) {
        self.state.lock().expect("progress lock").1 += more;
    }

    pub fn snapshot(&self) -> Snapshot {
        let (step, total) = self.state.lock().expect("progress lock").clone();
        let bytes = self.meter.bytes.load(std::sync::atomic::Ordering::Relaxed);
        let done = if total == 0 {
            0.0
        } else {
            (bytes as f64 / total as f64).min(1.0)
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta_secs = (done > 0.01).then(|| (elapsed * (1.0 - done) / done).round() as u64);
        Snapshot {
            step,
            // 99 at most until the task says it is done.
            percent: ((done * 100.0) as u32).min(99),
            bytes,
            total_bytes: total,
            eta_secs,
            log: self
                .lines
                .lock()
                .expect("progress lock")
                .iter()
                .cloned()
                .collect(),
        }
    }
}

/// Why the chat server did not do what jobs asked.
#[derive(Debug, thiserror::Error)]
#[error("live progress: {0}")]
pub struct EventsError(String);

impl From<EventsError> for portico_common::api::ApiError {
    fn from(e: EventsError) -> Self {
        portico_common::api::ApiError(http::StatusCode::BAD_GATEWAY, "chat_unavailable", e.to_string())
    }
}

/// Publishes task events to the chat server.
#[derive(Clone)]
pub struct Events {
    http: reqwest::Client,
    chat_url: Option<String>,
    token: String,
}

/// The conversation carrying a customer's ops events (`ops-<customer>`)
/// or an app's deploy events (`paas-<app>`).
pub fn channel(subject: Subject<'_>) -> String {
    match subject {
        Subject::Customer(c) => format!("ops-{c}"),
        Subject::App(a) => format!("paas-{a}"),
    }
}

impl Events {
    pub fn new(chat_url: Option<String>, tokens: &Tokens) -> Events {
        Events {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("HTTP client"),
            chat_url: chat_url.map(|u| u.trim_end_matches('/').to_string()),
            token: tokens.issue(
                "portico-jobs",
                &["service"],
                Duration::from_secs(10 * 365 * 86400),
            ),
        }
    }

    /// Creates the subject's conversation with `members` (an existing one
    /// is left as it is).
    pub async fn open_channel(&self, subject: Subject<'_>, members: &[String]) {
        let Some(base) = &self.chat_url else { return };
        let r = self
            .http
            .post(format!("{base}/api/conversations"))
            .bearer_auth(&self.token)
            .json(&json!({ "id": channel(subject), "members": members }))
            .send()
            .await;
        if let Err(e) = r {
            tracing::warn!(%subject, error = %e, "cannot open the ops conversation");
        }
    }

    /// Whether events go anywhere (`jobs.chat_url` is set).
    pub fn enabled(&self) -> bool {
        self.chat_url.is_some()
    }

    /// Makes `user` a member of the subject's conversation (creating it if
    /// the chat server lost it or was down when the subject was created),
    /// so that they can follow its events live.
    pub async fn add_member(&self, subject: Subject<'_>, user: &str) -> Result<(), EventsError> {
        let Some(base) = &self.chat_url else {
            return Err(EventsError("jobs.chat_url is not set".into()));
        };
        let add = || async {
            self.http
                .post(format!("{base}/api/conversations/{}/members", channel(subject)))
                .bearer_auth(&self.token)
                .json(&json!({ "user": user }))
                .send()
                .await
                .map_err(|e| EventsError(format!("chat server unreachable: {e}")))
        };
        let mut resp = add().await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            self.open_channel(subject, &[user.to_string()]).await;
            resp = add().await?;
        }
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(EventsError(format!("the chat server answered {}", resp.status())))
        }
    }

    /// Publishes `event` (`backup-progress`, …) for `task`; `id` makes a
    /// retried publish idempotent.
    pub async fn publish(&self, subject: Subject<'_>, id: &str, event: &str, task: i64, data: Value) {
        let Some(base) = &self.chat_url else { return };
        let body = serde_json::to_string(&portico_common::feeds::TaskEvent {
            event: event.to_string(),
            task,
            data,
        })
        .expect("a JSON value serializes");
        let r = self
            .http
            .post(format!("{base}/api/conversations/{}/messages", channel(subject)))
            .bearer_auth(&self.token)
            .json(&json!({ "id": id, "body": body }))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => tracing::warn!(%subject, event, status = %resp.status(), "progress event refused"),
            Err(e) => tracing::warn!(%subject, event, error = %e, "progress event not delivered"),
        }
    }
}
