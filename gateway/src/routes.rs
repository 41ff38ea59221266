//! The route table: which upstream serves a request path.
//!
//! Today fixed: `/api/jobs…` to the jobs service, everything else (the chat
//! API, `/ws`, the demo page) to the chat shards. Configured routes, hosts
//! and PaaS apps extend this table.

use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The chat shard set, sticky per user.
    Chat,
    Jobs(SocketAddr),
}

impl Route {
    /// Label for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Jobs(_) => "jobs",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Routes {
    pub jobs: SocketAddr,
}

impl Routes {
    pub fn route(&self, path: &str) -> Route {
        if path == "/api/jobs" || path.starts_with("/api/jobs/") {
            Route::Jobs(self.jobs)
        } else {
            Route::Chat
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        let r = Routes {
            jobs: "127.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(r.route("/api/jobs").name(), "jobs");
        assert_eq!(r.route("/api/jobs/x").name(), "jobs");
        assert_eq!(r.route("/api/jobsx").name(), "chat");
        assert_eq!(r.route("/ws").name(), "chat");
    }
}
