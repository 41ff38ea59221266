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

use crate::answer::{Canned, not_found};
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
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: http::HeaderName = http::HeaderName::from_static("x-real-ip");
/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Edge {
    /// Swapped whole on SIGHUP (see `reload`).
    pub routes: Arc<ArcSwap<Routes>>,
    pub chat: Arc<LoadBalancer<KetamaHashing>>,
    pub tokens: Tokens,
    pub limits: Arc<Limits>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Hosted apps (`<app>.<paas domain>`; `/paas/<app>/` redirects there).
    pub apps: Arc<AppRoutes>,
    /// Header lines a request may have (HTTP/1 is counted by the guard).
    pub max_headers: usize,
    /// Request bodies: pause allowance and slowest average rate.
    pub body_timeout: Duration,
    /// How long a response may wait for the client to read (both paths).
    pub send_timeout: Duration,
    pub body_min_rate: u64,
}

/// Bodies up to this size are read whole before an upstream connection is
/// taken (Pingora's retry buffer holds them and replays them upstream).
pub(crate) const BUFFERED_BODY: u64 = 64 * 1024;

/// A request for a hosted app: what the response rewrite needs.
pub struct AppCtx {
    name: Arc<str>,
    /// `https://` and the Host the client used.
    origin: String,
    public_host: String,
    host_port: u16,
}

pub struct Ctx {
    pub(crate) route: Arc<Route>,
    /// The subject of a valid token on the request, if any.
    user: Option<String>,
    /// Anonymous chat clients: the sticky cookie's value, and whether it is
    /// new (then the response sets it).
    sticky: Option<(String, bool)>,
    started: Instant,
    pub(crate) client_ip: Option<IpAddr>,
    body_bytes: u64,
    /// The upstream picked for this request (access log), and when.
    upstream: Option<std::net::SocketAddr>,
    upstream_started: Option<Instant>,
    /// A shard that refused this request's connection: skipped on retry.
    failed_shard: Option<std::net::SocketAddr>,
    /// Counted in the open-WebSocket gauge (undone in `logging`).
    websocket: bool,
    /// The request became a tunnel of ours (`tunnel`), which logs it when
    /// it ends; Pingora's session holds a stand-in.
    tunnel: bool,
    /// Set when the request is for a hosted app.
    pub(crate) app: Option<AppCtx>,
    /// When the first byte of a streamed request body arrived.
    body_started: Option<Instant>,
}

/// The host (and port) the client addressed: the URI's authority (HTTP/2
/// `:authority`, absolute-form HTTP/1) or else the `Host` header.
pub(crate) fn authority(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default())
        .or_else(|| req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
}

