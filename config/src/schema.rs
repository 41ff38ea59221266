//! The configuration schema and its defaults (the embedded, one-machine setup).
//!
//! Every struct denies unknown keys, so a typo is an error, not a silently
//! ignored setting. Defaults live in the `Default` impls and nowhere else.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ListenAddr, Secret};

/// The whole configuration; each binary reads the sections it needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PorticoConfig {
    /// Where state lives: generated certificates and secrets of `up`.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub gateway: GatewayConfig,
    pub chat: ChatConfig,
    pub jobs: JobsConfig,
    /// Hosted apps: the jobs service deploys them, the gateway serves them.
    pub paas: PaasConfig,
    /// Only read by `portico up`.
    pub up: UpConfig,
}

impl Default for PorticoConfig {
    fn default() -> Self {
        PorticoConfig {
            data_dir: PathBuf::from("data"),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            gateway: GatewayConfig::default(),
            chat: ChatConfig::default(),
            jobs: JobsConfig::default(),
            paas: PaasConfig::default(),
            up: UpConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise (systemd, CI, files).
    Auto,
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,portico_chat=debug`.
    /// `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: "info,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 key that signs user tokens (at least 32 bytes). Required by the
    /// service binaries; `portico up` generates one under `data_dir`.
    pub jwt_secret: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Plain HTTP: redirects to HTTPS.
    pub http_listen: ListenAddr,
    pub https_listen: ListenAddr,
    /// `/metrics`, `/healthz`, `/readyz` (keep it private).
    pub admin_listen: ListenAddr,
    /// Names the certificate is for.
    pub hostnames: Vec<String>,
    /// The chat shards that `/ws` and the chat API are routed to.
    pub chat_shards: Vec<ListenAddr>,
    /// The jobs service, routed under `/api/jobs/`.
    pub jobs_upstream: ListenAddr,
    /// Worker threads of the proxy.
    pub threads: usize,
    /// SIGTERM: seconds to keep serving open connections before closing.
    pub grace_period_secs: u64,
    /// Then at most this long for services to stop.
    pub shutdown_timeout_secs: u64,
    /// Largest request body; bigger ones get 413.
    pub max_body_bytes: u64,
    /// Peers whose `X-Forwarded-For` is believed (a load balancer in
    /// front); for everyone else the client IP is the socket's.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub limits: RateLimits,
    /// Named rate-limit classes that routes refer to with `limit_class`.
    pub limit_classes: std::collections::BTreeMap<String, LimitClass>,
    /// Limits on connections and request headers (slowloris, floods).
    pub connections: ConnectionLimits,
    /// Extra routes, tried before the built-in ones (`/api/jobs` → jobs,
    /// everything else → chat). Reloaded on SIGHUP.
    pub routes: Vec<RouteConfig>,
    /// Certificates from an ACME CA (Let's Encrypt, Pebble); absent: a
    /// self-signed certificate (development).
    pub acme: Option<AcmeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory.
    pub directory_url: String,
    /// Contact URLs for the account, e.g. ["mailto:ops@example.com"].
    #[serde(default)]
    pub contact: Vec<String>,
    /// PEM file of an extra root to trust for the CA's own HTTPS (Pebble).
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// How often to check whether a certificate is due (seconds).
    #[serde(default = "default_acme_check")]
    pub check_secs: u64,
}

fn default_acme_check() -> u64 {
    3600
}

/// One route: requests for `host` (any host if absent) whose path starts
/// with `path_prefix` (whole segments) go to `upstream`, or are answered
/// with the files under `root` (exactly one of the two).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Label in metrics and logs.
    pub name: String,
    #[serde(default)]
    pub host: Option<String>,
    pub path_prefix: String,
    #[serde(default)]
    pub upstream: Option<RouteUpstream>,
    /// A directory (absolute path) whose files the edge serves itself.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// A file route's caching: "immutable" (hashed asset names: a year),
    /// "revalidate" (always asked again, answered 304 when unchanged) or
    /// "max-age=N" (seconds); default "max-age=3600".
    #[serde(default)]
    pub cache: Option<FileCache>,
    /// Seconds to wait for the upstream's answer (between reads); default 30.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Largest request body for this route; default `gateway.max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// A key of `gateway.limit_classes`, limiting this route's requests per
    /// client IP and per authenticated user on top of `gateway.limits`.
    #[serde(default)]
    pub limit_class: Option<String>,
}

/// A rate-limit class: requests per client IP and, when the request carries
/// a valid token, per user. Over either: 429 with `Retry-After`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitClass {
    pub per_ip_per_sec: u32,
    pub per_ip_burst: u32,
    #[serde(default)]
    pub per_user_per_sec: Option<u32>,
    #[serde(default)]
    pub per_user_burst: Option<u32>,
}

