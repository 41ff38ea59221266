//! `/metrics`, `/healthz` and `/readyz` as an axum router, merged into each
//! service's own router (or served alone, as the gateway does).
//!
//! `/healthz` says the process is alive; `/readyz` runs the service's
//! readiness check (are its dependencies reachable?) and answers 503 with
//! the reason when they are not.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A readiness probe: `Ok` when the service can do its work.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> CheckFuture + Send + Sync>);

impl Readiness {
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Readiness(Arc::new(move || Box::pin(f())))
    }

    /// Always ready (a service without dependencies).
    pub fn always() -> Self {
        Readiness::new(|| async { Ok(()) })
    }

    pub async fn check(&self) -> Result<(), String> {
        (self.0)().await
    }
}

/// The three operational endpoints.
pub fn router<S: Clone + Send + Sync + 'static>(ready: Readiness) -> Router<S> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready)
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
}

async fn readyz(State(ready): State<Readiness>) -> impl IntoResponse {
    match ready.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}
