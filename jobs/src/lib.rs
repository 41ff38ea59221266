//! Portico jobs: the ops service (backups, blue/green upgrades, mail
//! migrations, PaaS deploys) with a per-customer task queue.
//!
//! Today this is the skeleton the jobs issues fill: the HTTP listener with
//! the operational endpoints and a versioned API root. It owns no tasks yet.

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::routing::get;
use portico_common::admin::{self, Readiness};
use portico_config::JobsConfig;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound, not yet serving jobs service.
pub struct Bound {
    listener: TcpListener,
}

pub async fn bind(cfg: &JobsConfig) -> Result<Bound, StartError> {
    let addr = cfg.listen.0;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(Bound { listener })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves until `stop`, then finishes in-flight requests.
    pub async fn serve(self, stop: CancellationToken) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "jobs service listening");
        let app = Router::new()
            .route(
                "/api/jobs",
                get(|| async { Json(json!({ "service": "portico-jobs", "api": 1 })) }),
            )
            .merge(admin::router(Readiness::always()));
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await?;
        tracing::info!("jobs service stopped");
        Ok(())
    }
}