/// Limits Pingora does not enforce by itself, on the HTTPS and plain-HTTP
/// listeners alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// The TLS handshake must be complete this many seconds after the
    /// accept; else the connection is closed. It counts toward the caps.
    pub handshake_timeout_secs: u64,
    /// A request's headers must arrive completely within this many seconds
    /// of its first byte (of the connection, for the first request); else
    /// 408 and the connection is closed. Cuts slowloris trickles.
    pub header_timeout_secs: u64,
    /// Largest request line plus headers, in bytes; more gets 431.
    pub max_header_bytes: usize,
    /// Most header lines in one request; more gets 431.
    pub max_headers: usize,
    /// Open client connections on both listeners; more are closed at once.
    pub max_connections: usize,
    /// Open client connections from one IP (IPv6 /64), on both listeners;
    /// trusted proxies exempt.
    pub max_connections_per_ip: usize,
    /// An idle keep-alive connection (HTTP/1 between requests, or HTTP/2)
    /// is closed after this many seconds.
    pub keepalive_idle_secs: u64,
    /// HTTP/2 streams one connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// A request body may pause this long between reads, and gets this much
    /// time on top of what `body_min_bytes_per_sec` allows for its size;
    /// else 408. Bodies up to 64 KiB are read whole before an upstream
    /// connection is taken.
    pub body_timeout_secs: u64,
    /// The slowest average rate a request body may arrive at (after the
    /// `body_timeout_secs` allowance).
    pub body_min_bytes_per_sec: u64,
    /// A response may wait this long for the client to take more of it
    /// (each piece written, at most 64 KiB and the head before it, must be
    /// taken within it); else the connection is closed,
    /// so a client that stops reading holds nothing longer (nginx's
    /// `send_timeout`).
    pub send_timeout_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshake_timeout_secs: 10,
            header_timeout_secs: 10,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_connections: 100_000,
            max_connections_per_ip: 1_000,
            keepalive_idle_secs: 60,
            h2_max_concurrent_streams: 100,
            body_timeout_secs: 30,
            body_min_bytes_per_sec: 1024,
            send_timeout_secs: 60,
        }
    }
}

/// `"chat"` (the chat shard set) or an `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteUpstream {
    Chat,
    Addr(ListenAddr),
}

impl Serialize for RouteUpstream {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RouteUpstream::Chat => s.serialize_str("chat"),
            RouteUpstream::Addr(a) => a.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RouteUpstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "chat" {
            return Ok(RouteUpstream::Chat);
        }
        s.parse().map(RouteUpstream::Addr).map_err(|e: String| {
            serde::de::Error::custom(format!("upstream must be \"chat\" or ip:port: {e}"))
        })
    }
}

/// How long browsers and caches keep a file route's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCache {
    /// A year, never revalidated: for names that change with the content.
    Immutable,
    /// Kept, but asked again every time (304 when unchanged).
    Revalidate,
    /// Fresh for this many seconds.
    MaxAge(u64),
}

impl Default for FileCache {
    fn default() -> Self {
        FileCache::MaxAge(3600)
    }
}

impl FileCache {
    /// The `Cache-Control` value.
    pub fn header(&self) -> String {
        match self {
            FileCache::Immutable => "public, max-age=31536000, immutable".into(),
            FileCache::Revalidate => "public, no-cache".into(),
            FileCache::MaxAge(n) => format!("public, max-age={n}"),
        }
    }
}

impl std::str::FromStr for FileCache {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "immutable" => Ok(FileCache::Immutable),
            "revalidate" => Ok(FileCache::Revalidate),
            _ => s
                .strip_prefix("max-age=")
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n <= 31_536_000)
                .map(FileCache::MaxAge)
                .ok_or_else(|| {
                    format!("`{s}`: cache is \"immutable\", \"revalidate\" or \"max-age=N\" (N ≤ 31536000)")
                }),
        }
    }
}

impl Serialize for FileCache {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FileCache::Immutable => s.serialize_str("immutable"),
            FileCache::Revalidate => s.serialize_str("revalidate"),
            FileCache::MaxAge(n) => s.serialize_str(&format!("max-age={n}")),
        }
    }
}

