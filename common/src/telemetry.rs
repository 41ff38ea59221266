//! Logging (tracing) and the process-wide Prometheus recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use portico_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber: pretty on a terminal, JSON
/// lines otherwise (systemd, CI). `RUST_LOG` overrides the configured level.
/// Calling it again is harmless (the first subscriber stays).
pub fn init_tracing(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};
    let layer = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    // The level filter outermost: its level is the subscriber's hint, which
    // `log`'s bridge takes as its own maximum (Pingora logs through `log`;
    // with the departures filter outermost the hint was TRACE and every
    // disabled `debug!` went through the subscriber).
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(ClientDepartures).with_filter(filter))
        .try_init();
}

/// Pingora logs some ordinary client departures at ERROR from places no
/// hook of ours reaches (an HTTP/2 client gone during the handshake, a
/// downstream reset): those are counted by cause in
/// `portico_gateway_client_disconnects_total` and not logged; so is its
/// connection pool losing a race with itself
/// (`portico_gateway_upstream_pool_misses_total`). Upstream and server
/// failures are untouched.
struct ClientDepartures;

impl<S> tracing_subscriber::layer::Filter<S> for ClientDepartures {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::ERROR {
            return true;
        }
        let mut message = Message::default();
        event.record(&mut message);
        // Events bridged from `log` (Pingora's) carry their target as a field.
        let target = message.target.as_deref().unwrap_or(meta.target());
        if !target.starts_with("pingora") {
            return true;
        }
        if message.text == "failed to acquire reusable stream" {
            // Pingora's pool lost a race with its own idle watcher and
            // connects anew: nothing failed.
            metrics::counter!("portico_gateway_upstream_pool_misses_total").increment(1);
            return false;
        }
        match departure(&message.text) {
            Some(cause) => {
                metrics::counter!("portico_gateway_client_disconnects_total", "cause" => cause).increment(1);
                false
            }
            None => true,
        }
    }
}

#[derive(Default)]
struct Message {
    text: String,
    target: Option<String>,
}

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.text = format!("{value:?}"),
            "log.target" => self.target = Some(format!("{value:?}").trim_matches('"').to_string()),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.text = value.to_string(),
            "log.target" => self.target = Some(value.to_string()),
            _ => {}
        }
    }
}

/// Whether a Pingora error message is a client that went away, and how.
fn departure(message: &str) -> Option<&'static str> {
    let about_client = message.contains("H2 handshake error") || message.contains("Downstream");
    if !about_client {
        return None;
    }
    let m = message.to_ascii_lowercase();
    // An HTTP/2 stream the client reset (or whose connection it closed)
    // has no send capacity left for the rest of the body.
    if m.contains("broken pipe") || m.contains("connection reset") || m.contains("cannot reserve capacity") {
        Some("reset")
    } else if m.contains("close_notify") || m.contains("unexpected eof") || m.contains("early eof") {
        Some("no_close_notify")
    } else if m.contains("connection closed") || m.contains("closed before") {
        Some("closed")
    } else {
        None
    }
}

/// Latency buckets (seconds) for every `*_seconds` histogram.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder; installed on first use. In
/// `portico up` all services share it, each metric carrying its service in
/// its name (`portico_<service>_…`).
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may exist only in tests that built their own.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[cfg(test)]
mod departure_tests {
    #[test]
    fn client_departures_are_told_from_failures() {
        use super::departure;
        assert_eq!(
            departure(
                "H2 handshake error HandshakeError context: while h2 handshaking with client cause: Broken pipe (os error 32)"
            ),
            Some("reset")
        );
        assert_eq!(
            departure(
                "Fail to proxy: Downstream ReadError cause: peer closed connection without sending TLS close_notify"
            ),
            Some("no_close_notify")
        );
        assert_eq!(
            departure("Fail to proxy: Upstream ConnectError cause: Connection reset by peer"),
            None
        );
        assert_eq!(departure("failed to acquire reusable stream"), None);
        assert_eq!(
            departure(
                "Fail to proxy: Downstream H2Error context: Peer: addr: 127.0.0.1:44909, scheme: HTTP cause:  context: cannot reserve capacity, status: 400"
            ),
            Some("reset")
        );
        assert_eq!(
            departure("Fail to proxy: Upstream H2Error cause: cannot reserve capacity"),
            None,
            "an upstream's stream is not a client's"
        );
    }
}

#[cfg(test)]
mod level_tests {
    /// Pingora logs through `log`: its disabled `debug!`s must stop at
    /// `log`'s level check instead of reaching the subscriber per call.
    #[test]
    fn the_configured_level_reaches_the_log_bridge() {
        super::init_tracing(&portico_config::LogConfig {
            level: "warn".into(),
            ..Default::default()
        });
        assert_eq!(
            tracing::level_filters::LevelFilter::current(),
            tracing::level_filters::LevelFilter::WARN
        );
    }
}
