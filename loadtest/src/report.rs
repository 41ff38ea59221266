//! The run's results: a table for people, JSON for scripts.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::generator::{Account, Counts, Scenario};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub samples: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            samples: h.len(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub url: String,
    pub connections: u64,
    pub connections_ok: u64,
    pub connections_failed: u64,
    pub group_size: u64,
    pub rate_per_sec: u32,
    pub duration_secs: f64,
    pub ramp_secs: f64,
    pub connect_ms: Percentiles,
    pub messages_sent: u64,
    pub messages_acked: u64,
    pub publish_errors: u64,
    /// Error frames received, by code.
    pub error_codes: std::collections::BTreeMap<String, u64>,
    /// Scheduled but not handed to a connection (its send backlog was full):
    /// the client, not the server, fell behind.
    pub not_sent_client_backlog: u64,
    /// Distinct messages acknowledged (stored).
    pub acked_messages: u64,
    /// Deliveries owed: each acknowledged message to each member that
    /// subscribed before it and was still connected at the end.
    pub deliveries_expected: u64,
    pub deliveries_received: u64,
    /// Acknowledged, owed, and never delivered.
    pub deliveries_lost: u64,
    pub deliveries_duplicated: u64,
    /// Delivered after a later offset (late, not lost).
    pub deliveries_out_of_order: u64,
    /// Connections that ended and came back (resumed).
    pub reconnects: u64,
    /// Connections not connected when the run stopped (not counted above).
    pub dead_connections: u64,
    /// Members whose resume was refused (too far behind; not counted above).
    pub resume_failed: u64,
    /// How connections ended, by close code (1006: no close frame).
    pub close_codes: std::collections::BTreeMap<String, u64>,
    /// Longest time a member was without a subscribed connection.
    pub longest_outage_ms: f64,
    /// Publishes never acknowledged by the end.
    pub unacked_at_end: u64,
    /// Longest stretch of the publish phase without any ack, and without
    /// any delivery: how long a fault stopped the flow.
    pub longest_ack_gap_ms: f64,
    pub longest_delivery_gap_ms: f64,
    pub deliveries_per_sec: f64,
    pub latency_ms: Percentiles,
    /// CPU seconds the generator itself used during the publish phase: near
    /// (cores × duration) means the client was the bottleneck.
    pub generator_cpu_secs: f64,
    /// Filled in by `bench`: ERROR lines the gateway logged during the
    /// run (ordinary client disconnects must not be among them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_error_lines: Option<u64>,
    /// Of those, the ones about clients (`Downstream …`): must be 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_client_error_lines: Option<u64>,
    /// Filled in by `bench`: per-process server measurements.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerUsage>,
    /// Filled in by `bench` (idle): nginx's workers holding the same
    /// connections in front of the same shards, RSS per connection in KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nginx_rss_per_connection_kib: Option<f64>,
}

