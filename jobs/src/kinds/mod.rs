//! The task kinds, each in its folder with its parameters, its steps (a
//! [`Kind`]), its routes and its tables: [`backup`], [`restore`],
//! [`paas`] (app deploys), [`upgrade`] (blue/green releases of a shop:
//! the kinds `upgrade`, `rollback`, `serve`), [`mail`] (mail migrations:
//! the kind `mail`); [`edge`] is the route table
//! the gateways poll (apps and shops).
//!
//! This is the one place that lists them: a new kind adds its folder and
//! a line to each of [`Kinds::schemas`], [`Kinds::router`] and
//! [`Kinds::tasks`]; the queue core does not change.

pub mod backup;
pub mod edge;
pub mod mail;
pub mod paas;
pub mod restore;
pub mod upgrade;

use std::sync::Arc;

use portico_config::PorticoConfig;
use utoipa_axum::router::OpenApiRouter;

use crate::api::Api;
use crate::queue::{Db, Kind, Schema};

/// What the kinds share between their routes and their tasks.
pub struct Kinds {
    paas: Arc<paas::Paas>,
    signer_secret: Vec<u8>,
    shops: Arc<upgrade::Shared>,
    mail: Arc<mail::Shared>,
}

impl Kinds {
    pub fn new(cfg: &PorticoConfig) -> Kinds {
        Kinds {
            paas: Arc::new(paas::Paas::new(&cfg.paas, &cfg.data_dir)),
            signer_secret: cfg.auth.jwt_secret.expose().as_bytes().to_vec(),
            shops: Arc::new(upgrade::Shared::new(&cfg.jobs)),
            mail: Arc::new(mail::Shared::new(&cfg.jobs.mail, &cfg.data_dir)),
        }
    }

    /// What can be checked before serving: the release catalog parses.
    pub fn check(&self) -> Result<(), upgrade::catalog::CatalogError> {
        self.shops.catalog().map(|_| ())
    }

    /// The kinds' own tables (the core's come first).
    pub fn schemas() -> Vec<&'static Schema> {
        vec![&upgrade::db::SCHEMA, &mail::db::SCHEMA]
    }

    /// Every kind's routes, on the shared core state.
    pub fn router(&self, api: Arc<Api>) -> OpenApiRouter {
        OpenApiRouter::new()
            .merge(backup::api::router(Arc::new(backup::api::BackupApi {
                api: api.clone(),
                kind: backup::links::Signer::new(&self.signer_secret),
            })))
            .merge(restore::api::router(api.clone()))
            .merge(paas::api::router(Arc::new(paas::api::PaasApi {
                api: api.clone(),
                kind: self.paas.clone(),
            })))
            .merge(upgrade::api::router(Arc::new(upgrade::api::UpgradeApi {
                api: api.clone(),
                kind: self.shops.clone(),
            })))
            .merge(mail::api::router(Arc::new(mail::api::MailApi {
                api: api.clone(),
                kind: self.mail.clone(),
            })))
            .merge(edge::router(Arc::new(edge::EdgeApi {
                api,
                kind: self.shops.clone(),
            })))
    }

    /// What the console reads of the kinds besides the database.
    pub fn console(&self) -> crate::console::Parts {
        crate::console::Parts {
            paas: self.paas.clone(),
            shops: self.shops.clone(),
        }
    }

    /// The kinds the workers run.
    pub fn tasks(&self, db: &Db, api: &Api) -> Vec<Arc<dyn Kind>> {
        let backup = Arc::new(backup::BackupKind {
            db: db.clone(),
            cfg: api.cfg.clone(),
        });
        let shop = |mode| -> Arc<dyn Kind> {
            Arc::new(upgrade::UpgradeKind::new(
                db.clone(),
                self.shops.clone(),
                backup.clone(),
                mode,
            ))
        };
        vec![
            backup.clone(),
            Arc::new(restore::RestoreKind {
                db: db.clone(),
                cfg: api.cfg.clone(),
            }),
            Arc::new(paas::PaasKind {
                db: db.clone(),
                paas: self.paas.clone(),
            }),
            shop(upgrade::Mode::Upgrade),
            shop(upgrade::Mode::Rollback),
            shop(upgrade::Mode::Serve),
            Arc::new(mail::MailKind {
                db: db.clone(),
                shared: self.mail.clone(),
            }),
        ]
    }
}
