//! The HTTPS proxy: a thin `ProxyHttp` that picks the upstream from the
//! route table, sets the proxy and security headers, and records metrics
//! and the access log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::consistent::KetamaHashing;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use portico_common::auth::{Tokens, handshake_token};

use pingora::modules::http::HttpModules;
use pingora::modules::http::compression::{ResponseCompression, ResponseCompressionBuilder};

use crate::limits::Limits;
use crate::paas::{Addressed, AppRoutes, AppState};
use crate::routes::{Route, Routes, Target};
use arc_swap::ArcSwap;

/// The chat protocol a WebSocket client offers (see chat/PROTOCOL.md).
const CHAT_SUBPROTOCOL: &str = "portico.v1";
/// The cookie that pins an anonymous client to a chat shard.
const STICKY_COOKIE: &str = "portico_route";
/// Upgraded connections may stay idle this long (above the chat heartbeat).
const WS_IDLE: Duration = Duration::from_secs(120);

pub struct Edge {
    /// Swapped whole on SIGHUP (see `reload`).
    pub routes: Arc<ArcSwap<Routes>>,
    pub chat: Arc<LoadBalancer<KetamaHashing>>,
    pub tokens: Tokens,
    pub limits: Arc<Limits>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Hosted apps (`<app>.<paas domain>`, `/paas/<app>/`).
    pub apps: Arc<AppRoutes>,
}

/// A request for a hosted app: what the response rewrite needs.
pub struct AppCtx {
    name: Arc<str>,
    by: Addressed,
    /// `https://` and the Host the client used.
    origin: String,
    public_host: String,
    host_port: u16,
}

impl AppCtx {
    /// `/paas/<app>` for prefix-addressed requests.
    fn prefix(&self) -> Option<String> {
        (self.by == Addressed::Prefix).then(|| format!("/paas/{}", self.name))
    }
}

pub struct Ctx {
    route: Arc<Route>,
    /// The subject of a valid token on the request, if any.
    user: Option<String>,
    /// Anonymous chat clients: the sticky cookie's value, and whether it is
    /// new (then the response sets it).
    sticky: Option<(String, bool)>,
    started: Instant,
    client_ip: Option<IpAddr>,
    body_bytes: u64,
    /// The upstream picked for this request (access log), and when.
    upstream: Option<std::net::SocketAddr>,
    upstream_started: Option<Instant>,
    /// A shard that refused this request's connection: skipped on retry.
    failed_shard: Option<std::net::SocketAddr>,
    /// Counted in the open-WebSocket gauge (undone in `logging`).
    websocket: bool,
    /// Set when the request is for a hosted app.
    app: Option<AppCtx>,
}

/// The host (and port) the client addressed: the URI's authority (HTTP/2
/// `:authority`, absolute-form HTTP/1) or else the `Host` header.
fn authority(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default())
        .or_else(|| req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
}

/// A small HTML page written by the gateway itself (unknown or stopped
/// apps): never a connection error, never cached.
async fn page(session: &mut Session, status: u16, title: &str, text: &str) -> Result<bool> {
    let body = format!(
        "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>{title}</title>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\"><h1>{title}</h1><p>{text}</p></body></html>\n"
    );
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header("content-type", "text/html; charset=utf-8")?;
    resp.insert_header("content-length", body.len())?;
    resp.insert_header("cache-control", "no-store")?;
    crate::headers::secure(&mut resp)?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(bytes::Bytes::from(body)), true)
        .await?;
    Ok(true)
}

/// A short response written by the gateway itself.
async fn respond(session: &mut Session, status: u16, retry_after: Option<Duration>) -> Result<bool> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    if let Some(wait) = retry_after {
        // Whole seconds, rounded up: 0 would invite an immediate retry.
        resp.insert_header("retry-after", wait.as_secs() + u64::from(wait.subsec_nanos() > 0))?;
    }
    resp.insert_header("content-length", "0")?;
    crate::headers::secure(&mut resp)?;
    session.write_response_header(Box::new(resp), true).await?;
    Ok(true)
}

impl Edge {
    /// The client's address: the socket peer, or, when the peer is a
    /// trusted proxy, the last `X-Forwarded-For` hop it did not add itself.
    fn client_ip(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let xff = session.req_header().headers.get_all("x-forwarded-for");
        let hops: Vec<IpAddr> = xff
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|h| h.trim().parse().ok())
            .collect();
        Some(
            hops.into_iter()
                .rev()
                .find(|ip| !self.trusted_proxies.contains(ip))
                .unwrap_or(peer),
        )
    }
}

impl Edge {
    /// The user a request authenticates as: the subject of a token (bearer,
    /// WebSocket subprotocol or `?token=`) that verifies.
    fn user(&self, session: &Session) -> Option<String> {
        let req = session.req_header();
        let (token, _) = handshake_token(&req.headers, req.uri.query(), CHAT_SUBPROTOCOL)?;
        self.tokens.verify(&token).ok().map(|c| c.sub)
    }

