//! Hosted apps at the edge: `https://<app>.<paas.domain>/` goes to the
//! app's container on 127.0.0.1 at a port only the jobs service and this
//! table know; `/paas/<app>/…` on any host redirects there.
//!
//! An app is confined to its own origin: it is never served on a shared
//! one (the gateway's, the chat's), and [`confine_response`] removes what
//! in its responses would reach further: a cookie's `Domain` (which would
//! reach every other app), `Alt-Svc` (which would send the origin's traffic
//! elsewhere), key pins; and it rewrites the URLs in `Location`,
//! `Content-Location`, `Refresh` and `Link` that would reveal the private
//! address ([`public_location`]).
//!
//! Customers' shops are served on their own hostnames (`<domain>`,
//! `admin.<domain>`, `api.<domain>`) by the release the jobs service says
//! serves now; a blue/green switch is a new table.
//!
//! [`AppRoutes`] is the table, swapped whole; [`RoutesPoller`] fetches it
//! from the jobs service (`/api/paas/routes`) every `paas.routes_poll_ms`,
//! so new, moved and removed apps take effect within a poll and without a
//! restart. If the jobs service cannot be reached the last table stays.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use portico_common::feeds::{AppRoute, AppRouteState, ROUTE_FEED_VERSION, RouteFeed, SiteRoute};

use crate::routes::{DEFAULT_TIMEOUT, Route, Target};

/// The path prefix under which every app is also served.
pub const PREFIX: &str = "/paas/";

/// What the table says about one app.
#[derive(Debug, Clone)]
pub enum AppState {
    /// Serving from this route (its target is the container's address).
    Running(Arc<Route>),
    /// Stopped through the API.
    Stopped,
    /// Created, never successfully deployed.
    NotDeployed,
    /// Deployed, but its container is not running (crashed, restarting).
    Down,
}

/// How a request named an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressed {
    /// `<app>.<domain>`.
    Host,
    /// `/paas/<app>/…` on any host: redirected to the app's own origin.
    Prefix,
}

/// A request that is for an app.
#[derive(Debug, Clone)]
pub struct AppMatch {
    pub name: Arc<str>,
    pub by: Addressed,
    /// None: no such app.
    pub state: Option<AppState>,
}

pub struct AppRoutes {
    domain: String,
    max_body_bytes: u64,
    table: ArcSwap<HashMap<Arc<str>, AppState>>,
    /// Customers' shops by hostname (lowercase): the release serving now.
    sites: ArcSwap<HashMap<String, Arc<Route>>>,
}

impl AppRoutes {
    pub fn new(domain: &str, max_body_bytes: u64) -> AppRoutes {
        AppRoutes {
            domain: domain.to_ascii_lowercase(),
            max_body_bytes,
            table: ArcSwap::default(),
            sites: ArcSwap::default(),
        }
    }

    /// The route of a customer's shop served at `host`, if any.
    pub fn site(&self, host: &str) -> Option<Arc<Route>> {
        let sites = self.sites.load();
        if sites.is_empty() {
            return None;
        }
        sites.get(host.to_ascii_lowercase().as_str()).cloned()
    }

    /// Installs the shops' table; returns whether anything changed.
    fn install_sites(&self, entries: &[SiteRoute]) -> bool {
        let next: HashMap<String, Arc<Route>> = entries
            .iter()
            .map(|e| {
                (
                    e.host.to_ascii_lowercase(),
                    Arc::new(Route {
                        name: Arc::from("shop"),
                        target: Target::Upstream(e.upstream),
                        timeout: DEFAULT_TIMEOUT,
                        max_body_bytes: self.max_body_bytes,
                        class: None,
                        files: None,
                        metrics: Default::default(),
                    }),
                )
            })
            .collect();
        let current = self.sites.load();
        let same = current.len() == next.len()
            && next
                .iter()
                .all(|(h, r)| current.get(h).is_some_and(|c| c.target == r.target));
        if !same {
            self.sites.store(Arc::new(next));
        }
        !same
    }

