//! Certificates from an ACME CA (instant-acme), answered with HTTP-01 on the
//! plain-HTTP listener.
//!
//! The account key is created once and kept in `data_dir/acme/account.json`
//! (mode 600). For each configured hostname the service orders a
//! certificate when there is none, when the current one is self-signed (the
//! placeholder served until the first issuance) or when two thirds of its
//! lifetime have passed (minus a little jitter, so many hosts do not renew
//! at once). A failure keeps the old certificate, counts
//! `portico_gateway_acme_failures_total`, logs why and retries with
//! exponential backoff. New certificates go through [`CertStore::install`]:
//! the next handshake uses them, open connections are untouched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use portico_config::AcmeConfig;

use crate::tls::CertStore;

/// Pending HTTP-01 tokens → key authorizations (only our own orders' few).
#[derive(Debug, Default)]
pub struct Challenges(RwLock<HashMap<String, String>>);

impl Challenges {
    /// The key authorization for `token`, if we are answering it.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0.read().expect("challenge lock").get(token).cloned()
    }
    fn set(&self, token: String, key_auth: String) {
        self.0.write().expect("challenge lock").insert(token, key_auth);
    }
    fn clear(&self, token: &str) {
        self.0.write().expect("challenge lock").remove(token);
    }
}

pub struct AcmeService {
    pub cfg: AcmeConfig,
    pub hostnames: Vec<String>,
    pub store: Arc<CertStore>,
    pub challenges: Arc<Challenges>,
    pub dir: PathBuf,
}

/// When a certificate is due: 2/3 of its lifetime, jittered up to 1/30
/// earlier; self-signed placeholders and missing ones are due now.
pub fn due_at(chain_pem: &[u8]) -> Option<SystemTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    if cert.subject() == cert.issuer() {
        return Some(UNIX_EPOCH); // self-signed placeholder
    }
    let from = cert.validity().not_before.timestamp().max(0) as u64;
    let to = cert.validity().not_after.timestamp().max(0) as u64;
    let life = to.saturating_sub(from);
    let jitter = rand::random::<u64>() % (life / 30).max(1);
    Some(UNIX_EPOCH + Duration::from_secs(from + life * 2 / 3 - jitter.min(life * 2 / 3)))
}

/// Seconds until the certificate in `chain_pem` expires (negative: expired).
pub fn expires_in(chain_pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(cert.validity().not_after.timestamp() - now)
}

impl AcmeService {
    async fn account(&self) -> anyhow::Result<Account> {
        let builder = || match &self.cfg.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let path = self.dir.join("account.json");
        if let Ok(bytes) = std::fs::read(&path) {
            let creds: AccountCredentials = serde_json::from_slice(&bytes)?;
            return Ok(builder()?.from_credentials(creds).await?);
        }
        let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.cfg.directory_url.clone(),
                None,
            )
            .await?;
        crate::tls::write_private(&path, &serde_json::to_vec(&creds)?)?;
        tracing::info!(id = account.id(), "ACME account created");
        Ok(account)
    }

    /// Orders, validates and installs a certificate for `host`.
    async fn issue(&self, account: &Account, host: &str) -> anyhow::Result<()> {
        let ids = [Identifier::Dns(host.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut tokens = Vec::new();
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => anyhow::bail!("authorization for {host} is {other:?}"),
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| anyhow::anyhow!("no http-01 challenge offered"))?;
            self.challenges.set(
                challenge.token.clone(),
                challenge.key_authorization().as_str().to_string(),
            );
            tokens.push(challenge.token.clone());
            challenge.set_ready().await?;
        }
        let result = async {
            let status = order.poll_ready(&RetryPolicy::default()).await?;
            anyhow::ensure!(status == OrderStatus::Ready, "order for {host} ended {status:?}");
            let key_pem = order.finalize().await?;
            let chain_pem = order.poll_certificate(&RetryPolicy::default()).await?;
            self.store
                .install(host, chain_pem.as_bytes(), key_pem.as_bytes())?;
            Ok(())
        }
        .await;
        for t in &tokens {
            self.challenges.clear(t);
        }
        result
    }

    /// Issues what is due; returns when to look again.
    async fn round(&self, backoff: &mut HashMap<String, Duration>) -> Duration {
        let mut next = Duration::from_secs(self.cfg.check_secs);
        let mut account = None;
        for host in &self.hostnames {
            let due = self
                .store
                .chain_pem(host)
                .as_deref()
                .and_then(due_at)
                .unwrap_or(UNIX_EPOCH);
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            if !wait.is_zero() {
                next = next.min(wait);
                continue;
            }
            if account.is_none() {
                match self.account().await {
                    Ok(a) => account = Some(a),
                    Err(e) => {
                        metrics::counter!("portico_gateway_acme_failures_total").increment(1);
                        tracing::error!(error = format!("{e:#}"), "ACME account unavailable");
                        return Duration::from_secs(5);
                    }
                }
            }
            let acct = account.as_ref().expect("set above");
            match self.issue(acct, host).await {
                Ok(()) => {
                    backoff.remove(host);
                    tracing::info!(host, "certificate issued");
                }
                Err(e) => {
                    let b = backoff.entry(host.clone()).or_insert(Duration::from_secs(1));
                    *b = (*b * 2).min(Duration::from_secs(3600));
                    next = next.min(*b);
                    metrics::counter!("portico_gateway_acme_failures_total").increment(1);
                    tracing::error!(host, error = format!("{e:#}"), retry_in = ?*b, "certificate not issued; keeping the old one");
                }
            }
        }
        for host in &self.hostnames {
            if let Some(secs) = self.store.chain_pem(host).as_deref().and_then(expires_in) {
                metrics::gauge!("portico_gateway_certificate_expiry_seconds", "host" => host.clone())
                    .set(secs as f64);
            }
        }
        next.max(Duration::from_millis(500))
    }
}

#[async_trait]
impl BackgroundService for AcmeService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = HashMap::new();
        loop {
            let wait = self.round(&mut backoff).await;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
