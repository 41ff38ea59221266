//! Portico gateway: the public HTTPS edge, built on Pingora.
//!
//! [`build`] assembles a Pingora server from the configuration: the HTTPS
//! listener ([`proxy`], certificates from [`tls`]), the plain-HTTP redirect
//! ([`redirect`]), health checks of the chat shards, the hosted-app route
//! table ([`paas`]) and the admin endpoints.
//! [`run`] blocks until the stop token or a signal ends it: SIGTERM/SIGINT
//! drain gracefully, SIGQUIT hands the listening sockets to a new process
//! started with `--upgrade` (zero-downtime restart).

pub mod acme;
pub mod answer;
pub mod drain;
pub mod files;
pub mod forward;
pub mod guard;
pub mod h1;
pub mod headers;
pub mod limits;
pub mod paas;
pub mod proxy;
pub mod redirect;
pub mod reload;
pub mod routes;
pub mod screen;
pub mod tls;
pub mod tls_stream;
pub mod tunnel;

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::lb::LoadBalancer;
use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::consistent::KetamaHashing;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use portico_common::admin::{self, Readiness};
use portico_common::auth::Tokens;
use portico_config::PorticoConfig;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("auth.jwt_secret is not set (PORTICO_AUTH__JWT_SECRET)")]
    NoSecret,
    #[error("chat shard list: {0}")]
    Shards(std::io::Error),
    #[error("pingora: {0}")]
    Pingora(String),
    #[error("TLS configuration: {0}")]
    TlsConfig(rustls::Error),
}

/// Builds the gateway. `upgrade`: take the listening sockets over from a
/// running gateway (graceful upgrade, see ARCHITECTURE.md).
/// How the configuration was obtained, so SIGHUP can do it again.
#[derive(Debug, Clone, Default)]
pub struct Reload {
    /// The file to re-read (routes only change live).
    pub config_path: Option<std::path::PathBuf>,
    /// Applied to the reloaded configuration (see `reload::Reloader`).
    pub adjust: Option<fn(&mut PorticoConfig)>,
}

/// A built gateway, ready to [`run`].
pub struct Gateway {
    server: Server,
    /// Started by the signal that stops or upgrades the process.
    drain: Arc<drain::Drain>,
}

