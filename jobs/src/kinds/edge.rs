//! `/api/paas/routes`: the route table the gateways poll (service token):
//! every hosted app (whether it should serve, and where: 127.0.0.1 and the
//! container's published port) and every served shop (its hostnames and
//! the loopback ports of the release serving now). Each fetch is counted,
//! so a switch can wait until the gateways have the new table.

use crate::staff::auth::secured;
use portico_common::api::Errors;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use portico_common::api::ApiError;
use std::net::SocketAddr;

use portico_common::feeds::{AppRoute, AppRouteState, ROUTE_FEED_VERSION, RouteFeed, SiteRoute};

use super::upgrade::{Shared, hosts};
use crate::api::KindApi;
use crate::staff::auth::{Caller, Services};

/// The route table's state: the shared API and the shops' shared state
/// (which counts the gateways' fetches).
pub type EdgeApi = KindApi<Arc<Shared>>;

pub fn router(api: Arc<EdgeApi>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(secured::<Services, _>(routes!(routes)))
        .with_state(api)
}

/// Internal: served on the jobs listener only (the gateways poll it
/// there); the gateway does not route it.
#[utoipa::path(
    get, path = "/api/paas/routes", operation_id = "route_table", tag = "edge",
    responses((status = 200, description = "OK", body = Object), Errors),
)]
async fn routes(
    State(e): State<Arc<EdgeApi>>,
    _who: Caller<Services>,
) -> Result<impl IntoResponse, ApiError> {
    let db = e.db()?;
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let apps: Vec<AppRoute> = db
        .apps()
        .await?
        .iter()
        .map(|a| {
            let port = a.host_port.and_then(|p| u16::try_from(p).ok());
            let state = match (&a.container, a.desired.as_str(), port) {
                (None, _, _) => AppRouteState::NotDeployed,
                (Some(_), "stopped", _) => AppRouteState::Stopped,
                // Exited or between restarts: Docker publishes no port.
                (Some(_), _, None) => AppRouteState::Down,
                _ => AppRouteState::Running,
            };
            AppRoute {
                name: a.name.clone(),
                state,
                upstream: port.filter(|_| state == AppRouteState::Running).map(loopback),
            }
        })
        .collect();
    let mut sites = Vec::new();
    for s in db.sites().await? {
        for (service, host) in hosts(&s.domain) {
            if let Some(i) = s.instances.get(service) {
                sites.push(SiteRoute {
                    host,
                    upstream: loopback(i.port),
                    release: s.version.clone(),
                });
            }
        }
    }
    e.kind.note_poll();
    Ok(Json(RouteFeed {
        version: ROUTE_FEED_VERSION,
        apps,
        sites,
    }))
}
