//! The `deploy` task (on an app, not a customer) and the reconciler that
//! keeps containers, routes and the apps table in step.

use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Paas, PaasError};
use crate::queue::progress::Progress;
use crate::queue::{Claimed, Db, Failure, Kind};

pub struct PaasKind {
    pub db: Db,
    pub paas: Arc<Paas>,
}

impl From<PaasError> for Failure {
    fn from(e: PaasError) -> Failure {
        Failure {
            cancelled: matches!(e, PaasError::Cancelled),
            retryable: e.retryable(),
            message: e.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl Kind for PaasKind {
    fn name(&self) -> &'static str {
        "deploy"
    }

    async fn perform(&self, t: &Claimed, progress: &Arc<Progress>) -> Result<Value, Failure> {
        Ok(self.paas.deploy(&self.db, t, progress).await?)
    }

    async fn watch(self: Arc<Self>, stop: CancellationToken) {
        self.paas.clone().watch(self.db.clone(), stop).await
    }
}
