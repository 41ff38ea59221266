//! Portico jobs: the ops service. One queue of long tasks per customer
//! (one active at a time), run by workers under a lease, with live
//! progress on the customer's ops chat conversation, a role-based REST API
//! and an audit log. Backups, restores and PaaS deploys today; upgrades and
//! mail migrations are further task kinds on the same queue.
//!
//! Code map: [`queue`] (the core: database, claim, lease, fencing, retry,
//! reaper, audit; no kind), [`kinds`] (one folder per task kind: its
//! steps, routes and tables), [`customers`], [`api`] (the REST core:
//! state, errors), [`staff`] (accounts, sessions and the caller
//! extractor), [`console`] (the staff web pages), [`archive`] (tar.gz in
//! and out).

pub mod api;
pub mod archive;
pub mod audit;
pub mod console;
pub mod customers;
pub mod docs;
pub mod kinds;
pub mod queue;
pub mod staff;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use portico_common::admin::{self, Readiness};
use portico_common::auth::Tokens;
use portico_config::PorticoConfig;
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
    #[error("auth.jwt_secret is not set (PORTICO_AUTH__JWT_SECRET)")]
    NoSecret,
    #[error("jobs database: {0}")]
    Db(#[from] queue::DbError),
    #[error("{0}")]
    Catalog(#[from] kinds::upgrade::catalog::CatalogError),
}

fn describe_metrics() {
    metrics::describe_counter!(
        "portico_jobs_tasks_total",
        "Tasks ended, by kind and result (ok, failed)."
    );
    metrics::describe_gauge!(
        "portico_jobs_tasks",
        "Tasks queued and running now, by kind and state."
    );
    metrics::describe_gauge!(
        "portico_jobs_backup_last_success_timestamp_seconds",
        "When each customer's newest successful backup was made (its registration time while it has none)."
    );
    metrics::describe_gauge!(
        "portico_jobs_mail_gate",
        "Each mail migration's DNS gate: 1 for its current state (blocked, warning, ready_for_dns, dns_applied)."
    );
    metrics::describe_gauge!(
        "portico_jobs_mail_gate_ratio",
        "Each mail migration's verified ratio (verified / expected messages)."
    );
    metrics::describe_gauge!(
        "portico_jobs_app_restarts",
        "Restarts of each hosted app's current container, as Docker counts them."
    );
    metrics::describe_counter!(
        "portico_jobs_tasks_reaped_total",
        "Tasks whose lease ran out (their worker died) and were re-queued or failed."
    );
}

/// The tables beyond the core's: staff accounts, then each kind's.
pub fn schemas() -> Vec<&'static queue::Schema> {
    let mut s = vec![&staff::db::SCHEMA];
    s.extend(kinds::Kinds::schemas());
    s
}

/// Every API route on `api`, and the published description of them.
fn api_routes(api: Arc<api::Api>, kinds: &kinds::Kinds) -> (Router, utoipa::openapi::OpenApi) {
    let (docs, published) = docs::router();
    let (routes, doc) = api::router(api.clone())
        .merge(docs)
        .merge(audit::router(api.clone()))
        .merge(staff::api::router(api.clone()))
        .merge(customers::api::router(api.clone()))
        .merge(kinds.router(api))
        .split_for_parts();
    let doc = api::describe(doc);
    docs::publish(&published, &doc);
    (routes, doc)
}

/// The API's description (what `GET /api/openapi.json` serves), without
/// a database or a listener: for `portico-jobs openapi` and tests.
pub fn openapi(cfg: &PorticoConfig) -> utoipa::openapi::OpenApi {
    let tokens = Tokens::new(&cfg.auth.jwt_secret);
    let api = Arc::new(api::Api {
        db: None,
        cfg: cfg.jobs.clone(),
        events: queue::progress::Events::new(cfg.jobs.chat_url.clone(), &tokens),
        tokens,
    });
    api_routes(api, &kinds::Kinds::new(cfg)).1
}

/// A bound, not yet serving jobs service.
pub struct Bound {
    listener: TcpListener,
    api: Arc<api::Api>,
    kinds: kinds::Kinds,
}

/// Binds the listener and, when a database is configured, connects and
/// migrates it.
pub async fn bind(cfg: &PorticoConfig) -> Result<Bound, StartError> {
    let j = &cfg.jobs;
    if cfg.auth.jwt_secret.is_empty() {
        return Err(StartError::NoSecret);
    }
    describe_metrics();
    let addr = j.listen.0;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let kinds = kinds::Kinds::new(cfg);
    // A broken release catalog is a configuration error: say so now, not
    // at the first upgrade. (It is read again at every use.)
    kinds.check()?;
    let db = match &j.postgres_url {
        Some(url) => Some(queue::Db::connect(url.expose(), j.postgres_pool, &schemas()).await?),
        None => None,
    };
    let tokens = Tokens::new(&cfg.auth.jwt_secret);
    let api = Arc::new(api::Api {
        db,
        cfg: j.clone(),
        events: queue::progress::Events::new(j.chat_url.clone(), &tokens),
        tokens,
    });
    Ok(Bound { listener, api, kinds })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// For `portico up`: when the database has no staff account yet, adds
    /// the super admin `admin` with a generated password, kept in `file`
    /// (mode 0600), and answers the password (to be printed once). `None`
    /// without a database or when accounts exist.
    pub async fn demo_admin(&self, file: &std::path::Path) -> anyhow::Result<Option<String>> {
        let Some(db) = &self.api.db else { return Ok(None) };
        if db.user_count().await? > 0 {
            return Ok(None);
        }
        let (user, password) = staff::api::add_account(
            db,
            "admin",
            "admin@portico.localhost",
            "Portico admin",
            api::SUPER_ADMIN,
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot add the console's admin: {}", e.2))?;
        let password = password.expect("a generated password is answered");
        portico_common::files::write_private(
            file,
            format!("user: {}\npassword: {password}\n", user.id).as_bytes(),
        )?;
        Ok(Some(password))
    }

    /// Serves (and runs the workers) until `stop`, then finishes in-flight
    /// requests. Running tasks are left to their lease.
    pub async fn serve(self, stop: CancellationToken) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), queue = self.api.db.is_some(), "jobs service listening");
        portico_common::notify::ready(&stop);
        let workers = self.api.db.clone().map(|db| {
            let kinds = self.kinds.tasks(&db, &self.api);
            let w = Arc::new(queue::Workers::new(
                db,
                self.api.cfg.clone(),
                self.api.events.clone(),
                &kinds,
            ));
            tokio::spawn(w.run(stop.clone()))
        });
        let readiness = match self.api.db.clone() {
            Some(db) => Readiness::new(move || {
                let db = db.clone();
                async move {
                    if db.ping().await {
                        Ok(())
                    } else {
                        Err("jobs database unreachable".to_string())
                    }
                }
            }),
            None => Readiness::always(),
        };
        let (routes, _) = api_routes(self.api.clone(), &self.kinds);
        let app: Router = routes
            .merge(console::router(Arc::new(api::KindApi {
                api: self.api,
                kind: self.kinds.console(),
            })))
            .merge(admin::router(readiness))
            .layer(axum::middleware::from_fn(portico_common::api::json_errors));
        // The peer address tells whether `X-Real-IP` came from the gateway.
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                portico_common::notify::stopping();
            })
            .await?;
        if let Some(w) = workers {
            let _ = w.await;
        }
        tracing::info!("jobs service stopped");
        Ok(())
    }
}