    /// The domain under which apps have their hostnames.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The app a request is for, if any: by host first, then by path.
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Option<AppMatch> {
        let table = self.table.load();
        let by_host = host.and_then(|h| {
            let cut = h.len().checked_sub(self.domain.len() + 1)?;
            let (label, rest) = (h.get(..cut)?, h.get(cut..)?);
            let label = rest
                .strip_prefix('.')
                .is_some_and(|d| d.eq_ignore_ascii_case(&self.domain))
                .then_some(label)?;
            Some((label, Addressed::Host))
        });
        let (label, by) = by_host.or_else(|| {
            let rest = path
                .strip_prefix(PREFIX)
                .or_else(|| (path == "/paas").then_some(""))?;
            Some((rest.split('/').next().unwrap_or(""), Addressed::Prefix))
        })?;
        let label = label.to_ascii_lowercase();
        match table.get_key_value(label.as_str()) {
            Some((name, state)) => Some(AppMatch {
                name: name.clone(),
                by,
                state: Some(state.clone()),
            }),
            None => Some(AppMatch {
                name: Arc::from(label),
                by,
                state: None,
            }),
        }
    }

    /// Installs a new table; returns whether anything changed.
    fn install(&self, routes: &[AppRoute]) -> bool {
        let mut next: HashMap<Arc<str>, AppState> = HashMap::with_capacity(routes.len());
        for r in routes {
            let state = match (r.state, r.upstream) {
                (AppRouteState::Running, Some(addr)) => AppState::Running(Arc::new(Route {
                    name: Arc::from("paas"),
                    target: Target::Upstream(addr),
                    timeout: DEFAULT_TIMEOUT,
                    max_body_bytes: self.max_body_bytes,
                    class: None,
                    files: None,
                    metrics: Default::default(),
                })),
                (AppRouteState::Stopped, _) => AppState::Stopped,
                (AppRouteState::Down | AppRouteState::Running, _) => AppState::Down,
                (AppRouteState::NotDeployed | AppRouteState::Unknown, _) => AppState::NotDeployed,
            };
            next.insert(Arc::from(r.name.as_str()), state);
        }
        let current = self.table.load();
        let same = current.len() == next.len()
            && next.iter().all(|(k, v)| match (current.get(k), v) {
                (Some(AppState::Running(a)), AppState::Running(b)) => a.target == b.target,
                (Some(AppState::Stopped), AppState::Stopped) => true,
                (Some(AppState::NotDeployed), AppState::NotDeployed) => true,
                (Some(AppState::Down), AppState::Down) => true,
                _ => false,
            });
        if !same {
            self.table.store(Arc::new(next));
        }
        !same
    }

    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The path on the app's origin for a request addressed by prefix:
/// `/paas/<app>` (the name in any case) removed, always starting with `/`.
pub fn strip_prefix(path: &str) -> &str {
    let rest = path
        .strip_prefix(PREFIX)
        .map(|p| p.find('/').map_or("", |i| &p[i..]))
        .unwrap_or(path);
    if rest.is_empty() { "/" } else { rest }
}

/// Where an app is served: what its responses are confined to.
pub struct Site<'a> {
    /// `https://` and the host (and port) the client used.
    pub origin: &'a str,
    pub public_host: &'a str,
    /// The container's private port on 127.0.0.1.
    pub host_port: u16,
}

/// Response headers an app may not send: they act beyond its origin.
const FORBIDDEN: &[&str] = &["alt-svc", "public-key-pins", "public-key-pins-report-only"];