/// `/metrics`, `/healthz`, `/readyz` (and below): the chat shards' and jobs'
/// operational endpoints, which the edge never proxies.
fn is_internal(path: &str) -> bool {
    ["/metrics", "/healthz", "/readyz"].iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

impl Edge {
    /// The client's address: the socket peer, or, when the peer is a
    /// trusted proxy, the last `X-Forwarded-For` hop it did not add itself.
    pub(crate) fn client_ip(&self, peer: Option<IpAddr>, req: &RequestHeader) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let xff = req.headers.get_all("x-forwarded-for");
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

    /// [`crate::screen`]'s checks; the request's path normalized in place.
    fn screen(&self, req: &mut RequestHeader) -> std::result::Result<(), crate::screen::Refusal> {
        crate::screen::check_head(req, self.max_headers)?;
        let path = match crate::screen::normalize_path(req.uri.path())? {
            std::borrow::Cow::Borrowed(_) => return Ok(()),
            std::borrow::Cow::Owned(p) => p,
        };
        let bad = crate::screen::Refusal {
            status: 400,
            reason: "path",
        };
        let mut parts = req.uri.clone().into_parts();
        let target = match req.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        parts.path_and_query = Some(target.parse().map_err(|_| bad)?);
        let uri = http::Uri::from_parts(parts).map_err(|_| bad)?;
        req.set_uri(uri);
        Ok(())
    }

    /// 408 for a body that did not arrive in time.
    pub(crate) fn body_too_slow() -> Canned {
        metrics::counter!("portico_gateway_requests_rejected_total", "reason" => "body_too_slow")
            .increment(1);
        Canned::status(408)
    }

    /// The user a request authenticates as: the subject of a token (bearer,
    /// WebSocket subprotocol or `?token=`) that verifies.
    fn user(&self, req: &RequestHeader) -> Option<String> {
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
    fn sticky_cookie(req: &RequestHeader) -> (String, bool) {
        let sent = req
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

    /// Where a request goes, decided from its head alone and without side
    /// effects but the count of a refusal: the screen (the path normalized
    /// in place), the route (`ctx.route`, `ctx.app`), or the answer when
    /// it goes nowhere. `ctx.client_ip` is set.
    pub(crate) fn route(&self, req: &mut RequestHeader, ctx: &mut Ctx) -> Option<Canned> {
        if let Err(refusal) = self.screen(req) {
            metrics::counter!("portico_gateway_requests_rejected_total", "reason" => refusal.reason)
                .increment(1);
            return Some(Canned::status(refusal.status));
        }
        let host = authority(req).map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name));
        ctx.route = self.routes.load().route(host, req.uri.path()).clone();
        if let Some(site) = host.and_then(|h| self.apps.site(h)) {
            ctx.route = site;
        } else if let Some(m) = self.apps.resolve(host, req.uri.path()) {
            match m.state {
                None => {
                    return Some(Canned::page(
                        404,
                        "No such app",
                        "No app is deployed at this address.",
                    ));
                }
                Some(_) if m.by == Addressed::Prefix => {
                    // Apps live only on their own origin: on a shared one
                    // their cookies, service workers and scripts would reach
                    // every other app and the chat.
                    let port = authority(req)
                        .and_then(|a| a.rsplit_once(':'))
                        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                        .map(|(_, p)| format!(":{p}"))
                        .unwrap_or_default();
                    let rest = crate::paas::strip_prefix(req.uri.path());
                    let q = req.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
                    let location = format!("https://{}.{}{port}{rest}{q}", m.name, self.apps.domain());
                    return Some(Canned::Moved { location });
                }
                Some(AppState::Stopped) => {
                    return Some(Canned::page(
                        503,
                        "App stopped",
                        format!("The app {} is stopped.", m.name),
                    ));
                }
                Some(AppState::Down) => return Some(crate::answer::app_unavailable(&m.name)),
                Some(AppState::NotDeployed) => {
                    let text = format!("The app {} has not been deployed yet.", m.name);
                    return Some(Canned::page(503, "App not deployed", text));
                }
                Some(AppState::Running(route)) => {
                    let public = authority(req).unwrap_or_default().to_string();
                    let host_port = match route.target {
                        Target::Upstream(a) => a.port(),
                        Target::Chat | Target::Files => 0,
                    };
                    ctx.app = Some(AppCtx {
                        name: m.name,
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
        // The services' operational endpoints are for the admin listeners
        // only: the edge never hands them to a stranger.
        if ctx.route.is_chat() && is_internal(req.uri.path()) {
            return Some(not_found());
        }
        None
    }

    /// Who the client is and whether it may go on: the token's user where
    /// the user matters, the sticky cookie, and the rate limits (which
    /// count this request). `None`: admitted.
    pub(crate) fn admit(&self, req: &RequestHeader, upgrade: bool, ctx: &mut Ctx) -> Option<Canned> {
        // A token costs an HMAC: verify it only where the user matters.
        if ctx.route.is_chat() || ctx.route.class.as_ref().is_some_and(|c| c.limits_users()) {
            ctx.user = self.user(req);
        }
        if ctx.route.is_chat() && ctx.user.is_none() {
            ctx.sticky = Some(Self::sticky_cookie(req));
        }
        let ip = ctx.client_ip?;
        let verdict = if upgrade {
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
        let wait = verdict.err()?;
        metrics::counter!("portico_gateway_rate_limited_total", "route" => ctx.route.name().to_string())
            .increment(1);
        Some(Canned::Status {
            status: 429,
            retry_after: Some(wait),
        })
    }

    /// A `413` if the declared body is over the route's limit.
    pub(crate) fn body_limit(declared: Option<u64>, ctx: &Ctx) -> Option<Canned> {
        declared
            .filter(|n| *n > ctx.route.max_body_bytes)
            .map(|_| Canned::status(413))
    }
}

/// The request's declared `Content-Length`, if it is one number.
pub(crate) fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| crate::screen::content_length(v.as_bytes()))
}

/// Whether an answer to this path is never compressed: API answers carry
/// tokens next to attacker-influenced text, which is what BREACH needs.
pub(crate) fn never_compressed(path: &str) -> bool {
    path.starts_with("/api/") || path.starts_with("/demo/token")
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
            tunnel: false,
            app: None,
            body_started: None,
        }
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        // gzip (level 6) for compressible types (text, JS, CSS, SVG…).
        modules.add_module(ResponseCompressionBuilder::enable(6));
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        ctx.client_ip = self.client_ip(peer, session.req_header());
        // A client that stops reading its answer is let go.
        session.set_write_timeout(Some(self.send_timeout));
        let upgrade = session.is_upgrade_req();
        if let Some(answer) = self
            .route(session.req_header_mut(), ctx)
            .or_else(|| self.admit(session.req_header(), upgrade, ctx))
        {
            return answer.write(session).await;
        }
        // File routes are answered here, after the screen and the limits.
        if ctx.route.target == Target::Files {
            return match ctx.route.files.clone() {
                Some(files) => crate::files::serve(session, &files).await,
                None => not_found().write(session).await,
            };
        }
        let declared = declared_length(session.req_header());
        if let Some(answer) = Self::body_limit(declared, ctx) {
            return answer.write(session).await;
        }
        if never_compressed(session.req_header().uri.path())
            && let Some(c) = session.downstream_modules_ctx.get_mut::<ResponseCompression>()
        {
            c.adjust_level(0);
        }
        if session.is_upgrade_req() {
            let overread = session.stream().and_then(crate::guard::overread);
            if overread.is_some_and(|n| crate::tunnel::can_take(session, n)) {
                return self.open_tunnel(session, ctx).await;
            }
            // Pingora proxies the rest (a body or bytes read behind the
            // head): its fixed 60 s read timeout would cut idle WebSockets.
            session.set_read_timeout(Some(WS_IDLE));
            metrics::gauge!("portico_gateway_websockets").increment(1.0);
            ctx.websocket = true;
            return Ok(false);
        }
        // A body may pause at most `body_timeout` between reads.
        session.set_read_timeout(Some(self.body_timeout));
        if let Some(n) = declared.filter(|n| (1..=BUFFERED_BODY).contains(n)) {
            // Small bodies arrive whole before an upstream connection is
            // taken: a slow client holds only its own connection.
            let deadline = self.body_timeout + Duration::from_secs(n / self.body_min_rate);
            session.enable_retry_buffering();
            let read = async {
                while !session.is_body_done() {
                    if session.read_request_body().await?.is_none() {
                        break;
                    }
                }
                Ok::<_, Box<Error>>(())
            };
            match tokio::time::timeout(deadline, read).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if *e.etype() == ErrorType::ReadTimedout => {
                    return Self::body_too_slow().write(session).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Self::body_too_slow().write(session).await,
            }
        }
        if forwardable(session, declared) {
            return self.forward(session, ctx).await;
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
        // A streamed body must keep up `body_min_rate` on average after the
        // `body_timeout` allowance, or it would hold its upstream forever.
        let started = *ctx.body_started.get_or_insert_with(Instant::now);
        let allowed = self.body_timeout + Duration::from_secs(ctx.body_bytes / self.body_min_rate);
        if started.elapsed() > allowed {
            metrics::counter!("portico_gateway_requests_rejected_total", "reason" => "body_too_slow")
                .increment(1);
            return Err(Error::new(ErrorType::HTTPStatus(408)));
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let addr = self.upstream_addr(ctx)?;
        ctx.upstream = addr.as_inet().copied();
        ctx.upstream_started = Some(Instant::now());
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
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
        self.forward_headers(upstream, authority(session.req_header()).map(str::to_string), ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.filter_response(resp, ctx)
    }

    /// An app whose container does not answer gets a page, not a 502.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, answer) = failure(e, ctx);
        if let Some(answer) = answer.filter(|_| session.response_written().is_none()) {
            let _ = answer.write(session).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client that goes away (tab closed, reset, no TLS close_notify,
    /// a body it stopped sending) is ordinary: counted by cause and logged
    /// at DEBUG, never as a proxy ERROR. Everything else is logged.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        if *e.esource() != ErrorSource::Downstream {
            return false;
        }
        let cause = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                crate::guard::disconnect_cause(e.root_cause())
            }
            _ => return false,
        };
        metrics::counter!("portico_gateway_client_disconnects_total", "cause" => cause).increment(1);
        tracing::debug!(cause, error = %e, "client went away");
        true
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
        if ctx.tunnel {
            return; // the tunnel logs the request when it ends
        }
        if ctx.websocket {
            metrics::gauge!("portico_gateway_websockets").decrement(1.0);
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        log_request(session.req_header(), status, ctx, e);
    }
}

/// The access log line and request metrics of a request that was not
/// upgraded (a tunnel logs its own when it ends).
pub(crate) fn log_request(req: &RequestHeader, status: u16, ctx: &Ctx, e: Option<&Error>) {
    access(Access {
        client: ctx.client_ip,
        method: &req.method,
        path: req.uri.path(),
        status,
        route: &ctx.route,
        app: ctx.app.as_ref().map(|a| &*a.name),
        upstream: ctx.upstream,
        elapsed: ctx.started.elapsed(),
        bytes: None,
        error: e.map(|e| e.to_string()),
    });
}

/// One line of the access log, with the request metrics.
struct Access<'a> {
    client: Option<IpAddr>,
    method: &'a http::Method,
    path: &'a str,
    status: u16,
    route: &'a Route,
    app: Option<&'a str>,
    upstream: Option<std::net::SocketAddr>,
    elapsed: Duration,
    /// A tunnel's bytes, client to upstream and back.
    bytes: Option<(u64, u64)>,
    error: Option<String>,
}

fn access(a: Access<'_>) {
    a.route.count_request(a.status, a.elapsed);
    tracing::info!(
        target: "access",
        client = ?a.client,
        method = %a.method,
        path = a.path,
        status = a.status,
        route = a.route.name(),
        app = a.app,
        upstream = a.upstream.map(|a| a.to_string()),
        ms = a.elapsed.as_millis() as u64,
        up = a.bytes.map(|b| b.0),
        down = a.bytes.map(|b| b.1),
        error = a.error,
    );
}

/// What a request that failed is answered: the status (0 when the client
/// went away and hears nothing) and our own answer, if any (security
/// headers, no `Server: Pingora`; an app that does not answer gets a
/// page, not a 502). An upstream's failure is counted.
pub(crate) fn failure(e: &Error, ctx: &Ctx) -> (u16, Option<Canned>) {
    let code = match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        _ => match e.esource() {
            ErrorSource::Upstream if ctx.app.is_some() => 503,
            ErrorSource::Upstream => match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout => 504,
                _ => 502,
            },
            ErrorSource::Downstream => match e.etype() {
                // The client stopped sending its body: its fault, not
                // the upstream's.
                ErrorType::ReadTimedout => 408,
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    };
    if *e.esource() == ErrorSource::Upstream {
        let kind = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError => "connect",
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
            _ => "io",
        };
        upstream_error(&ctx.route, kind);
    }
    let answer = match &ctx.app {
        Some(app) if code == 503 => Some(crate::answer::app_unavailable(&app.name)),
        _ if code > 0 => Some(Canned::status(code)),
        _ => None,
    };
    (code, answer)
}

/// Counts a failure to reach or hear an upstream: `connect`, `timeout`, `io`.
fn upstream_error(route: &Route, kind: &'static str) {
    metrics::counter!(
        "portico_gateway_upstream_errors_total",
        "route" => route.name().to_string(),
        "kind" => kind
    )
    .increment(1);
}

/// Whether this request takes the gateway's own forwarding path
/// (`forward`): an HTTP/1 or HTTP/2 request in origin form, without a
/// streamed body (none, or one of `declared` bytes already read whole) and
/// whose `Connection` header names nothing to drop. The rest (streamed or
/// large bodies, `Expect`, upgrades that are not tunnels) is Pingora's.
fn forwardable(session: &mut Session, declared: Option<u64>) -> bool {
    use pingora::protocols::http::ServerSession;
    let req = session.req_header();
    if !matches!(
        *session.downstream_session,
        ServerSession::H1(_) | ServerSession::H2(_)
    ) || req.method == http::Method::CONNECT
        || !req.raw_path().starts_with(b"/")
        || req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req.headers.contains_key(http::header::EXPECT)
        || !crate::forward::plain_connection(req)
    {
        return false;
    }
    match declared {
        None if req.headers.contains_key(http::header::CONTENT_LENGTH) => false,
        None | Some(0) => session.is_body_empty(),
        Some(n) => {
            session.is_body_done()
                && !session.retry_buffer_truncated()
                && session.get_retry_buffer().is_some_and(|b| b.len() as u64 == n)
        }
    }
}

/// What the gateway tells an upstream about a request (once the client's
/// own claims, [`crate::screen::is_spoofable`], are gone): each header and
/// its value given to `put`. `host`: the one the client addressed.
pub(crate) fn forwarded(ctx: &Ctx, host: Option<&str>, mut put: impl FnMut(http::HeaderName, &[u8])) {
    if let Some(ip) = ctx.client_ip {
        // Written in place: an address is at most 45 bytes of text.
        let mut text = [0u8; 48];
        let len = {
            let mut w = &mut text[..];
            let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
            48 - w.len()
        };
        put(X_FORWARDED_FOR, &text[..len]);
        put(X_REAL_IP, &text[..len]);
    }
    put(X_FORWARDED_PROTO, b"https");
    if let Some(host) = host {
        put(X_FORWARDED_HOST, host.as_bytes());
    }
}

/// Records how long the upstream took to answer, once.
pub(crate) fn upstream_heard(ctx: &mut Ctx) {
    if let Some(started) = ctx.upstream_started.take() {
        ctx.route.upstream_answered(started.elapsed());
    }
}

/// The `Set-Cookie` of a sticky cookie made for this request, if one was.
pub(crate) fn new_sticky_cookie(ctx: &Ctx) -> Option<String> {
    match &ctx.sticky {
        Some((cookie, true)) => Some(format!(
            "{STICKY_COOKIE}={cookie}; Path=/; Secure; HttpOnly; SameSite=Lax"
        )),
        _ => None,
    }
}

/// An error of the forwarding path as Pingora's proxy would have named it
/// (`fail_to_proxy` turns it into a 502 or 504 and counts it).
pub(crate) fn upstream_failure(e: crate::forward::ForwardError) -> Box<Error> {
    let kind = if e.is_timeout() {
        ErrorType::ReadTimedout
    } else {
        ErrorType::ReadError
    };
    Error::explain(kind, e.to_string()).into_up()
}

/// What a tunnel needs to log its request when it ends.
struct TunnelLog {
    client: Option<IpAddr>,
    method: http::Method,
    path: Box<str>,
    route: Arc<Route>,
    app: Option<Arc<str>>,
    upstream: Option<std::net::SocketAddr>,
    started: Instant,
}

impl Edge {
    /// Where this request goes: a healthy chat shard on the user's point of
    /// the ring (not one that just refused it), or the route's upstream.
    fn upstream_addr(&self, ctx: &Ctx) -> Result<pingora::protocols::l4::socket::SocketAddr> {
        Ok(match ctx.route.target {
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
            // Answered in `request_filter`; never proxied.
            Target::Files => {
                return Err(Error::explain(
                    ErrorType::ConnectNoRoute,
                    "a file route has no upstream",
                ));
            }
        })
    }

    /// The request head as the upstream gets it: what the client claims
    /// about itself removed, what we saw said instead.
    fn forward_headers(&self, upstream: &mut RequestHeader, host: Option<String>, ctx: &Ctx) -> Result<()> {
        let spoofed: Vec<http::HeaderName> = upstream
            .headers
            .keys()
            .filter(|name| crate::screen::is_spoofable(name.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in spoofed {
            upstream.remove_header(&name);
        }
        let mut result = Ok(());
        forwarded(ctx, host.as_deref(), |name, value| {
            let set = http::HeaderValue::from_bytes(value)
                .or_err(ErrorType::InternalError, "a forwarded header")
                .and_then(|value| upstream.insert_header(name, value));
            if let Err(e) = set {
                result = Err(e);
            }
        });
        result
    }

    /// The upstream's response head as the client gets it (the loop's
    /// writer, `h1`, applies the same rules to a head it writes itself).
    fn filter_response(&self, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        upstream_heard(ctx);
        if let Some(app) = &ctx.app {
            let site = crate::paas::Site {
                origin: &app.origin,
                public_host: &app.public_host,
                host_port: app.host_port,
            };
            crate::paas::confine_response(resp, &site)?;
        }
        if let Some(cookie) = new_sticky_cookie(ctx) {
            resp.append_header(http::header::SET_COOKIE, cookie)?;
        }
        crate::headers::secure(resp)
    }

    /// An upstream's head made for Pingora's session, filtered.
    pub(crate) fn client_head(&self, head: &crate::forward::Head, ctx: &mut Ctx) -> Result<ResponseHeader> {
        let mut resp = head.to_response_header().map_err(upstream_failure)?;
        self.filter_response(&mut resp, ctx)?;
        Ok(resp)
    }

    /// Connects to the request's upstream; a chat shard that refuses is
    /// skipped once for the next on the ring (as `fail_to_connect` does for
    /// Pingora's connections). `Err`: the status to answer and why.
    async fn connect(&self, ctx: &mut Ctx) -> std::result::Result<tokio::net::TcpStream, (u16, String)> {
        loop {
            let addr = self.upstream_addr(ctx).map_err(|e| (502, e.to_string()))?;
            let Some(&inet) = addr.as_inet() else {
                return Err((502, format!("{addr} is not a TCP address")));
            };
            ctx.upstream = Some(inet);
            ctx.upstream_started = Some(Instant::now());
            let failed =
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(inet)).await {
                    Ok(Ok(tcp)) => {
                        // Frames leave at once (see ARCHITECTURE.md).
                        let _ = tcp.set_nodelay(true);
                        return Ok(tcp);
                    }
                    Ok(Err(e)) => (502, format!("connecting to {inet}: {e}")),
                    Err(_) => (504, format!("connecting to {inet}: timed out")),
                };
            if !ctx.route.is_chat() || ctx.failed_shard.is_some() {
                return Err(failed);
            }
            tracing::debug!(shard = %inet, error = failed.1, "shard refused an upgrade; trying the next");
            ctx.failed_shard = Some(inet);
        }
    }

    /// A plain request forwarded by the gateway itself (see `forward`):
    /// the same upstream choice, forwarded headers and response filter as
    /// on Pingora's path, on a connection from this thread's pool.
    async fn forward(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let body = session.get_retry_buffer();
        let (head, mut conn) = self
            .exchange(session.req_header_mut(), body.as_deref(), ctx)
            .await?;
        let head = self.client_head(&head, ctx)?;
        let timeout = ctx.route.timeout;
        let down = |e: Box<Error>| e.into_down();
        // The upstream connection goes back to the pool as soon as the
        // body has been read, before the last write to the client: the
        // client's next request may come before this task runs again.
        if conn.is_done() {
            conn.release();
            session
                .write_response_header(Box::new(head), true)
                .await
                .map_err(down)?;
            return Ok(true);
        }
        session
            .write_response_header(Box::new(head), false)
            .await
            .map_err(down)?;
        let last = loop {
            let piece = conn.next_body(timeout).await.map_err(upstream_failure)?;
            if conn.is_done() {
                break piece;
            }
            session.write_response_body(piece, false).await.map_err(down)?;
        };
        conn.release();
        session.write_response_body(last, true).await.map_err(down)?;
        Ok(true)
    }

    /// Sends a plain request (`req` and its whole `body`) upstream on a
    /// connection from this thread's pool and reads the response head:
    /// the head as the upstream sent it (to be filtered for the client),
    /// and the connection whose body is still to be read
    /// ([`crate::forward::Conn::next_body`]).
    pub(crate) async fn exchange(
        &self,
        req: &mut RequestHeader,
        body: Option<&[u8]>,
        ctx: &mut Ctx,
    ) -> Result<(crate::forward::Head, crate::forward::Conn)> {
        let host = authority(req).map(str::to_string);
        // The client's head becomes the upstream's in place, not in a copy:
        // what is read of it from here on (method and path for the log, the
        // method for the response's framing) does not change.
        let version = req.version;
        // HTTP/2 names the host in `:authority`; HTTP/1.1 needs `Host`.
        if let Some(authority) = req
            .uri
            .authority()
            .filter(|_| !req.headers.contains_key(http::header::HOST))
        {
            let host = authority.as_str().to_string();
            req.insert_header(http::header::HOST, host)?;
        }
        crate::forward::strip_hop_by_hop(req);
        self.forward_headers(req, host, ctx)?;
        let mut wire =
            pingora::protocols::http::v1::client::http_req_header_to_wire(req).ok_or_else(|| {
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "the request cannot be written as HTTP/1.1",
                )
            })?;
        // The client's version stays its own (the upstream's is 1.1).
        req.set_version(version);
        let head_request = req.method == http::Method::HEAD;
        if let Some(body) = body {
            wire.extend_from_slice(body);
        }
        self.send(&wire, head_request, ctx).await
    }

    /// Sends `wire` (a request head for the upstream and its whole body)
    /// on a connection from this thread's pool, or a new one if the pooled
    /// one turns out closed, and reads the response head (see `exchange`).
    pub(crate) async fn send(
        &self,
        wire: &[u8],
        head_request: bool,
        ctx: &mut Ctx,
    ) -> Result<(crate::forward::Head, crate::forward::Conn)> {
        let timeout = ctx.route.timeout;
        let addr = self.upstream_addr(ctx).map_err(|e| e.into_up())?;
        ctx.upstream = addr.as_inet().copied();
        ctx.upstream_started = Some(Instant::now());
        let mut conn = match ctx.upstream.and_then(crate::forward::take) {
            Some(conn) => conn,
            None => self.open(ctx).await?,
        };
        let head = match conn.exchange(wire, head_request, timeout).await {
            Ok(head) => head,
            // The upstream closed its idle connection as the request left.
            Err(e) if conn.retry_on_new(&e) => {
                conn = self.open(ctx).await?;
                conn.exchange(wire, head_request, timeout)
                    .await
                    .map_err(upstream_failure)?
            }
            Err(e) => return Err(upstream_failure(e)),
        };
        Ok((head, conn))
    }

    /// A new connection for `forward`, failing as Pingora's would.
    async fn open(&self, ctx: &mut Ctx) -> Result<crate::forward::Conn> {
        match self.connect(ctx).await {
            Ok(tcp) => {
                let addr = ctx
                    .upstream
                    .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream"))?;
                Ok(crate::forward::Conn::new(tcp, addr))
            }
            Err((status, why)) => {
                let kind = if status == 504 {
                    ErrorType::ConnectTimedout
                } else {
                    ErrorType::ConnectError
                };
                Err(Error::explain(kind, why).into_up())
            }
        }
    }

    /// An upgrade (a WebSocket) joined to its upstream by a tunnel of ours
    /// (see `tunnel`): the handshake is done here, the `101` written
    /// through Pingora's session, and the session let go. A refusal (no
    /// `101`) is passed on as an ordinary response.
    async fn open_tunnel(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let route = ctx.route.clone();
        let mut upstream = match self.connect(ctx).await {
            Ok(tcp) => tcp,
            Err((status, why)) => {
                upstream_error(&route, "connect");
                tracing::warn!(route = route.name(), error = why, "upgrade not passed on");
                return Canned::status(status).write(session).await;
            }
        };
        let mut req = session.req_header().clone();
        self.forward_headers(&mut req, authority(session.req_header()).map(str::to_string), ctx)?;
        let answer = match tokio::time::timeout(route.timeout, crate::tunnel::handshake(&mut upstream, &req))
            .await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                upstream_error(&route, "io");
                tracing::warn!(route = route.name(), upstream = ?ctx.upstream, error = %e, "upgrade not passed on");
                return Canned::status(502).write(session).await;
            }
            Err(_) => {
                upstream_error(&route, "timeout");
                return Canned::status(504).write(session).await;
            }
        };
        let crate::tunnel::Answer { mut head, rest } = answer;
        self.filter_response(&mut head, ctx)?;
        if head.status != http::StatusCode::SWITCHING_PROTOCOLS {
            let body = tokio::time::timeout(
                route.timeout,
                crate::tunnel::refusal_body(&mut upstream, &head, rest),
            )
            .await;
            let body = match body {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => {
                    upstream_error(&route, "io");
                    tracing::warn!(route = route.name(), upstream = ?ctx.upstream, error = %e, "refusal not passed on");
                    return Canned::status(502).write(session).await;
                }
                Err(_) => {
                    upstream_error(&route, "timeout");
                    return Canned::status(504).write(session).await;
                }
            };
            let empty = body.is_empty();
            session.write_response_header(Box::new(head), empty).await?;
            if !empty {
                session.write_response_body(Some(body), true).await?;
            }
            return Ok(true);
        }
        let req = session.req_header();
        let log = TunnelLog {
            client: ctx.client_ip,
            method: req.method.clone(),
            path: req.uri.path().into(),
            route,
            app: ctx.app.as_ref().map(|a| a.name.clone()),
            upstream: ctx.upstream,
            started: ctx.started,
        };
        session.write_response_header(Box::new(head), false).await?;
        let Some(client) = crate::tunnel::take_client(session) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "upgrade on a session that is not HTTP/1",
            ));
        };
        ctx.tunnel = true;
        metrics::gauge!("portico_gateway_websockets").increment(1.0);
        tokio::spawn(async move {
            let ended = crate::tunnel::run(client, upstream, rest, WS_IDLE).await;
            metrics::gauge!("portico_gateway_websockets").decrement(1.0);
            access(Access {
                client: log.client,
                method: &log.method,
                path: &log.path,
                status: 101,
                route: &log.route,
                app: log.app.as_deref(),
                upstream: log.upstream,
                elapsed: log.started.elapsed(),
                bytes: Some((ended.up, ended.down)),
                error: ended.error,
            });
        });
        Ok(true)
    }
}
