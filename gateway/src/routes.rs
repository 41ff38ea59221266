//! The route table: which upstream serves a request.
//!
//! Routes from `[[gateway.routes]]` (host and path prefix → an upstream
//! address or the chat shard set) are tried first, longest prefix first;
//! then the jobs service's prefixes (`/api/jobs`, `/api/customers`, …,
//! `/console`) go to `gateway.jobs_upstream`; everything else (the
//! chat API, `/ws`, the demo page) to the chat shards. The table is
//! immutable; [`crate::reload`] swaps in a new one on SIGHUP. Each route
//! carries its own upstream timeout, body limit and rate-limit class.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram};

use portico_config::{GatewayConfig, RouteUpstream};

use crate::files::FileRoute;
use crate::limits::ClassLimiter;

/// Upstream answer timeout (between reads) when a route sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where one request goes, and the limits that apply to it.
#[derive(Debug, Clone)]
pub struct Route {
    /// Label for metrics and logs (bounded: it comes from configuration).
    pub name: Arc<str>,
    pub target: Target,
    /// How long the upstream may stay silent while answering.
    pub timeout: Duration,
    pub max_body_bytes: u64,
    /// Extra per-IP and per-user limits of the route's `limit_class`.
    pub class: Option<Arc<ClassLimiter>>,
    /// A file route's root (None when its directory could not be opened:
    /// every request gets 404, and the reload logged why).
    pub files: Option<Arc<FileRoute>>,
    pub metrics: RouteMetrics,
}

/// Statuses whose `requests_total` counter a route keeps at hand.
const COMMON_STATUSES: [u16; 18] = [
    200, 204, 206, 301, 302, 304, 308, 400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504,
];

/// A route's request metrics, registered at first use and then kept:
/// counting a request builds no label strings and looks up no key.
#[derive(Clone, Default)]
pub struct RouteMetrics {
    duration: OnceLock<Histogram>,
    upstream: OnceLock<Histogram>,
    requests: [OnceLock<Counter>; COMMON_STATUSES.len()],
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteMetrics")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The chat shard set, sticky per user.
    Chat,
    /// One upstream address.
    Upstream(SocketAddr),
    /// Files the edge serves itself (see [`crate::files`]).
    Files,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_chat(&self) -> bool {
        self.target == Target::Chat
    }

    /// Counts an answered request (`status` 0: none was written) and its
    /// duration.
    pub fn count_request(&self, status: u16, elapsed: Duration) {
        let counter = || {
            metrics::counter!(
                "portico_gateway_requests_total",
                "route" => self.name.clone(),
                "status" => status.to_string()
            )
        };
        match COMMON_STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.metrics.requests[i].get_or_init(counter).increment(1),
            None => counter().increment(1),
        }
        self.metrics
            .duration
            .get_or_init(|| {
                metrics::histogram!("portico_gateway_request_duration_seconds", "route" => self.name.clone())
            })
            .record(elapsed.as_secs_f64());
    }

    /// Records how long the upstream took to answer with its head.
    pub fn upstream_answered(&self, elapsed: Duration) {
        self.metrics
            .upstream
            .get_or_init(
                || metrics::histogram!("portico_gateway_upstream_seconds", "route" => self.name.clone()),
            )
            .record(elapsed.as_secs_f64());
    }
}

#[derive(Debug, Clone)]
struct Entry {
    host: Option<String>,
    prefix: String,
    route: Arc<Route>,
}

#[derive(Debug, Clone)]
pub struct Routes {
    entries: Vec<Entry>,
    fallback: Arc<Route>,
    classes: Vec<Arc<ClassLimiter>>,
}

