//! The task kinds, each in its folder with its parameters, its steps (a
//! [`Kind`]), its routes and its tables: [`backup`], [`restore`],
//! [`paas`] (app deploys).
//!
//! This is the one place that lists them: a new kind adds its folder and
//! a line to each of [`Kinds::schemas`], [`Kinds::router`] and
//! [`Kinds::tasks`]; the queue core does not change.

pub mod backup;
pub mod paas;
pub mod restore;

use std::sync::Arc;

use axum::Router;
use portico_config::PorticoConfig;

use crate::api::Api;
use crate::queue::{Db, Kind, Schema};

/// What the kinds share between their routes and their tasks.
pub struct Kinds {
    paas: Arc<paas::Paas>,
    signer_secret: Vec<u8>,
}

impl Kinds {
    pub fn new(cfg: &PorticoConfig) -> Kinds {
        Kinds {
            paas: Arc::new(paas::Paas::new(&cfg.paas, &cfg.data_dir)),
            signer_secret: cfg.auth.jwt_secret.expose().as_bytes().to_vec(),
        }
    }

    /// The kinds' own tables (the core's come first).
    pub fn schemas() -> Vec<&'static Schema> {
        vec![]
    }

    /// Every kind's routes, on the shared core state.
    pub fn router(&self, api: Arc<Api>) -> Router {
        Router::new()
            .merge(backup::api::router(Arc::new(backup::api::BackupApi {
                api: api.clone(),
                signer: backup::links::Signer::new(&self.signer_secret),
            })))
            .merge(restore::api::router(api.clone()))
            .merge(paas::api::router(Arc::new(paas::api::PaasApi {
                api,
                paas: self.paas.clone(),
            })))
    }

    /// The kinds the workers run.
    pub fn tasks(&self, db: &Db, api: &Api) -> Vec<Arc<dyn Kind>> {
        vec![
            Arc::new(backup::BackupKind {
                db: db.clone(),
                cfg: api.cfg.clone(),
            }),
            Arc::new(restore::RestoreKind {
                db: db.clone(),
                cfg: api.cfg.clone(),
            }),
            Arc::new(paas::PaasKind {
                db: db.clone(),
                paas: self.paas.clone(),
            }),
        ]
    }
}