pub fn build(cfg: &PorticoConfig, reload: Reload, upgrade: bool) -> Result<Gateway, GatewayError> {
    let g = &cfg.gateway;
    if cfg.auth.jwt_secret.is_empty() {
        return Err(GatewayError::NoSecret);
    }
    describe_metrics();
    let certs = tls::CertStore::open(&cfg.data_dir.join("certs"))?;
    // With ACME too: served until the first certificate is issued.
    certs.ensure_self_signed(&g.hostnames)?;
    // App hostnames (`<app>.<domain>`): one wildcard certificate, stored
    // under the domain's name; replace it with a real one there.
    certs.ensure_self_signed_wildcard(&cfg.paas.domain)?;
    let challenges = Arc::new(acme::Challenges::default());

    let conf = ServerConf {
        threads: g.threads,
        grace_period_seconds: Some(g.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(g.shutdown_timeout_secs),
        upgrade_sock: cfg.data_dir.join("gateway-upgrade.sock").display().to_string(),
        pid_file: cfg.data_dir.join("gateway.pid").display().to_string(),
        // One runtime per thread: a connection stays on the thread that
        // accepted it, so there are no cross-thread wake-ups per request
        // (measured: loadtest/results/static.md, proxy.json).
        work_stealing: false,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut shards = LoadBalancer::<KetamaHashing>::try_from_iter(g.chat_shards.iter().map(|a| a.0))
        .map_err(GatewayError::Shards)?;
    shards.set_health_check(TcpHealthCheck::new());
    shards.health_check_frequency = Some(Duration::from_secs(1));
    let health = background_service("chat shard health", shards);

    let limits = Arc::new(limits::Limits::new(&g.limits));
    let routes = Arc::new(ArcSwap::from_pointee(routes::Routes::from_config(g)));
    let tokens = Tokens::new(&cfg.auth.jwt_secret);
    let apps = Arc::new(paas::AppRoutes::new(&cfg.paas.domain, g.max_body_bytes));
    let poller = paas::RoutesPoller {
        routes: apps.clone(),
        url: format!("http://{}/api/paas/routes", g.jobs_upstream.0),
        tokens: tokens.clone(),
        every: Duration::from_millis(cfg.paas.routes_poll_ms),
    };
    let edge_chat = health.task();
    let edge = proxy::Edge {
        routes: routes.clone(),
        chat: edge_chat.clone(),
        tokens,
        limits: limits.clone(),
        trusted_proxies: g.trusted_proxies.clone(),
        apps,
        max_headers: g.connections.max_headers,
        body_timeout: Duration::from_secs(g.connections.body_timeout_secs),
        body_min_rate: g.connections.body_min_bytes_per_sec,
        send_timeout: Duration::from_secs(g.connections.send_timeout_secs),
    };
    let conns = &g.connections;
    // Plain HTTP/1.1 requests are served by the gateway's own loop (`h1`).
    let lean: Arc<dyn guard::Lean> = Arc::new(edge.clone());
    let mut proxy = pingora::proxy::http_proxy(&server.configuration, edge);
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(Duration::from_secs(conns.keepalive_idle_secs));
    proxy.server_options = Some(options);
    let mut h2 = default_h2_options();
    h2.max_concurrent_streams(conns.h2_max_concurrent_streams);
    h2.max_header_list_size(conns.max_header_bytes as u32);
    proxy.h2_options = Some(h2);
    let drain = drain::Drain::new(Duration::from_secs(g.grace_period_secs));
    let acceptor = tls_stream::acceptor(certs.resolver()).map_err(GatewayError::TlsConfig)?;
    // The guard terminates TLS itself (after its caps, under its deadline).
    // One guard for both listeners: the caps count a client's connections
    // on either port.
    let guard = guard::Guard::new(conns.clone(), g.trusted_proxies.clone(), drain.clone());
    let app = guard::GuardedApp {
        inner: Arc::new(proxy),
        guard: guard.clone(),
        tls: Some(acceptor),
        lean: Some(lean),
    };
    let mut https = Service::new("https".to_string(), app);
    // Unbuffered both ways below TLS: Pingora's 64 KiB read buffer would be
    // allocated per connection up front (rustls keeps its own record
    // buffer), and a write buffer here would hold 4 KiB for the life of
    // every connection. Writes are gathered above TLS instead, by the
    // guard, and only while a response is written (`guard::OUT_BUFFER`).
    let listener = ListenerConfig::tcp(g.https_listen.to_string()).l4_buffer(L4BufferSettings::unbuffered());
    https.add_listener(listener);

    let redirect = pingora::proxy::http_proxy(
        &server.configuration,
        redirect::Redirect {
            https_port: g.https_listen.port(),
            challenges: challenges.clone(),
            hostnames: g.hostnames.clone(),
            paas_domain: cfg.paas.domain.to_ascii_lowercase(),
        },
    );
    let app = guard::GuardedApp {
        inner: Arc::new(redirect),
        guard,
        tls: None,
        lean: None,
    };
    let mut http = Service::new("http redirect".to_string(), app);
    // Unbuffered too: Pingora's HTTP/1 reader keeps its own buffer.
    let listener = ListenerConfig::tcp(g.http_listen.to_string()).l4_buffer(L4BufferSettings::unbuffered());
    http.add_listener(listener);

    let admin = background_service(
        "admin",
        AdminEndpoints {
            addr: g.admin_listen.0,
            chat: edge_chat.clone(),
        },
    );

    server.add_service(health);
    server.add_service(https);
    server.add_service(http);
    server.add_service(admin);
    server.add_service(background_service("app routes", poller));
    server.add_service(background_service(
        "rate limit eviction",
        LimitsGc {
            limits,
            routes: routes.clone(),
        },
    ));
    if let Some(acme_cfg) = &g.acme {
        let service = acme::AcmeService {
            cfg: acme_cfg.clone(),
            hostnames: g.hostnames.clone(),
            store: certs.clone(),
            challenges,
            dir: cfg.data_dir.join("acme"),
        };
        server.add_service(background_service("acme", service));
    }
    let reloader = reload::Reloader {
        config: reload.config_path,
        routes,
        adjust: reload.adjust,
    };
    server.add_service(background_service("config reload", reloader));
    server.add_service(background_service(
        "systemd notify",
        Notify {
            https: g.https_listen.0,
        },
    ));
    Ok(Gateway { server, drain })
}

/// Runs the server until `stop` fires or a signal arrives; blocks.
pub fn run(gateway: Gateway, stop: CancellationToken) {
    tracing::info!("gateway starting");
    gateway.server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            stop,
            drain: gateway.drain,
        }),
    });
    tracing::info!("gateway stopped");
}