impl<'de> Deserialize<'de> for FileCache {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Per-client-IP limits (IPv6 grouped by /64); over them: 429 with
/// `Retry-After`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    pub requests_per_sec: u32,
    pub requests_burst: u32,
    /// New WebSocket connections per second (reconnect storms, scans).
    pub ws_connects_per_sec: u32,
    pub ws_connects_burst: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            requests_per_sec: 100,
            requests_burst: 200,
            ws_connects_per_sec: 10,
            ws_connects_burst: 50,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            http_listen: ListenAddr::new([127, 0, 0, 1], 8080),
            https_listen: ListenAddr::new([127, 0, 0, 1], 8443),
            admin_listen: ListenAddr::new([127, 0, 0, 1], 9180),
            hostnames: vec!["localhost".into()],
            chat_shards: vec![
                ListenAddr::new([127, 0, 0, 1], 9101),
                ListenAddr::new([127, 0, 0, 1], 9102),
            ],
            jobs_upstream: ListenAddr::new([127, 0, 0, 1], 9300),
            threads: 2,
            grace_period_secs: 2,
            shutdown_timeout_secs: 3,
            max_body_bytes: 1 << 20,
            trusted_proxies: Vec::new(),
            limits: RateLimits::default(),
            limit_classes: Default::default(),
            connections: ConnectionLimits::default(),
            routes: Vec::new(),
            acme: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusKind {
    /// In-process: one process holds every shard (`portico up`).
    Memory,
    /// Redis pub/sub between shard processes, on one Redis server.
    Redis,
    /// Sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7) on a Redis
    /// Cluster: a conversation's messages travel only through the node
    /// that owns its slot.
    RedisCluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite in `<data_dir>/chat.sqlite3`: kept across restarts, one
    /// machine (the default, and `portico up`'s).
    Sqlite,
    /// In memory: history is lost on restart (tests, demos).
    Memory,
    /// PostgreSQL: several shards on several machines.
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// WebSocket (`/ws`), HTTP API, `/metrics`, `/healthz`, `/readyz`.
    pub listen: ListenAddr,
    /// This shard's number, in metrics and logs.
    pub shard_id: u16,
    pub bus: BusKind,
    /// Required when `bus = "redis"` (`redis://host:port`) or
    /// `"redis_cluster"` (the seed nodes:
    /// `redis-cluster://host:port?node=host2:port2&node=…`).
    pub redis_url: Option<String>,
    pub store: StoreKind,
    /// Required when `store = "postgres"`. Secret: it may hold a password.
    pub postgres_url: Option<Secret>,
    /// PostgreSQL connection pool size.
    pub postgres_pool: usize,
    /// Browser `Origin`s allowed to open a WebSocket (empty: any origin is
    /// refused unless it is absent, as for non-browser clients).
    pub allowed_origins: Vec<String>,
    /// Open WebSockets this shard accepts; more get HTTP 503.
    pub max_connections: usize,
    /// Largest accepted WebSocket message, in bytes.
    pub max_message_bytes: usize,
    /// Frames queued for one client before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Server ping interval.
    pub heartbeat_secs: u64,
    /// A client silent this long is disconnected.
    pub idle_timeout_secs: u64,
    /// Messages a user may publish per second (burst = 2×).
    pub publish_per_sec: u32,
    /// Issue demo tokens at `/demo/token` (development only).
    pub demo: bool,
    /// SIGTERM: seconds given to clients to receive the close frame.
    pub drain_secs: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            listen: ListenAddr::new([127, 0, 0, 1], 9101),
            shard_id: 1,
            bus: BusKind::Memory,
            redis_url: None,
            store: StoreKind::Sqlite,
            postgres_url: None,
            postgres_pool: 16,
            allowed_origins: vec![
                "https://localhost:8443".into(),
                "http://localhost:9101".into(),
                "http://127.0.0.1:9101".into(),
            ],
            max_connections: 50_000,
            max_message_bytes: 16 * 1024,
            outbound_queue: 256,
            heartbeat_secs: 25,
            idle_timeout_secs: 60,
            publish_per_sec: 20,
            demo: false,
            drain_secs: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// REST API, `/metrics`, `/healthz`, `/readyz`.
    pub listen: ListenAddr,
    /// PostgreSQL for the task queue, customers, backups and the audit log.
    /// None (`portico up`): the API answers 503 for everything queue-backed.
    pub postgres_url: Option<Secret>,
    pub postgres_pool: usize,
    /// Every customer's root (`customers/<domain>`) must lie under this.
    pub customers_root: PathBuf,
    /// A chat shard's HTTP address for progress events on `ops-<customer>`
    /// conversations, e.g. `http://127.0.0.1:9101`; none: no events.
    pub chat_url: Option<String>,
    /// Tasks run at once by this process.
    pub workers: usize,
    /// A running task's lease; a worker renews it every third of it. A
    /// killed worker's task is taken back within lease + `reap_secs`.
    pub lease_secs: u64,
    pub reap_secs: u64,
    /// Attempts of a task that keeps failing with a retryable error.
    pub max_attempts: u32,
    /// Successful backups kept per customer (older ones are deleted only
    /// after a new one succeeded).
    pub keep_backups: usize,
    /// Free disk that must remain after a backup's estimated size.
    pub disk_reserve_bytes: u64,
    /// Throttle for backup reads (bytes/s), so a backup does not starve the
    /// customer's site of disk bandwidth; 0: unlimited.
    pub backup_max_bytes_per_sec: u64,
    /// Lifetime of signed download links.
    pub link_ttl_secs: u64,
    /// Whether technicians may delete backups (super_admin and ops_lead may).
    pub technician_can_delete: bool,
    /// Finished tasks are deleted after this many days.
    pub prune_after_days: u32,
    /// Directory of `pg_dump`/`pg_restore`; none: from `PATH`.
    pub pg_bin_dir: Option<PathBuf>,
    /// Blue/green upgrades of customers' shops.
    pub upgrade: UpgradeConfig,
    /// Mail migrations into customers' mail servers.
    pub mail: MailConfig,
}

/// Mail migrations: credential encryption, throughput limits, the DNS gate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// Keys that encrypt mailbox credentials at rest, by key id: 32 bytes,
    /// base64. Several may exist (rotation); new secrets use `active_key`.
    pub keys: std::collections::BTreeMap<String, Secret>,
    /// The key id new credentials are encrypted with.
    pub active_key: Option<String>,
    /// The DNS gate opens (an approver may set `ready_for_dns`) at this
    /// verified ratio.
    pub gate_min_ratio: f64,
    /// Mailboxes synced at once within a job.
    pub max_concurrent_mailboxes: usize,
    /// Copy rate cap per job (bytes/s); 0: none.
    pub max_bytes_per_sec: u64,
    /// A run fails once this many messages could not be copied.
    pub errors_max: u32,
    /// Largest message copied (bigger ones are counted as errors).
    pub max_message_bytes: u64,
    /// HMAC-SHA256 secret of the `dns.applied` webhook.
    pub webhook_secret: Option<Secret>,
    /// Whether plain (non-TLS) IMAP may be used to these hosts; loopback
    /// is always allowed.
    pub allow_plain_imap: bool,
    /// Largest PST upload.
    pub max_pst_bytes: u64,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            keys: Default::default(),
            active_key: None,
            gate_min_ratio: 0.99,
            max_concurrent_mailboxes: 2,
            max_bytes_per_sec: 0,
            errors_max: 50,
            max_message_bytes: 50 << 20,
            webhook_secret: None,
            allow_plain_imap: false,
            max_pst_bytes: 20 << 30,
        }
    }
}