/// Confines an app's response to its origin (see the module docs).
pub fn confine_response(resp: &mut pingora::http::ResponseHeader, site: &Site) -> pingora::Result<()> {
    for name in FORBIDDEN {
        resp.remove_header(*name);
    }
    rewrite_each(resp, http::header::SET_COOKIE, host_only_cookie)?;
    rewrite_each(resp, http::header::LOCATION, |v| public_location(v, site))?;
    rewrite_each(resp, http::header::CONTENT_LOCATION, |v| public_location(v, site))?;
    rewrite_each(resp, http::header::REFRESH, |v| rewrite_refresh(v, site))?;
    rewrite_each(resp, http::header::LINK, |v| rewrite_link(v, site))?;
    Ok(())
}

/// Replaces each value of header `name` for which `f` returns a new one
/// (order kept); nothing is touched when `f` changes none.
fn rewrite_each(
    resp: &mut pingora::http::ResponseHeader,
    name: http::HeaderName,
    f: impl Fn(&str) -> Option<String>,
) -> pingora::Result<()> {
    let values: Vec<(String, Option<String>)> = resp
        .headers
        .get_all(&name)
        .iter()
        .map(|v| {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            let new = f(&v);
            (v, new)
        })
        .collect();
    if values.iter().all(|(_, new)| new.is_none()) {
        return Ok(());
    }
    resp.remove_header(&name);
    for (old, new) in values {
        resp.append_header(name.clone(), new.unwrap_or(old))?;
    }
    Ok(())
}

/// A `Set-Cookie` without its `Domain` attribute (so the cookie stays on
/// the app's host), or `None` if it had none.
fn host_only_cookie(cookie: &str) -> Option<String> {
    let mut parts = cookie.split(';');
    let first = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    let kept: Vec<&str> = rest
        .iter()
        .copied()
        .filter(|a| {
            let name = a.split('=').next().unwrap_or("").trim();
            !name.eq_ignore_ascii_case("domain")
        })
        .collect();
    if kept.len() == rest.len() {
        return None;
    }
    Some(std::iter::once(first).chain(kept).collect::<Vec<_>>().join(";"))
}

/// `Refresh: 5; url=…`: the URL part through [`public_location`].
fn rewrite_refresh(value: &str, site: &Site) -> Option<String> {
    let lower = value.to_ascii_lowercase();
    let at = lower.find("url=")? + 4;
    let url = value[at..].trim().trim_matches(|c| c == '\'' || c == '"');
    let public = public_location(url, site)?;
    Some(format!("{}{public}", &value[..at]))
}

/// `Link: <url>; rel=…, <url>; …`: each `<url>` through [`public_location`].
fn rewrite_link(value: &str, site: &Site) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut changed = false;
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let close = open + rest[open..].find('>')?;
        out.push_str(&rest[..=open]);
        let url = &rest[open + 1..close];
        match public_location(url, site) {
            Some(p) => {
                out.push_str(&p);
                changed = true;
            }
            None => out.push_str(url),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// Rewrites a URL an app sent (a redirect, a link) so it never points at
/// the private address: absolute URLs to a loopback host, to the
/// container's host port or to the public host (with whatever port) become
/// the public origin. `None`: leave it as it is (a path, or another site).
pub fn public_location(location: &str, site: &Site) -> Option<String> {
    let (origin, public_host, host_port) = (site.origin, site.public_host, site.host_port);
    let rest = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"))?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']') =>
        {
            (h, p.parse::<u16>().ok())
        }
        _ => (authority, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let internal = ["127.0.0.1", "localhost", "::1", "0.0.0.0"]
        .iter()
        .any(|h| host.eq_ignore_ascii_case(h))
        || port == Some(host_port)
        || host.eq_ignore_ascii_case(public_host);
    if !internal {
        return None;
    }
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Some(format!("{origin}{path}"))
}

/// Fetches the app routes from the jobs service.
pub struct RoutesPoller {
    pub routes: Arc<AppRoutes>,
    pub url: String,
    /// Mints the service token: a fresh one per poll, valid for a minute,
    /// so a token that leaks (a log, a capture) is soon worthless.
    pub tokens: portico_common::auth::Tokens,
    pub every: Duration,
}

/// Lifetime of the token the poller shows the jobs service.
const TOKEN_LIFETIME: Duration = Duration::from_secs(60);

impl RoutesPoller {
    async fn fetch(&self, http: &reqwest::Client) -> Result<(Vec<AppRoute>, Vec<SiteRoute>), String> {
        let token = self.tokens.issue("portico-gateway", &["service"], TOKEN_LIFETIME);
        let resp = http
            .get(&self.url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            ));
        }
        let doc: RouteFeed = resp.json().await.map_err(|e| e.to_string())?;
        if doc.version > ROUTE_FEED_VERSION {
            return Err(format!(
                "route feed version {} is newer than this gateway reads ({ROUTE_FEED_VERSION}): upgrade the gateway",
                doc.version
            ));
        }
        // Only loopback upstreams: the table must never point the edge at
        // another machine, whatever the answer says.
        let apps = doc
            .apps
            .into_iter()
            .filter(|r| r.upstream.is_none_or(|a| a.ip().is_loopback()))
            .filter(|r| r.name.len() <= 63)
            .take(100_000)
            .collect();
        let sites = doc
            .sites
            .into_iter()
            .filter(|s| s.upstream.ip().is_loopback() && portico_config::is_hostname(&s.host))
            .take(100_000)
            .collect();
        Ok((apps, sites))
    }
}

