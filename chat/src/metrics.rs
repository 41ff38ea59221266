//! The shard's Prometheus metrics: names and help texts in one place.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const CONNECTIONS: &str = "portico_chat_connections";
pub const SUBSCRIPTIONS: &str = "portico_chat_subscriptions";

/// Registers every metric's help text (after the recorder is installed).
pub fn describe() {
    let _ = portico_common::telemetry::metrics();
    describe_gauge!(CONNECTIONS, "Open WebSocket connections, by shard.");
    describe_gauge!(SUBSCRIPTIONS, "Live conversation subscriptions, by shard.");
    describe_counter!(
        "portico_chat_connections_refused_total",
        "Handshakes refused because the shard was full."
    );
    describe_counter!(
        "portico_chat_frames_in_total",
        "Text frames received from clients."
    );
    describe_counter!(
        "portico_chat_messages_in_total",
        "Messages stored (acknowledged publishes)."
    );
    describe_counter!(
        "portico_chat_deliveries_total",
        "Messages queued to subscribers, by shard."
    );
    describe_histogram!(
        "portico_chat_fanout_latency_seconds",
        Unit::Seconds,
        "From a message being stored to its fan-out on this shard."
    );
    describe_counter!(
        "portico_chat_slow_consumers_total",
        "Connections closed because their queue was full."
    );
    describe_counter!(
        "portico_chat_rate_limited_total",
        "Publishes refused by the per-user rate limit."
    );
    describe_counter!(
        "portico_chat_errors_total",
        "Error frames sent to clients, by code."
    );
    describe_counter!(
        "portico_chat_store_errors_total",
        "Failed calls to the history store."
    );
    describe_counter!(
        "portico_chat_bus_errors_total",
        "Failed publishes to the bus (stored messages still delivered later)."
    );
    describe_counter!(
        "portico_chat_bus_reconnects_total",
        "Reconnections of the Redis bus."
    );
    describe_counter!(
        "portico_chat_bus_topology_changes_total",
        "Redis Cluster topology changes (failover, resharding) the bus followed by resubscribing."
    );
    describe_counter!(
        "portico_chat_bus_lagged_total",
        "Bus messages skipped by a lagging receiver (recovered from the store)."
    );
}
