//! `/api/paas/routes`: the route table the gateways poll (service token):
//! every hosted app (whether it should serve, and where: 127.0.0.1 and the
//! container's published port) and every served shop (its hostnames and
//! the loopback ports of the release serving now). Each fetch is counted,
//! so a switch can wait until the gateways have the new table.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use portico_common::api::ApiError;
use serde_json::json;

use super::upgrade::{Shared, hosts};
use crate::api::KindApi;
use crate::api::{Caller, Services};

/// The route table's state: the shared API and the shops' shared state
/// (which counts the gateways' fetches).
pub type EdgeApi = KindApi<Arc<Shared>>;

pub fn router(api: Arc<EdgeApi>) -> Router {
    Router::new()
        .route("/api/paas/routes", get(routes))
        .with_state(api)
}

async fn routes(
    State(e): State<Arc<EdgeApi>>,
    _who: Caller<Services>,
) -> Result<impl IntoResponse, ApiError> {
    let db = e.db()?;
    let apps: Vec<_> = db
        .apps()
        .await?
        .iter()
        .map(|a| {
            let state = match (&a.container, a.desired.as_str(), a.host_port) {
                (None, _, _) => "not_deployed",
                (Some(_), "stopped", _) => "stopped",
                // Exited or between restarts: Docker publishes no port.
                (Some(_), _, None) => "down",
                _ => "running",
            };
            json!({
                "name": a.name,
                "state": state,
                "upstream": a.host_port.filter(|_| state == "running").map(|p| format!("127.0.0.1:{p}")),
            })
        })
        .collect();
    let mut sites = Vec::new();
    for s in db.sites().await? {
        for (service, host) in hosts(&s.domain) {
            if let Some(i) = s.instances.get(service) {
                sites.push(json!({ "host": host, "upstream": format!("127.0.0.1:{}", i.port), "release": s.version }));
            }
        }
    }
    e.kind.note_poll();
    Ok(Json(json!({ "apps": apps, "sites": sites })))
}