/// Blue/green upgrades: where releases come from, how long steps may take,
/// how the switch is made, and how the process managers are driven.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpgradeConfig {
    /// The release catalog (`releases.json`); archives are resolved
    /// relative to its directory. Missing file: no release is offered.
    pub releases: PathBuf,
    /// Releases kept on disk besides the current and the previous one.
    pub keep_releases: usize,
    /// Longest an install, migrate or build command may run.
    pub step_timeout_secs: u64,
    /// How long a new instance may take to pass its health checks.
    pub health_deadline_secs: u64,
    /// After the switch: how long the old instance keeps serving requests
    /// already sent to it before it is stopped.
    pub drain_secs: u64,
    /// Longest wait for the gateways to fetch the new route table after a
    /// switch (they poll every `paas.routes_poll_ms`).
    pub switch_wait_secs: u64,
    /// `.env` changes wait for an approver (super_admin, ops_lead).
    pub require_env_approval: bool,
    /// The gateway's HTTPS address, for the checks through the edge after a
    /// switch (e.g. `https://127.0.0.1:443`); none: checks go to the
    /// instances directly.
    pub gateway_url: Option<String>,
    /// A CA certificate (PEM) the gateway's certificates chain to, besides
    /// the system's (a self-signed or private CA).
    pub gateway_ca_file: Option<PathBuf>,
    /// `supervisor`: the `supervisorctl` command line (program and
    /// arguments, e.g. `["supervisorctl", "-c", "/etc/supervisor/supervisord.conf"]`).
    pub supervisorctl: Vec<String>,
    /// `supervisor`: the directory supervisord includes program files from.
    pub supervisor_conf_dir: PathBuf,
    /// `systemd`: the template unit (`<name>@<instance>.service`) and the
    /// directory of the per-instance environment files it reads.
    pub systemd_unit: String,
    pub systemd_env_dir: PathBuf,
    /// `command`: templates run with `sh -c` to start and stop an
    /// instance; `{instance}`, `{dir}`, `{env_file}` are replaced.
    pub command_start: Option<String>,
    pub command_stop: Option<String>,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            releases: PathBuf::from("templates/releases.json"),
            keep_releases: 3,
            step_timeout_secs: 900,
            health_deadline_secs: 60,
            drain_secs: 5,
            switch_wait_secs: 15,
            require_env_approval: false,
            gateway_url: None,
            gateway_ca_file: None,
            supervisorctl: vec!["supervisorctl".into()],
            supervisor_conf_dir: PathBuf::from("/etc/supervisor/conf.d"),
            systemd_unit: "portico-shop".into(),
            systemd_env_dir: PathBuf::from("/run/portico-shop"),
            command_start: None,
            command_stop: None,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            listen: ListenAddr::new([127, 0, 0, 1], 9300),
            postgres_url: None,
            postgres_pool: 8,
            customers_root: PathBuf::from("/var/lib/portico/customers"),
            chat_url: None,
            workers: 2,
            lease_secs: 30,
            reap_secs: 5,
            max_attempts: 3,
            keep_backups: 5,
            disk_reserve_bytes: 1 << 30,
            backup_max_bytes_per_sec: 0,
            link_ttl_secs: 3600,
            technician_can_delete: false,
            prune_after_days: 30,
            pg_bin_dir: None,
            upgrade: UpgradeConfig::default(),
            mail: MailConfig::default(),
        }
    }
}

