//! SIGHUP: re-read the configuration and swap in the new route table.
//!
//! Only the routes change live (open connections, WebSockets included, are
//! untouched). A configuration that does not load or validate is refused
//! with the reason logged, and the old table stays. Listeners, TLS and
//! limits need a restart (or a graceful upgrade, `--upgrade`).

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{SignalKind, signal};

use crate::routes::Routes;

pub struct Reloader {
    pub config: Option<PathBuf>,
    pub routes: Arc<ArcSwap<Routes>>,
    /// Applied to a freshly loaded configuration before use (`portico up`
    /// derives some gateway keys from other sections).
    pub adjust: Option<fn(&mut portico_config::PorticoConfig)>,
}

impl Reloader {
    /// Loads the configuration again and installs its routes.
    pub fn reload(&self) -> Result<usize, portico_config::ConfigError> {
        let mut cfg = portico_config::load(self.config.as_deref())?;
        if let Some(adjust) = self.adjust {
            adjust(&mut cfg);
        }
        let routes = Routes::from_config(&cfg.gateway);
        let n = routes.len();
        self.routes.store(Arc::new(routes));
        Ok(n)
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGHUP; routes will not reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup.recv() => match self.reload() {
                    Ok(n) => {
                        metrics::counter!("portico_gateway_reloads_total", "result" => "ok").increment(1);
                        tracing::info!(routes = n, "configuration reloaded");
                    }
                    Err(e) => {
                        metrics::counter!("portico_gateway_reloads_total", "result" => "refused").increment(1);
                        tracing::error!(error = %e, "configuration refused; keeping the current routes");
                    }
                },
            }
        }
    }
}