    /// The key that pins a client to a chat shard: its user id when the
    /// token verifies, else the sticky cookie (set on first contact).
    fn sticky_key(ctx: &Ctx) -> Vec<u8> {
        match (&ctx.user, &ctx.sticky) {
            (Some(user), _) => format!("user:{user}").into_bytes(),
            (None, Some((cookie, _))) => format!("cookie:{cookie}").into_bytes(),
            (None, None) => {
                let ip = ctx.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
                format!("ip:{ip}").into_bytes()
            }
        }
    }

    /// The client's sticky cookie if it is well-formed, else a new one.
    fn sticky_cookie(session: &Session) -> (String, bool) {
        let sent = session
            .req_header()
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == STICKY_COOKIE)
            .map(|(_, v)| v)
            .filter(|v| (16..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_hexdigit()));
        match sent {
            Some(v) => (v.to_string(), false),
            None => (format!("{:032x}", rand::random::<u128>()), true),
        }
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            // Replaced in `request_filter`; a clone, not an allocation.
            route: self.routes.load().fallback().clone(),
            user: None,
            sticky: None,
            upstream: None,
            upstream_started: None,
            started: Instant::now(),
            client_ip: None,
            body_bytes: 0,
            failed_shard: None,
            websocket: false,
            app: None,
        }
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        // gzip (level 6) for compressible types (text, JS, CSS, SVG…).
        modules.add_module(ResponseCompressionBuilder::enable(6));
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.client_ip = self.client_ip(session);
        let req = session.req_header();
        let host = authority(req).map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name));
        ctx.route = self.routes.load().route(host, req.uri.path()).clone();
        if let Some(m) = self.apps.resolve(host, req.uri.path()) {
            match m.state {
                None => {
                    return page(session, 404, "No such app", "No app is deployed at this address.").await;
                }
                Some(AppState::Stopped) => {
                    let text = format!("The app {} is stopped.", m.name);
                    return page(session, 503, "App stopped", &text).await;
                }
                Some(AppState::Down) => {
                    let text = format!(
                        "The app {} is not answering right now. Try again in a moment.",
                        m.name
                    );
                    return page(session, 503, "App unavailable", &text).await;
                }
                Some(AppState::NotDeployed) => {
                    let text = format!("The app {} has not been deployed yet.", m.name);
                    return page(session, 503, "App not deployed", &text).await;
                }
                Some(AppState::Running(route)) => {
                    let req = session.req_header();
                    if m.by == Addressed::Prefix
                        && req.uri.path().trim_end_matches('/') == format!("/paas/{}", m.name)
                        && !req.uri.path().ends_with('/')
                    {
                        // Relative links of the app need the trailing slash.
                        let q = req.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
                        let mut resp = ResponseHeader::build(308, Some(4))?;
                        resp.insert_header("location", format!("/paas/{}/{q}", m.name))?;
                        resp.insert_header("content-length", "0")?;
                        crate::headers::secure(&mut resp)?;
                        session.write_response_header(Box::new(resp), true).await?;
                        return Ok(true);
                    }
                    let public = authority(req).unwrap_or_default().to_string();
                    let host_port = match route.target {
                        Target::Upstream(a) => a.port(),
                        Target::Chat => 0,
                    };
                    ctx.app = Some(AppCtx {
                        name: m.name,
                        by: m.by,
                        origin: format!("https://{public}"),
                        public_host: public
                            .rsplit_once(':')
                            .map_or(public.as_str(), |(h, _)| h)
                            .to_string(),
                        host_port,
                    });
                    ctx.route = route;
                }
            }
        }
        // A token costs an HMAC: verify it only where the user matters.
        if ctx.route.is_chat() || ctx.route.class.as_ref().is_some_and(|c| c.limits_users()) {
            ctx.user = self.user(session);
        }
        if ctx.route.is_chat() && ctx.user.is_none() {
            ctx.sticky = Some(Self::sticky_cookie(session));
        }
        if let Some(ip) = ctx.client_ip {
            let verdict = if session.is_upgrade_req() {
                self.limits
                    .check_ws_connect(ip)
                    .and_then(|_| self.limits.check_request(ip))
            } else {
                self.limits.check_request(ip)
            };
            let verdict = verdict.and_then(|_| match &ctx.route.class {
                Some(class) => class.check(ctx.client_ip, ctx.user.as_deref()),
                None => Ok(()),
            });
            if let Err(wait) = verdict {
                metrics::counter!("portico_gateway_rate_limited_total", "route" => ctx.route.name().to_string())
                    .increment(1);
                return respond(session, 429, Some(wait)).await;
            }
        }
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > ctx.route.max_body_bytes) {
            return respond(session, 413, None).await;
        }
        // Never compress API answers: they carry tokens next to
        // attacker-influenced text, which is what BREACH needs.
        let path = session.req_header().uri.path();
        let api = path.starts_with("/api/") || path.starts_with("/demo/token");
        if api && let Some(c) = session.downstream_modules_ctx.get_mut::<ResponseCompression>() {
            c.adjust_level(0);
        }
        if session.is_upgrade_req() {
            // Pingora's fixed 60 s read timeout would cut idle WebSockets.
            session.set_read_timeout(Some(WS_IDLE));
            metrics::gauge!("portico_gateway_websockets").increment(1.0);
            ctx.websocket = true;
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // After a 101 these are WebSocket frames of a long-lived stream, not
        // a request body: frame and message limits are the chat server's,
        // the idle timeout ours (`WS_IDLE`). A body limit would cut every
        // chat connection once its client had sent `max_body_bytes` in total.
        if session.was_upgraded() {
            return Ok(());
        }
        // Chunked bodies declare no length: count as they stream.
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_bytes > ctx.route.max_body_bytes {
            return Err(Error::new(ErrorType::HTTPStatus(413)));
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let addr = match ctx.route.target {
            Target::Chat => {
                let key = Self::sticky_key(ctx);
                let failed = ctx.failed_shard;
                // Healthy shards only, and not one that just refused us (a
                // dead shard until the next health check): the next one on
                // the ring takes the user, as it will after the check.
                self.chat
                    .select_with(&key, 256, |b, healthy| {
                        healthy && b.addr.as_inet() != failed.as_ref()
                    })
                    .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no healthy chat shard"))?
                    .addr
            }
            Target::Upstream(addr) => pingora::protocols::l4::socket::SocketAddr::Inet(addr),
        };
        ctx.upstream = addr.as_inet().copied();
        ctx.upstream_started = Some(Instant::now());
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(3));
        peer.options.read_timeout = Some(ctx.route.timeout);
        if session.is_upgrade_req() {
            peer.options.read_timeout = Some(WS_IDLE);
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if ctx.route.is_chat() && ctx.failed_shard.is_none() {
            ctx.failed_shard = peer._address.as_inet().copied();
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Never pass on what the client claims; say what we saw.
        for h in [
            "x-forwarded-for",
            "x-real-ip",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ] {
            upstream.remove_header(h);
        }
        if let Some(ip) = ctx.client_ip {
            upstream.insert_header("x-forwarded-for", ip.to_string())?;
            upstream.insert_header("x-real-ip", ip.to_string())?;
        }
        upstream.insert_header("x-forwarded-proto", "https")?;
        if let Some(host) = authority(session.req_header()) {
            upstream.insert_header("x-forwarded-host", host.to_string())?;
        }
        upstream.remove_header("x-forwarded-prefix");
        if let Some(app) = &ctx.app
            && let Some(prefix) = app.prefix()
        {
            let uri = &session.req_header().uri;
            let path = crate::paas::strip_prefix(uri.path(), &app.name);
            let target = match uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            let uri = target
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "app path", e))?;
            upstream.set_uri(uri);
            upstream.insert_header("x-forwarded-prefix", prefix)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(started) = ctx.upstream_started.take() {
            metrics::histogram!("portico_gateway_upstream_seconds", "route" => ctx.route.name().to_string())
                .record(started.elapsed().as_secs_f64());
        }
        if let Some(app) = &ctx.app {
            let prefix = app.prefix();
            for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
                let rewritten = resp
                    .headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| {
                        crate::paas::public_location(
                            l,
                            &app.origin,
                            &app.public_host,
                            prefix.as_deref(),
                            app.host_port,
                        )
                    });
                if let Some(l) = rewritten {
                    resp.insert_header(name, l)?;
                }
            }
        }
        if let Some((cookie, true)) = &ctx.sticky {
            resp.append_header(
                http::header::SET_COOKIE,
                format!("{STICKY_COOKIE}={cookie}; Path=/; Secure; HttpOnly; SameSite=Lax"),
            )?;
        }
        crate::headers::secure(resp)
    }

    /// An app whose container does not answer gets a page, not a 502.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream if ctx.app.is_some() => 503,
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code == 503
            && session.response_written().is_none()
            && let Some(app) = &ctx.app
        {
            let text = format!(
                "The app {} is not answering right now. Try again in a moment.",
                app.name
            );
            let _ = page(session, 503, "App unavailable", &text).await;
        } else if code > 0 {
            let _ = session.respond_error(code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Pingora's own summary (in its error logs) prints the raw target,
    /// query included, where `?token=` may carry a credential: path only.
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        let host = authority(req).unwrap_or("-");
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if let Some(stream) = session.stream() {
            crate::guard::request_done(stream);
        }
        if ctx.websocket {
            metrics::gauge!("portico_gateway_websockets").decrement(1.0);
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let route = ctx.route.name().to_string();
        metrics::counter!("portico_gateway_requests_total", "route" => route.clone(), "status" => status.to_string())
            .increment(1);
        metrics::histogram!("portico_gateway_request_duration_seconds", "route" => route.clone())
            .record(elapsed.as_secs_f64());
        let req = session.req_header();
        tracing::info!(
            target: "access",
            client = ?ctx.client_ip,
            method = %req.method,
            path = req.uri.path(),
            status,
            route = %route,
            app = ctx.app.as_ref().map(|a| &*a.name),
            upstream = ctx.upstream.map(|a| a.to_string()),
            ms = elapsed.as_millis() as u64,
            error = e.map(|e| e.to_string()),
        );
    }
}