/// Hosted apps (PaaS): the jobs service builds and runs them in Docker,
/// the gateway serves them at `https://<app>.<domain>/` and `/paas/<app>/`
/// while their host ports stay private.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaasConfig {
    /// Apps are served at `<app>.<domain>` (a wildcard DNS name pointing at
    /// the gateway). `paas.localhost` works on one machine: browsers
    /// resolve `*.localhost` to loopback.
    pub domain: String,
    /// The Docker engine: `unix:///var/run/docker.sock` or `http://host:port`.
    pub docker: String,
    /// Names this installation on the engine (label `portico.instance`,
    /// container and image name prefix): installations sharing an engine
    /// never touch each other's containers.
    pub instance: String,
    /// Clones and build contexts; default `<data_dir>/paas`.
    pub work_dir: Option<PathBuf>,
    /// Local repositories (paths or `file://` URLs) must lie under this
    /// directory; none: only `https://` repositories are accepted.
    pub local_repos_root: Option<PathBuf>,
    /// Base images of the generated Dockerfiles, per detected app type.
    /// Point them at local images where no registry is reachable.
    pub images: PaasImages,
    /// Memory limit per container (swap is set equal: no swap).
    pub memory_mb: u64,
    /// CPU limit per container, in CPUs (0.5 = half a core).
    pub cpus: f64,
    /// Restarts after a crash (on-failure) before the app counts as failed.
    pub max_restarts: u32,
    /// Health check of a new container before traffic moves to it.
    pub health: PaasHealth,
    /// Largest build context (the repository without `.dockerignore`d files).
    pub max_context_bytes: u64,
    /// Seconds a `git clone` may take.
    pub clone_timeout_secs: u64,
    /// Seconds an image build may take.
    pub build_timeout_secs: u64,
    /// How often the gateway fetches the app routes from the jobs service,
    /// and the jobs service compares them with Docker (milliseconds).
    pub routes_poll_ms: u64,
    /// Apps that may exist at once.
    pub max_apps: usize,
}

impl Default for PaasConfig {
    fn default() -> Self {
        PaasConfig {
            domain: "paas.localhost".into(),
            docker: "unix:///var/run/docker.sock".into(),
            instance: "portico".into(),
            work_dir: None,
            local_repos_root: None,
            images: PaasImages::default(),
            memory_mb: 256,
            cpus: 0.5,
            max_restarts: 3,
            health: PaasHealth::default(),
            max_context_bytes: 256 << 20,
            clone_timeout_secs: 120,
            build_timeout_secs: 900,
            routes_poll_ms: 500,
            max_apps: 1000,
        }
    }
}

/// Base images of the generated Dockerfiles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaasImages {
    /// `index.html` sites, served by the image's busybox `httpd`.
    #[serde(rename = "static")]
    pub static_site: String,
    /// `package.json` with `next`.
    pub nextjs: String,
    /// `requirements.txt` or `pyproject.toml` (uvicorn serves `main:app`).
    pub python: String,
}

impl Default for PaasImages {
    fn default() -> Self {
        PaasImages {
            static_site: "busybox:1.36".into(),
            nextjs: "node:20-alpine".into(),
            python: "python:3.12-slim".into(),
        }
    }
}

/// How a new container proves it serves before it gets traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaasHealth {
    /// Default path (apps may set their own); a 2xx or 3xx answer is healthy.
    pub path: String,
    pub interval_ms: u64,
    /// One probe's timeout.
    pub timeout_secs: u64,
    /// Give up (keep the old container serving) after this long.
    pub deadline_secs: u64,
}

impl Default for PaasHealth {
    fn default() -> Self {
        PaasHealth {
            path: "/".into(),
            interval_ms: 1000,
            timeout_secs: 5,
            deadline_secs: 30,
        }
    }
}