/// Maps our stop token and the Unix signals onto Pingora's shutdown kinds;
/// every one of them starts the WebSocket drain (see [`drain`]).
struct Signals {
    stop: CancellationToken,
    drain: Arc<drain::Drain>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = signal(SignalKind::quit()).expect("install SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        let signal = tokio::select! {
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            // SIGINT drains like SIGTERM: a Ctrl-C must not cut requests.
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::GracefulTerminate,
            _ = self.stop.cancelled() => ShutdownSignal::GracefulTerminate,
        };
        // An upgrade is not a stop: the new process has told systemd it is
        // the main process now; STOPPING from this one would stop the unit.
        if !matches!(signal, ShutdownSignal::GracefulUpgrade) {
            portico_common::notify::stopping();
        }
        self.drain.start();
        signal
    }
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    let _ = portico_common::telemetry::metrics();
    describe_counter!(
        "portico_gateway_upstream_errors_total",
        "Requests that failed on the upstream side, by route and kind (connect, timeout, io)."
    );
    metrics::describe_gauge!(
        "portico_gateway_chat_shards",
        "Chat shards by health-check state (healthy, down)."
    );
    describe_counter!(
        "portico_gateway_requests_total",
        "HTTPS requests, by route and status."
    );
    describe_histogram!(
        "portico_gateway_request_duration_seconds",
        Unit::Seconds,
        "Time from request to the end of the response, by route."
    );
    describe_histogram!(
        "portico_gateway_upstream_seconds",
        Unit::Seconds,
        "Time from picking an upstream to its response header (connect included), by route."
    );
    describe_counter!(
        "portico_gateway_rate_limited_total",
        "Requests answered 429, by route."
    );
    describe_counter!(
        "portico_gateway_app_route_updates_total",
        "Times the hosted-app route table changed (fetched from the jobs service)."
    );
    describe_counter!(
        "portico_gateway_reloads_total",
        "SIGHUP configuration reloads, by result."
    );
    describe_counter!(
        "portico_gateway_acme_failures_total",
        "Failed ACME account or certificate attempts."
    );
    describe_counter!(
        "portico_gateway_connections_refused_total",
        "HTTPS connections closed at accept because a cap was reached, by cap (total, per_ip)."
    );
    describe_counter!(
        "portico_gateway_tls_handshake_failures_total",
        "TLS handshakes that failed (error) or missed handshake_timeout_secs (timeout)."
    );
    describe_counter!(
        "portico_gateway_requests_rejected_total",
        "Requests refused before routing: header_timeout (408), header_too_large (431)."
    );
    metrics::describe_gauge!(
        "portico_gateway_connections",
        "Client connections open on the HTTPS and plain-HTTP listeners."
    );
    describe_counter!(
        "portico_gateway_handovers_total",
        "HTTP/1 requests the gateway's own loop handed to Pingora (the connection comes back after each), by why: compressible, upgrade, body, connection, version, target, malformed, files."
    );
    describe_counter!(
        "portico_gateway_client_disconnects_total",
        "Clients that went away (reset, no TLS close_notify, closed mid-request, timed out), by cause."
    );
    describe_counter!(
        "portico_gateway_upstream_pool_misses_total",
        "Pooled upstream connections Pingora could not take back (it connects anew; logged by Pingora as an error, which it is not)."
    );
    describe_counter!(
        "portico_gateway_websockets_upstream_lost_total",
        "WebSockets whose upstream ended without a close frame, told 1012 by the gateway."
    );
    describe_counter!(
        "portico_gateway_websockets_drained_total",
        "WebSockets this process closed with 1001 on a stop or upgrade."
    );
    metrics::describe_gauge!(
        "portico_gateway_websockets",
        "WebSocket connections open through the gateway."
    );
    metrics::describe_gauge!(
        "portico_gateway_certificate_expiry_seconds",
        Unit::Seconds,
        "Seconds until the served certificate expires, by host."
    );
}

