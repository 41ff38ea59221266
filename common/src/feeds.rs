//! The messages one Portico service sends another, typed once here and
//! used on both sides (no JSON written by hand twice).
//!
//! - [`RouteFeed`]: jobs → gateway, `GET /api/paas/routes`: where hosted
//!   apps and customers' shops are served. Versioned: a gateway refuses a
//!   feed of a newer major version (and keeps its last table) rather than
//!   misread it; a state it does not know counts as not deployed.
//! - [`TaskEvent`]: jobs → chat, the body of a message on a customer's or
//!   an app's ops conversation (`<kind>-progress`, `-completed`, `-failed`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The route feed's version this build writes and reads.
pub const ROUTE_FEED_VERSION: u32 = 1;

fn version_1() -> u32 {
    1
}

/// The route table the gateways poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteFeed {
    /// Absent in feeds from before it was versioned: 1.
    #[serde(default = "version_1")]
    pub version: u32,
    pub apps: Vec<AppRoute>,
    /// Customers' shops (absent from older jobs services).
    #[serde(default)]
    pub sites: Vec<SiteRoute>,
}

/// Where a hosted app is, if it should be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRoute {
    pub name: String,
    pub state: AppRouteState,
    /// 127.0.0.1 and the container's published port, while running.
    pub upstream: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppRouteState {
    Running,
    /// Stopped through the API: the edge says so (503).
    Stopped,
    /// Should run but has no live container (exited, restarting).
    Down,
    NotDeployed,
    /// A state from a newer jobs service: treated as not deployed.
    #[serde(other)]
    Unknown,
}

/// One hostname of a customer's shop and the release instance serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRoute {
    pub host: String,
    pub upstream: SocketAddr,
    pub release: String,
}

/// A task's event, as published on its ops conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// `<kind>-progress`, `<kind>-completed` or `<kind>-failed`.
    pub event: String,
    pub task: i64,
    /// A progress snapshot, the task's result, or `{error}`.
    pub data: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_from_older_and_newer_jobs_services_are_read() {
        let old: RouteFeed =
            serde_json::from_str(r#"{"apps":[{"name":"a","state":"running","upstream":"127.0.0.1:1"}]}"#)
                .unwrap();
        assert_eq!(old.version, 1);
        assert!(old.sites.is_empty());
        assert_eq!(old.apps[0].state, AppRouteState::Running);
        let newer: RouteFeed =
            serde_json::from_str(r#"{"version":1,"apps":[{"name":"a","state":"paused","upstream":null}]}"#)
                .unwrap();
        assert_eq!(newer.apps[0].state, AppRouteState::Unknown);
        let back = serde_json::to_value(&old).unwrap();
        assert_eq!(back["apps"][0]["state"], "running");
        assert_eq!(back["version"], 1);
    }
}