/// Whether `s` can be a health-check path: absolute, printable, no spaces.
pub fn is_http_path(s: &str) -> bool {
    s.starts_with('/') && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpConfig {
    /// Chat shards to run; shard N listens on `chat.listen` port + N - 1.
    pub chat_shards: u16,
    /// Without `jobs.postgres_url`, run a private PostgreSQL for jobs under
    /// `data_dir/postgres` when its binaries are installed.
    pub postgres: bool,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            chat_shards: 2,
            postgres: true,
        }
    }
}

impl PorticoConfig {
    /// Checks what types alone cannot; returns the offending key.
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        fn bad(key: &str, msg: impl Into<String>) -> Result<(), (String, String)> {
            Err((key.to_string(), msg.into()))
        }
        let s = self.auth.jwt_secret.expose();
        if !s.is_empty() && s.len() < 32 {
            return bad("auth.jwt_secret", "must be at least 32 bytes long");
        }
        let g = &self.gateway;
        if g.hostnames.is_empty() {
            return bad("gateway.hostnames", "must name at least one host");
        }
        for h in &g.hostnames {
            if !is_hostname(h) {
                return bad("gateway.hostnames", format!("`{h}` is not a valid hostname"));
            }
        }
        if g.chat_shards.is_empty() {
            return bad("gateway.chat_shards", "must list at least one shard");
        }
        if g.threads == 0 || g.threads > 256 {
            return bad("gateway.threads", "must be between 1 and 256");
        }
        for r in &g.routes {
            match (&r.upstream, &r.root) {
                (Some(_), None) if r.cache.is_some() => {
                    return bad(
                        "gateway.routes",
                        format!("route `{}`: cache is for file routes (with root)", r.name),
                    );
                }
                (Some(_), None) => {}
                (None, Some(root)) => {
                    if !root.is_absolute() || !root.is_dir() {
                        return bad(
                            "gateway.routes",
                            format!(
                                "route `{}`: root `{}` is not an absolute path to a directory",
                                r.name,
                                root.display()
                            ),
                        );
                    }
                }
                _ => {
                    return bad(
                        "gateway.routes",
                        format!("route `{}`: give exactly one of upstream, root", r.name),
                    );
                }
            }
            if !r.path_prefix.starts_with('/') {
                return bad(
                    "gateway.routes",
                    format!("route `{}`: path_prefix must start with /", r.name),
                );
            }
            if r.name.is_empty() || r.name.len() > 64 {
                return bad("gateway.routes", "route names are 1-64 characters");
            }
            if let Some(h) = &r.host
                && !is_hostname(h)
            {
                return bad(
                    "gateway.routes",
                    format!("route `{}`: `{h}` is not a valid hostname", r.name),
                );
            }
        }
        for r in &g.routes {
            if r.timeout_secs == Some(0) || r.timeout_secs.is_some_and(|t| t > 3600) {
                return bad(
                    "gateway.routes",
                    format!("route `{}`: timeout_secs must be between 1 and 3600", r.name),
                );
            }
            if let Some(class) = &r.limit_class
                && !g.limit_classes.contains_key(class)
            {
                return bad(
                    "gateway.routes",
                    format!(
                        "route `{}`: limit_class `{class}` is not defined in gateway.limit_classes",
                        r.name
                    ),
                );
            }
        }
        for (name, c) in &g.limit_classes {
            let key = format!("gateway.limit_classes.{name}");
            if c.per_ip_per_sec == 0 || c.per_ip_burst == 0 {
                return bad(&key, "per_ip_per_sec and per_ip_burst must be at least 1");
            }
            if c.per_user_per_sec == Some(0) || c.per_user_burst == Some(0) {
                return bad(&key, "per_user_per_sec and per_user_burst must be at least 1");
            }
            if c.per_user_per_sec.is_some() != c.per_user_burst.is_some() {
                return bad(&key, "set per_user_per_sec and per_user_burst together");
            }
        }
        let cl = &g.connections;
        for (key, v) in [
            (
                "gateway.connections.handshake_timeout_secs",
                cl.handshake_timeout_secs as usize,
            ),
            (
                "gateway.connections.body_timeout_secs",
                cl.body_timeout_secs as usize,
            ),
            (
                "gateway.connections.body_min_bytes_per_sec",
                cl.body_min_bytes_per_sec as usize,
            ),
            (
                "gateway.connections.send_timeout_secs",
                cl.send_timeout_secs as usize,
            ),
            (
                "gateway.connections.header_timeout_secs",
                cl.header_timeout_secs as usize,
            ),
            ("gateway.connections.max_connections", cl.max_connections),
            (
                "gateway.connections.max_connections_per_ip",
                cl.max_connections_per_ip,
            ),
            (
                "gateway.connections.keepalive_idle_secs",
                cl.keepalive_idle_secs as usize,
            ),
            (
                "gateway.connections.h2_max_concurrent_streams",
                cl.h2_max_concurrent_streams as usize,
            ),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if !(1024..=1 << 20).contains(&cl.max_header_bytes) {
            return bad(
                "gateway.connections.max_header_bytes",
                "must be between 1024 and 1048576",
            );
        }
        if !(8..=250).contains(&cl.max_headers) {
            return bad("gateway.connections.max_headers", "must be between 8 and 250");
        }
        if let Some(a) = &g.acme {
            if !a.directory_url.starts_with("https://") {
                return bad("gateway.acme.directory_url", "must be an https:// URL");
            }
            if a.check_secs == 0 {
                return bad("gateway.acme.check_secs", "must be at least 1");
            }
        }
        if g.routes.len() > 1000 {
            return bad("gateway.routes", "at most 1000 routes");
        }
        let l = &g.limits;
        for (key, v) in [
            ("gateway.limits.requests_per_sec", l.requests_per_sec),
            ("gateway.limits.requests_burst", l.requests_burst),
            ("gateway.limits.ws_connects_per_sec", l.ws_connects_per_sec),
            ("gateway.limits.ws_connects_burst", l.ws_connects_burst),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        let c = &self.chat;
        let cluster_url = |u: &str| u.starts_with("redis-cluster://") || u.starts_with("rediss-cluster://");
        match (c.bus, c.redis_url.as_deref()) {
            (BusKind::Redis, None) => {
                return bad("chat.redis_url", "is required when chat.bus = \"redis\"");
            }
            (BusKind::RedisCluster, None) => {
                return bad(
                    "chat.redis_url",
                    "is required when chat.bus = \"redis_cluster\" (redis-cluster://host:port?node=host:port…)",
                );
            }
            (BusKind::RedisCluster, Some(u)) if !cluster_url(u) => {
                return bad(
                    "chat.redis_url",
                    "chat.bus = \"redis_cluster\" takes the cluster's seed nodes: \
                     redis-cluster://host:port?node=host:port… (or rediss-cluster://)",
                );
            }
            (BusKind::Redis | BusKind::Memory, Some(u)) if cluster_url(u) => {
                return bad(
                    "chat.redis_url",
                    "is a Redis Cluster URL: set chat.bus = \"redis_cluster\" for a cluster",
                );
            }
            (BusKind::Redis | BusKind::Memory, Some(u))
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) =>
            {
                return bad("chat.redis_url", "must start with redis:// or rediss://");
            }
            _ => {}
        }
        if c.store == StoreKind::Postgres && c.postgres_url.is_none() {
            return bad("chat.postgres_url", "is required when chat.store = \"postgres\"");
        }
        if c.postgres_pool == 0 {
            return bad("chat.postgres_pool", "must be at least 1");
        }
        if c.max_connections == 0 {
            return bad("chat.max_connections", "must be at least 1");
        }
        if !(256..=1 << 20).contains(&c.max_message_bytes) {
            return bad("chat.max_message_bytes", "must be between 256 and 1048576");
        }
        if c.outbound_queue < 8 {
            return bad("chat.outbound_queue", "must be at least 8");
        }
        if c.heartbeat_secs == 0 || c.idle_timeout_secs <= c.heartbeat_secs {
            return bad(
                "chat.idle_timeout_secs",
                "must be greater than chat.heartbeat_secs (and heartbeat_secs > 0)",
            );
        }
        if c.publish_per_sec == 0 {
            return bad("chat.publish_per_sec", "must be at least 1");
        }
        let j = &self.jobs;
        for (key, v) in [
            ("jobs.postgres_pool", j.postgres_pool as u64),
            ("jobs.workers", j.workers as u64),
            ("jobs.lease_secs", j.lease_secs),
            ("jobs.reap_secs", j.reap_secs),
            ("jobs.max_attempts", u64::from(j.max_attempts)),
            ("jobs.keep_backups", j.keep_backups as u64),
            ("jobs.link_ttl_secs", j.link_ttl_secs),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if j.lease_secs < 3 {
            return bad("jobs.lease_secs", "must be at least 3 (renewed every third)");
        }
        if !j.customers_root.is_absolute() {
            return bad("jobs.customers_root", "must be an absolute path");
        }
        if let Some(url) = &j.chat_url
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            return bad("jobs.chat_url", "must be an http:// or https:// URL");
        }
        let u = &j.upgrade;
        for (key, v) in [
            ("jobs.upgrade.step_timeout_secs", u.step_timeout_secs),
            ("jobs.upgrade.health_deadline_secs", u.health_deadline_secs),
            ("jobs.upgrade.switch_wait_secs", u.switch_wait_secs),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if let Some(url) = &u.gateway_url
            && !url.starts_with("https://")
        {
            return bad(
                "jobs.upgrade.gateway_url",
                "must be an https:// URL (the gateway's TLS listener)",
            );
        }
        if u.supervisorctl.is_empty() {
            return bad(
                "jobs.upgrade.supervisorctl",
                "must name the supervisorctl program",
            );
        }
        if !is_hostname(&u.systemd_unit.replace('_', "-")) || u.systemd_unit.contains('.') {
            return bad(
                "jobs.upgrade.systemd_unit",
                "must be a unit name without `@` or suffix",
            );
        }
        if u.command_start.is_some() != u.command_stop.is_some() {
            return bad(
                "jobs.upgrade.command_start",
                "command_start and command_stop go together",
            );
        }
        let m = &j.mail;
        if !(m.gate_min_ratio > 0.0 && m.gate_min_ratio <= 1.0) {
            return bad("jobs.mail.gate_min_ratio", "must be in (0, 1]");
        }
        if m.max_concurrent_mailboxes == 0 {
            return bad("jobs.mail.max_concurrent_mailboxes", "must be at least 1");
        }
        for (id, key) in &m.keys {
            if !is_key_id(id) {
                return bad(&format!("jobs.mail.keys.{id}"), "key ids are 1-32 of a-z 0-9 _ -");
            }
            if !is_key_32(key.expose()) {
                return bad(
                    &format!("jobs.mail.keys.{id}"),
                    "must be 32 bytes in base64 (e.g. `openssl rand -base64 32`)",
                );
            }
        }
        match &m.active_key {
            Some(k) if !m.keys.contains_key(k) => {
                return bad("jobs.mail.active_key", format!("no key `{k}` in jobs.mail.keys"));
            }
            None if !m.keys.is_empty() => {
                return bad(
                    "jobs.mail.active_key",
                    "name the key new credentials are encrypted with",
                );
            }
            _ => {}
        }
        let p = &self.paas;
        if !is_hostname(&p.domain) {
            return bad("paas.domain", format!("`{}` is not a valid domain", p.domain));
        }
        if !(p.docker.starts_with("unix:///") || p.docker.starts_with("http://")) {
            return bad("paas.docker", "must be unix:///path or http://host:port");
        }
        if p.instance.is_empty()
            || p.instance.len() > 32
            || p.instance.starts_with('-')
            || !p
                .instance
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("paas.instance", "must be 1-32 of a-z 0-9 - (not starting with -)");
        }
        for (key, dir) in [
            ("paas.work_dir", &p.work_dir),
            ("paas.local_repos_root", &p.local_repos_root),
        ] {
            if dir.as_ref().is_some_and(|d| !d.is_absolute()) {
                return bad(key, "must be an absolute path");
            }
        }
        for (key, image) in [
            ("paas.images.static", &p.images.static_site),
            ("paas.images.nextjs", &p.images.nextjs),
            ("paas.images.python", &p.images.python),
        ] {
            if image.is_empty() || image.len() > 255 || !image.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(key, "must be an image reference such as busybox:1.36");
            }
        }
        if !(6..=1 << 20).contains(&p.memory_mb) {
            return bad("paas.memory_mb", "must be between 6 and 1048576");
        }
        if !(p.cpus >= 0.01 && p.cpus <= 256.0) {
            return bad("paas.cpus", "must be between 0.01 and 256");
        }
        if p.max_restarts > 100 {
            return bad("paas.max_restarts", "must be at most 100");
        }
        if !is_http_path(&p.health.path) {
            return bad("paas.health.path", "must be an absolute path without spaces");
        }
        for (key, v) in [
            ("paas.health.interval_ms", p.health.interval_ms),
            ("paas.health.timeout_secs", p.health.timeout_secs),
            ("paas.health.deadline_secs", p.health.deadline_secs),
            ("paas.max_context_bytes", p.max_context_bytes),
            ("paas.clone_timeout_secs", p.clone_timeout_secs),
            ("paas.build_timeout_secs", p.build_timeout_secs),
            ("paas.max_apps", p.max_apps as u64),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if !(50..=60_000).contains(&p.routes_poll_ms) {
            return bad("paas.routes_poll_ms", "must be between 50 and 60000");
        }
        if self.up.chat_shards == 0 || self.up.chat_shards > 16 {
            return bad("up.chat_shards", "must be between 1 and 16");
        }
        Ok(())
    }
}

/// RFC 1123 hostname (letters, digits, hyphens; labels of 1–63).
pub fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A key id: 1-32 of a-z 0-9 _ -.
pub fn is_key_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Standard base64 of exactly 32 bytes (44 characters with padding).
pub fn is_key_32(s: &str) -> bool {
    let s = s.trim();
    s.len() == 44
        && s.ends_with('=')
        && !s[..43].contains('=')
        && s[..43]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}