impl Routes {
    /// Builds the table. Rate-limit classes start empty: a reload forgets
    /// who was limited (at most one burst of leeway per client).
    pub fn from_config(g: &GatewayConfig) -> Routes {
        let classes: HashMap<&str, Arc<ClassLimiter>> = g
            .limit_classes
            .iter()
            .map(|(name, c)| (name.as_str(), Arc::new(ClassLimiter::new(name, c))))
            .collect();
        let plain = |name: &str, target| {
            Arc::new(Route {
                name: Arc::from(name),
                target,
                timeout: DEFAULT_TIMEOUT,
                max_body_bytes: g.max_body_bytes,
                class: None,
                files: None,
                metrics: RouteMetrics::default(),
            })
        };
        let mut entries: Vec<Entry> = g
            .routes
            .iter()
            .map(|r| {
                let (target, files) = match (r.upstream, &r.root) {
                    (Some(RouteUpstream::Chat), _) => (Target::Chat, None),
                    (Some(RouteUpstream::Addr(a)), _) => (Target::Upstream(a.0), None),
                    (None, root) => {
                        let root = root.as_deref().unwrap_or(std::path::Path::new(""));
                        let files = FileRoute::new(root, &r.path_prefix, &r.cache.unwrap_or_default())
                            .map_err(|e| {
                                tracing::error!(route = %r.name, root = %root.display(), error = %e, "file route unavailable");
                            })
                            .ok()
                            .map(Arc::new);
                        (Target::Files, files)
                    }
                };
                let route = Route {
                    name: Arc::from(r.name.as_str()),
                    target,
                    timeout: r.timeout_secs.map_or(DEFAULT_TIMEOUT, Duration::from_secs),
                    max_body_bytes: r.max_body_bytes.unwrap_or(g.max_body_bytes),
                    // Validated: every class a route names exists.
                    class: r.limit_class.as_deref().and_then(|c| classes.get(c).cloned()),
                    files,
                    metrics: RouteMetrics::default(),
                };
                Entry {
                    host: r.host.clone(),
                    prefix: r.path_prefix.clone(),
                    route: Arc::new(route),
                }
            })
            .collect();
        // The jobs service: its API (customers, backups, tasks, audit,
        // apps, releases, mail, staff logins) and the ops console.
        for prefix in [
            "/api/jobs",
            "/api/customers",
            "/api/audit",
            "/api/apps",
            "/api/releases",
            "/api/migration",
            "/api/auth",
            "/api/staff",
            "/api/openapi.json",
            "/api/docs",
            "/console",
        ] {
            entries.push(Entry {
                host: None,
                prefix: prefix.into(),
                route: plain("jobs", Target::Upstream(g.jobs_upstream.0)),
            });
        }
        // Longest prefix first; host-specific before any-host at equal length.
        entries.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Routes {
            entries,
            fallback: plain("chat", Target::Chat),
            classes: classes.into_values().collect(),
        }
    }

    /// The route for `host` (without port) and `path`. A prefix matches whole
    /// path segments: `/api/jobs` matches `/api/jobs` and `/api/jobs/x`, not
    /// `/api/jobsx`.
    pub fn route(&self, host: Option<&str>, path: &str) -> &Arc<Route> {
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

    /// Where a request no route matches goes (the chat shards).
    pub fn fallback(&self) -> &Arc<Route> {
        &self.fallback
    }

    /// The rate-limit classes in use (for periodic eviction).
    pub fn classes(&self) -> &[Arc<ClassLimiter>] {
        &self.classes
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
                    upstream: Some(RouteUpstream::Addr(ListenAddr::new([127, 0, 0, 1], 7000))),
                    root: None,
                    cache: None,
                    timeout_secs: Some(5),
                    max_body_bytes: Some(10),
                    limit_class: None,
                },
                RouteConfig {
                    name: "media".into(),
                    host: None,
                    path_prefix: "/media".into(),
                    upstream: Some(RouteUpstream::Addr(ListenAddr::new([127, 0, 0, 1], 7001))),
                    root: None,
                    cache: None,
                    timeout_secs: None,
                    max_body_bytes: None,
                    limit_class: None,
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
        assert_eq!(r.route(None, "/api/migration/gate").name(), "jobs");
        assert_eq!(r.route(None, "/api/releases").name(), "jobs");
        assert_eq!(r.route(None, "/api/auth/login").name(), "jobs");
        assert_eq!(r.route(None, "/console/").name(), "jobs");
        assert_eq!(r.route(None, "/consoles").name(), "chat");
        assert_eq!(r.route(None, "/ws").name(), "chat");
        assert_eq!(r.route(None, "/media/a.png").name(), "media");
        assert_eq!(
            r.route(Some("shop.example.com"), "/media/a.png").name(),
            "media",
            "longer prefix wins"
        );
        assert_eq!(r.route(Some("SHOP.example.com"), "/cart").name(), "shop");
        assert_eq!(r.route(Some("other.example.com"), "/cart").name(), "chat");
        let shop = r.route(Some("shop.example.com"), "/cart");
        assert_eq!((shop.timeout, shop.max_body_bytes), (Duration::from_secs(5), 10));
        let media = r.route(None, "/media/a.png");
        assert_eq!(media.timeout, DEFAULT_TIMEOUT);
        assert_eq!(media.max_body_bytes, GatewayConfig::default().max_body_bytes);
    }
}
