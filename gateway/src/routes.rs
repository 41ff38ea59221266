//! The route table: which upstream serves a request.
//!
//! Routes from `[[gateway.routes]]` (host and path prefix → an upstream
//! address or the chat shard set) are tried first, longest prefix first;
//! then `/api/jobs` goes to `gateway.jobs_upstream`; everything else (the
//! chat API, `/ws`, the demo page) to the chat shards. The table is
//! immutable; [`crate::reload`] swaps in a new one on SIGHUP.

use std::net::SocketAddr;
use std::sync::Arc;

use portico_config::{GatewayConfig, RouteUpstream};

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The chat shard set, sticky per user.
    Chat { name: Arc<str> },
    /// One upstream address.
    Upstream { addr: SocketAddr, name: Arc<str> },
}

impl Route {
    /// Label for metrics and logs (bounded: it comes from configuration).
    pub fn name(&self) -> &str {
        match self {
            Route::Chat { name } | Route::Upstream { name, .. } => name,
        }
    }

    pub fn is_chat(&self) -> bool {
        matches!(self, Route::Chat { .. })
    }
}

#[derive(Debug, Clone)]
struct Entry {
    host: Option<String>,
    prefix: String,
    route: Route,
}

#[derive(Debug, Clone)]
pub struct Routes {
    entries: Vec<Entry>,
    fallback: Route,
}

impl Routes {
    pub fn from_config(g: &GatewayConfig) -> Routes {
        let mut entries: Vec<Entry> = g
            .routes
            .iter()
            .map(|r| {
                let name: Arc<str> = Arc::from(r.name.as_str());
                let route = match r.upstream {
                    RouteUpstream::Chat => Route::Chat { name },
                    RouteUpstream::Addr(a) => Route::Upstream { addr: a.0, name },
                };
                Entry {
                    host: r.host.clone(),
                    prefix: r.path_prefix.clone(),
                    route,
                }
            })
            .collect();
        entries.push(Entry {
            host: None,
            prefix: "/api/jobs".into(),
            route: Route::Upstream {
                addr: g.jobs_upstream.0,
                name: Arc::from("jobs"),
            },
        });
        // Longest prefix first; host-specific before any-host at equal length.
        entries.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Routes {
            entries,
            fallback: Route::Chat {
                name: Arc::from("chat"),
            },
        }
    }

    /// The route for `host` (without port) and `path`. A prefix matches whole
    /// path segments: `/api/jobs` matches `/api/jobs` and `/api/jobs/x`, not
    /// `/api/jobsx`.
    pub fn route(&self, host: Option<&str>, path: &str) -> &Route {
        self.entries
            .iter()
            .find(|e| {
                e.host
                    .as_deref()
                    .is_none_or(|h| host.is_some_and(|x| x.eq_ignore_ascii_case(h)))
                    && segment_prefix(path, &e.prefix)
            })
            .map_or(&self.fallback, |e| &e.route)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn segment_prefix(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty() || path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_config::{ListenAddr, RouteConfig};

    fn routes() -> Routes {
        let g = GatewayConfig {
            routes: vec![
                RouteConfig {
                    name: "shop".into(),
                    host: Some("shop.example.com".into()),
                    path_prefix: "/".into(),
                    upstream: RouteUpstream::Addr(ListenAddr::new([127, 0, 0, 1], 7000)),
                },
                RouteConfig {
                    name: "media".into(),
                    host: None,
                    path_prefix: "/media".into(),
                    upstream: RouteUpstream::Addr(ListenAddr::new([127, 0, 0, 1], 7001)),
                },
            ],
            ..GatewayConfig::default()
        };
        Routes::from_config(&g)
    }

    #[test]
    fn prefixes_match_whole_segments_longest_first() {
        let r = routes();
        assert_eq!(r.route(None, "/api/jobs").name(), "jobs");
        assert_eq!(r.route(None, "/api/jobs/x").name(), "jobs");
        assert_eq!(r.route(None, "/api/jobsx").name(), "chat");
        assert_eq!(r.route(None, "/ws").name(), "chat");
        assert_eq!(r.route(None, "/media/a.png").name(), "media");
        assert_eq!(
            r.route(Some("shop.example.com"), "/media/a.png").name(),
            "media",
            "longer prefix wins"
        );
        assert_eq!(r.route(Some("SHOP.example.com"), "/cart").name(), "shop");
        assert_eq!(r.route(Some("other.example.com"), "/cart").name(), "chat");
    }
}
