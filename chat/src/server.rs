//! A chat shard: its HTTP listener, engines and drain on shutdown.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{Quota, RateLimiter};
use portico_common::auth::Tokens;
use portico_config::{AuthConfig, ChatConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{RedisBus, Sharding};
use crate::hub::Hub;
use crate::shard::Shard;
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;

/// The engines a shard runs on.
#[derive(Clone)]
pub struct Engines {
    pub store: Arc<dyn Store>,
    pub bus: BusEngine,
}

#[derive(Clone)]
pub enum BusEngine {
    /// Shared by the shards of one process.
    Memory(Arc<MemoryBus>),
    /// Each shard connects its own clients to this URL.
    Redis(String),
    /// Each shard connects its own cluster clients to these seed nodes.
    RedisCluster(String),
}

impl Engines {
    /// The engines `cfg` names, connected; the SQLite store lives in
    /// `data_dir`.
    pub async fn from_config(cfg: &ChatConfig, data_dir: &std::path::Path) -> Result<Self, StartError> {
        use portico_config::{BusKind, StoreKind};
        let store: Arc<dyn Store> = match (cfg.store, &cfg.postgres_url) {
            (StoreKind::Postgres, Some(url)) => Arc::new(
                PgStore::connect(url.expose(), cfg.postgres_pool)
                    .await
                    .map_err(|e| StartError::Engine(format!("PostgreSQL store: {e}")))?,
            ),
            (StoreKind::Sqlite, _) => {
                let path = data_dir.join("chat.sqlite3");
                let opened = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| StartError::Engine(e.to_string()))?;
                Arc::new(opened.map_err(|e| StartError::Engine(format!("SQLite store: {e}")))?)
            }
            _ => Arc::new(MemoryStore::default()),
        };
        let bus = match (cfg.bus, &cfg.redis_url) {
            (BusKind::Redis, Some(url)) => BusEngine::Redis(url.clone()),
            (BusKind::RedisCluster, Some(url)) => BusEngine::RedisCluster(url.clone()),
            _ => BusEngine::Memory(Arc::new(MemoryBus::default())),
        };
        Ok(Engines { store, bus })
    }

    /// In-memory engines, shared by every shard given a clone.
    pub fn memory() -> Self {
        Engines {
            store: Arc::new(MemoryStore::default()),
            bus: BusEngine::Memory(Arc::new(MemoryBus::default())),
        }
    }
}

/// Why a shard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("auth.jwt_secret is not set (PORTICO_AUTH__JWT_SECRET)")]
    NoSecret,
    #[error("{0}")]
    Engine(String),
}

/// A bound, not yet serving shard.
pub struct Bound {
    shard: Arc<Shard>,
    listener: TcpListener,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }
    pub fn shard(&self) -> &Arc<Shard> {
        &self.shard
    }
}

/// Creates the shard and binds its listener.
pub async fn bind(cfg: ChatConfig, auth: &AuthConfig, engines: Engines) -> Result<Bound, StartError> {
    if auth.jwt_secret.is_empty() {
        return Err(StartError::NoSecret);
    }
    let addr = cfg.listen.0;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    crate::metrics::describe();
    let hub = Hub::new(
        cfg.shard_id,
        engines.store.clone(),
        cfg.max_connections,
        cfg.outbound_queue,
    );
    let bus: Arc<dyn Bus> = match &engines.bus {
        BusEngine::Memory(m) => {
            m.attach(&hub);
            m.clone()
        }
        BusEngine::Redis(url) => RedisBus::connect(url, Sharding::Off, &hub)
            .await
            .map_err(|e| StartError::Engine(format!("Redis bus: {e}")))?,
        BusEngine::RedisCluster(url) => RedisBus::connect(url, Sharding::Cluster, &hub)
            .await
            .map_err(|e| StartError::Engine(format!("Redis Cluster bus: {e}")))?,
    };
    hub.set_bus(bus);
    let per_sec = NonZeroU32::new(cfg.publish_per_sec).expect("validated: publish_per_sec > 0");
    let burst = per_sec.saturating_mul(NonZeroU32::new(2).expect("2 > 0"));
    let shard = Arc::new(Shard {
        tokens: Tokens::new(&auth.jwt_secret),
        limiter: RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
        hub,
        cfg,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    if shard.cfg.demo {
        crate::http::ensure_demo_lobby(&shard).await;
    }
    Ok(Bound { shard, listener })
}

impl Bound {
    /// Serves until `stop` fires, then drains: refuses new connections,
    /// closes WebSockets with 1001 (reconnect), waits up to
    /// `chat.drain_secs` for them to go.
    pub async fn serve(self, stop: CancellationToken) -> std::io::Result<()> {
        let Bound { shard, listener } = self;
        tracing::info!(addr = %listener.local_addr()?, shard = shard.cfg.shard_id, "chat shard listening");
        portico_common::notify::ready(&stop);
        let app = crate::http::router(shard.clone());
        // Housekeeping owned by this function: aborted when it returns.
        let mut background = tokio::task::JoinSet::new();
        {
            let shard = shard.clone();
            background.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tokio::select! {
                        _ = shard.shutdown.cancelled() => return,
                        _ = tick.tick() => {
                            // governor keeps every key until told otherwise.
                            shard.limiter.retain_recent();
                            shard.limiter.shrink_to_fit();
                        }
                    }
                }
            });
        }
        // The stop starts HTTP's graceful shutdown and, in the same step,
        // tells systemd and drains the WebSockets in parallel with HTTP. (A
        // task of its own raced the server's return: aborted with the other
        // housekeeping before it ran, it never said STOPPING.)
        let drain_ws = shard.shutdown.clone();
        let app = app.into_make_service_with_connect_info::<crate::socket::ConnSocket>();
        let server =
            axum::serve(crate::socket::Accepting(listener), app).with_graceful_shutdown(async move {
                stop.cancelled().await;
                portico_common::notify::stopping();
                drain_ws.cancel();
            });
        let result = server.await;
        shard.tracker.close();
        let drain = Duration::from_secs(shard.cfg.drain_secs.max(1));
        if tokio::time::timeout(drain, shard.tracker.wait()).await.is_err() {
            tracing::warn!(left = shard.tracker.len(), "connections still open after drain");
        }
        background.abort_all();
        tracing::info!(shard = shard.cfg.shard_id, "chat shard stopped");
        result
    }
}