/// A server process during a benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerUsage {
    pub name: String,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub connections: u64,
    /// (RSS after − before) / connections held, in KiB.
    pub rss_per_connection_kib: f64,
    pub cpu_secs: f64,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s: &Scenario,
        c: &Counts,
        a: &Account,
        latency: &Histogram<u64>,
        connect: &Histogram<u64>,
        ramp: Duration,
        publish: Duration,
        cpu: Duration,
    ) -> Report {
        let delivered = a.received - a.duplicates;
        Report {
            url: s.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(" "),
            connections: s.connections as u64,
            connections_ok: c.connected,
            connections_failed: c.failed + (s.connections as u64).saturating_sub(c.connected + c.failed),
            group_size: s.group_size as u64,
            rate_per_sec: s.rate,
            duration_secs: s.duration.as_secs_f64(),
            ramp_secs: ramp.as_secs_f64(),
            connect_ms: Percentiles::of(connect),
            messages_sent: c.sent,
            messages_acked: c.acked,
            publish_errors: c.publish_errors,
            error_codes: c.error_codes.clone(),
            not_sent_client_backlog: c.not_sent_backlog,
            acked_messages: a.acked_messages,
            deliveries_expected: a.expected,
            deliveries_received: a.received,
            deliveries_lost: a.lost,
            deliveries_duplicated: a.duplicates,
            deliveries_out_of_order: a.reorders,
            reconnects: a.reconnects,
            dead_connections: a.dead_connections,
            resume_failed: a.resume_failed,
            close_codes: a.closes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            longest_outage_ms: a.longest_outage.as_secs_f64() * 1000.0,
            unacked_at_end: a.unacked,
            longest_ack_gap_ms: c.longest_ack_gap.as_secs_f64() * 1000.0,
            longest_delivery_gap_ms: c.longest_delivery_gap.as_secs_f64() * 1000.0,
            deliveries_per_sec: delivered as f64 / publish.as_secs_f64().max(0.001),
            latency_ms: Percentiles::of(latency),
            generator_cpu_secs: cpu.as_secs_f64(),
            gateway_error_lines: None,
            gateway_client_error_lines: None,
            servers: Vec::new(),
            nginx_rss_per_connection_kib: None,
        }
    }

    /// Problems that make the run a failure, for the exit code.
    pub fn problems(&self, max_lost: u64, max_failed_pct: f64) -> Vec<String> {
        let mut p = Vec::new();
        if self.deliveries_lost > max_lost {
            p.push(format!(
                "{} acknowledged deliveries lost (allowed {max_lost})",
                self.deliveries_lost
            ));
        }
        if self.gateway_client_error_lines.is_some_and(|n| n > 0) {
            p.push(format!(
                "{} gateway ERROR lines about clients (ordinary disconnects must not be errors)",
                self.gateway_client_error_lines.unwrap_or(0)
            ));
        }
        if self.deliveries_duplicated > 0 {
            p.push(format!("{} deliveries duplicated", self.deliveries_duplicated));
        }
        if self.deliveries_out_of_order > 0 {
            p.push(format!(
                "{} deliveries out of order",
                self.deliveries_out_of_order
            ));
        }
        let failed_pct = 100.0 * self.connections_failed as f64 / self.connections.max(1) as f64;
        if failed_pct > max_failed_pct {
            p.push(format!(
                "{failed_pct:.2}% of connections failed (allowed {max_failed_pct}%)"
            ));
        }
        p
    }

    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        let c = &self.connect_ms;
        let mut t = format!(
            "target                 {}\n\
             connections ok/failed  {} / {}   (ramp {:.1}s, connect p50 {:.1} ms, p99 {:.1} ms)\n\
             messages sent/acked    {} / {}   (publish errors {} {:?}, not sent: client backlog {})\n\
             deliveries expected    {}   ({} messages acknowledged)\n\
             received/lost          {} / {}   (duplicates {}, out of order {})\n\
             reconnects             {}   (dead at end {}, resume refused {}, longest outage {:.0} ms, closes {:?})\n\
             deliveries/s           {:.0}\n\
             latency ms             p50 {:.2}  p95 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
             generator CPU          {:.1} s over {:.0} s\n",
            self.url,
            self.connections_ok,
            self.connections_failed,
            self.ramp_secs,
            c.p50,
            c.p99,
            self.messages_sent,
            self.messages_acked,
            self.publish_errors,
            self.error_codes,
            self.not_sent_client_backlog,
            self.deliveries_expected,
            self.acked_messages,
            self.deliveries_received,
            self.deliveries_lost,
            self.deliveries_duplicated,
            self.deliveries_out_of_order,
            self.reconnects,
            self.dead_connections,
            self.resume_failed,
            self.longest_outage_ms,
            self.close_codes,
            self.deliveries_per_sec,
            l.p50,
            l.p95,
            l.p99,
            l.p999,
            l.max,
            self.generator_cpu_secs,
            self.duration_secs,
        );
        if let (Some(n), Some(c)) = (self.gateway_error_lines, self.gateway_client_error_lines) {
            t.push_str(&format!("gateway ERROR lines   {n}   (about clients: {c})\n"));
        }
        for s in &self.servers {
            if s.rss_after_mib == 0.0 {
                // Measured for CPU only (PostgreSQL, Redis).
                t.push_str(&format!("server {:<15} CPU {:.1} s\n", s.name, s.cpu_secs));
                continue;
            }
            t.push_str(&format!(
                "server {:<15} RSS {:.1} → {:.1} MiB, {} conns, {:.1} KiB/conn, CPU {:.1} s\n",
                s.name,
                s.rss_before_mib,
                s.rss_after_mib,
                s.connections,
                s.rss_per_connection_kib,
                s.cpu_secs
            ));
        }
        t
    }
}