#[async_trait]
impl BackgroundService for RoutesPoller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            match self.fetch(&http).await {
                Ok((entries, sites)) => {
                    if failing {
                        tracing::info!("app routes reachable again");
                        failing = false;
                    }
                    if self.routes.install(&entries) {
                        metrics::counter!("portico_gateway_app_route_updates_total").increment(1);
                        tracing::info!(apps = entries.len(), "app routes updated");
                    }
                    if self.routes.install_sites(&sites) {
                        metrics::counter!("portico_gateway_app_route_updates_total").increment(1);
                        tracing::info!(hosts = sites.len(), "shop routes updated");
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(url = %self.url, error = %e, "cannot fetch app routes; keeping the last table");
                        failing = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, state: &str, upstream: Option<&str>) -> AppRoute {
        AppRoute {
            name: name.into(),
            state: serde_json::from_value(serde_json::json!(state)).unwrap(),
            upstream: upstream.map(|u| u.parse().unwrap()),
        }
    }

    fn table() -> AppRoutes {
        let t = AppRoutes::new("paas.example.com", 1 << 20);
        t.install(&[
            entry("blog", "running", Some("127.0.0.1:32768")),
            entry("old", "stopped", None),
        ]);
        t
    }

    #[test]
    fn apps_resolve_by_host_and_by_prefix() {
        let t = table();
        let m = t.resolve(Some("blog.paas.example.com"), "/x").unwrap();
        assert_eq!((&*m.name, m.by), ("blog", Addressed::Host));
        assert!(matches!(m.state, Some(AppState::Running(_))));
        let m = t.resolve(Some("BLOG.Paas.Example.com"), "/").unwrap();
        assert_eq!(&*m.name, "blog");
        let m = t.resolve(Some("shop.example.com"), "/paas/blog/a/b").unwrap();
        assert_eq!((&*m.name, m.by), ("blog", Addressed::Prefix));
        assert!(matches!(
            t.resolve(None, "/paas/old/").unwrap().state,
            Some(AppState::Stopped)
        ));
        assert!(
            t.resolve(Some("nope.paas.example.com"), "/")
                .unwrap()
                .state
                .is_none()
        );
        assert!(
            t.resolve(Some("paas.example.com"), "/").is_none(),
            "the bare domain is no app"
        );
        assert!(t.resolve(Some("xpaas.example.com"), "/").is_none());
        assert!(t.resolve(Some("shop.example.com"), "/paasx/blog").is_none());
        assert!(t.resolve(None, "/other").is_none());
        assert!(
            t.resolve(Some("é.paas.example.com"), "/")
                .is_some_and(|m| m.state.is_none())
        );
        assert!(
            t.resolve(Some("ééééééééééééééééé"), "/").is_none(),
            "no panic off char boundaries"
        );
    }

    #[test]
    fn changes_are_detected() {
        let t = table();
        assert!(!t.install(&[
            entry("blog", "running", Some("127.0.0.1:32768")),
            entry("old", "stopped", None),
        ]));
        assert!(t.install(&[entry("blog", "running", Some("127.0.0.1:32769"))]));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn prefixes_are_stripped_to_an_absolute_path() {
        assert_eq!(strip_prefix("/paas/blog/a?x"), "/a?x");
        assert_eq!(strip_prefix("/paas/BLOG/a"), "/a");
        assert_eq!(strip_prefix("/paas/blog/"), "/");
        assert_eq!(strip_prefix("/paas/blog"), "/");
    }

    #[test]
    fn locations_never_leak_the_private_address() {
        let site = Site {
            origin: "https://blog.paas.example.com",
            public_host: "blog.paas.example.com",
            host_port: 32768,
        };
        let loc = |l: &str| public_location(l, &site);
        assert_eq!(
            loc("http://127.0.0.1:32768/a?b").as_deref(),
            Some("https://blog.paas.example.com/a?b")
        );
        assert_eq!(
            loc("http://localhost:8080/x").as_deref(),
            Some("https://blog.paas.example.com/x")
        );
        assert_eq!(
            loc("http://[::1]:3000").as_deref(),
            Some("https://blog.paas.example.com/")
        );
        assert_eq!(
            loc("http://10.0.0.5:32768/x").as_deref(),
            Some("https://blog.paas.example.com/x")
        );
        assert_eq!(
            loc("http://blog.paas.example.com:8080/x").as_deref(),
            Some("https://blog.paas.example.com/x")
        );
        assert_eq!(loc("https://github.com/login"), None, "other sites stay");
        assert_eq!(loc("/docs/"), None, "paths stay");
        assert_eq!(loc("//evil.example.net/x"), None);
    }

    fn confined(headers: &[(&str, &str)]) -> Vec<(String, String)> {
        let site = Site {
            origin: "https://blog.paas.example.com",
            public_host: "blog.paas.example.com",
            host_port: 32768,
        };
        let mut resp = pingora::http::ResponseHeader::build(200, None).unwrap();
        for (k, v) in headers {
            resp.append_header(k.to_string(), *v).unwrap();
        }
        confine_response(&mut resp, &site).unwrap();
        resp.headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect()
    }

    #[test]
    fn responses_are_confined_to_the_app_origin() {
        let out = confined(&[
            ("set-cookie", "a=1; Domain=paas.example.com; Path=/; Secure"),
            ("set-cookie", "b=2; Path=/"),
            ("set-cookie", "c=3;domain=.example.com"),
            ("alt-svc", "h2=\"evil.example.net:443\""),
            ("public-key-pins", "pin-sha256=\"x\""),
            ("refresh", "0; url=http://127.0.0.1:32768/next"),
            (
                "link",
                "<http://127.0.0.1:32768/s.css>; rel=preload, <https://cdn.example.org/x.js>; rel=preload",
            ),
            ("service-worker-allowed", "/"),
        ]);
        let get = |n: &str| -> Vec<&str> {
            out.iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("set-cookie"), ["a=1; Path=/; Secure", "b=2; Path=/", "c=3"]);
        assert!(get("alt-svc").is_empty() && get("public-key-pins").is_empty());
        assert_eq!(get("refresh"), ["0; url=https://blog.paas.example.com/next"]);
        assert_eq!(
            get("link"),
            [
                "<https://blog.paas.example.com/s.css>; rel=preload, <https://cdn.example.org/x.js>; rel=preload"
            ]
        );
        // On its own origin an app may scope a service worker as it likes.
        assert_eq!(get("service-worker-allowed"), ["/"]);
    }
}