/// Evicts idle rate-limit keys every 30 s.
struct LimitsGc {
    limits: Arc<limits::Limits>,
    routes: Arc<ArcSwap<routes::Routes>>,
}

#[async_trait]
impl BackgroundService for LimitsGc {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    self.limits.gc();
                    self.routes.load().classes().iter().for_each(|c| c.gc());
                }
            }
        }
    }
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) that this process is
/// the service's main process and ready, once the HTTPS listener takes
/// connections: at the first start, and in a new process of an upgrade,
/// which thereby takes the main-process role from the old one before that
/// one exits (see deploy/systemd/portico-gateway.service).
struct Notify {
    https: std::net::SocketAddr,
}

#[async_trait]
impl BackgroundService for Notify {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let probe = match self.https.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => {
                std::net::SocketAddr::from(([127, 0, 0, 1], self.https.port()))
            }
            ip if ip.is_unspecified() => {
                std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.https.port()))
            }
            _ => self.https,
        };
        loop {
            if tokio::net::TcpStream::connect(probe).await.is_ok() {
                portico_common::notify::ready_as_main();
                return;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// `/metrics`, `/healthz`, `/readyz` on the private admin address. Ready
/// means at least one chat shard passes its health check (503 names the
/// shards that are down otherwise).
struct AdminEndpoints {
    addr: std::net::SocketAddr,
    chat: Arc<LoadBalancer<KetamaHashing>>,
}

/// `Err` naming the down shards when none is healthy.
fn shards_ready(chat: &LoadBalancer<KetamaHashing>) -> Result<(), String> {
    let all = chat.backends().get_backend();
    let down: Vec<String> = all
        .iter()
        .filter(|b| !chat.backends().ready(b))
        .map(|b| b.addr.to_string())
        .collect();
    if !all.is_empty() && down.len() == all.len() {
        return Err(format!("no healthy chat shard (down: {})", down.join(", ")));
    }
    Ok(())
}

#[async_trait]
impl BackgroundService for AdminEndpoints {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // During a graceful upgrade the old process still holds the admin
        // port (it is not among the sockets Pingora hands over): retry.
        let mut warned = false;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    if !warned {
                        tracing::warn!(addr = %self.addr, error = %e, "admin address busy; retrying");
                        warned = true;
                    }
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        };
        let _ = portico_common::telemetry::metrics();
        // The shards' health as Prometheus sees it (alerts: shard down, no
        // healthy shard), refreshed every second.
        let gauge_chat = self.chat.clone();
        let gauges = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let all = gauge_chat.backends().get_backend();
                let healthy = all.iter().filter(|b| gauge_chat.backends().ready(b)).count();
                metrics::gauge!("portico_gateway_chat_shards", "state" => "healthy").set(healthy as f64);
                metrics::gauge!("portico_gateway_chat_shards", "state" => "down")
                    .set((all.len() - healthy) as f64);
            }
        });
        let chat = self.chat.clone();
        let app = admin::router(Readiness::new(move || {
            let result = shards_ready(&chat);
            async move { result }
        }));
        let stopped = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "admin endpoints failed");
        }
        gauges.abort();
    }
}
