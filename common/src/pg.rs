//! PostgreSQL plumbing for the services that keep state there (the chat
//! store, jobs): a bounded connection pool, TLS as libpq's `sslmode` says,
//! and schema migrations applied once each, in order, under an advisory
//! lock so that several processes starting together do not race. Queries
//! stay with their service.
//!
//! Every database URL takes libpq's `sslmode` and `sslrootcert`:
//! `disable` (the default: plain, for a database on this machine),
//! `prefer` (TLS when the server offers it), `require` (TLS or nothing;
//! the certificate is verified only when `sslrootcert` is given, as in
//! libpq), `verify-ca` (the chain, not the name) and `verify-full` (chain
//! and host name). The roots are `sslrootcert` (a PEM file) or, without
//! it, the Mozilla roots. TLS is rustls (tokio-postgres-rustls).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL does not parse (the caller names the config key).
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> PgError {
    PgError::Unavailable(e.to_string())
}

/// An error and its causes, so that "error performing TLS handshake" says
/// which certificate check failed.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> PgError {
    PgError::Unavailable(describe(e))
}

/// An error with its causes, for errors that hide them behind a summary
/// (a pool's "error occurred while creating a new object").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

/// How a URL asks for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tls {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A database URL: its connection settings and, unless TLS is disabled,
/// the connector its `sslmode`/`sslrootcert` ask for.
pub struct Target {
    pub config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, PgError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut mode, mut root) = (Tls::Disable, None::<PathBuf>);
        let mut rest = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("sslmode", v)) => {
                    mode = match v {
                        "disable" => Tls::Disable,
                        "prefer" | "allow" => Tls::Prefer,
                        "require" => Tls::Require,
                        "verify-ca" => Tls::VerifyCa,
                        "verify-full" => Tls::VerifyFull,
                        other => {
                            return Err(PgError::Url(format!(
                                "sslmode `{other}`: disable, prefer, require, verify-ca or verify-full"
                            )));
                        }
                    }
                }
                Some(("sslrootcert", v)) => {
                    root = Some(PathBuf::from(
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned(),
                    ))
                }
                _ => rest.push(kv),
            }
        }
        let plain = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config: tokio_postgres::Config = plain.parse().map_err(|e| PgError::Url(format!("{e}")))?;
        config.ssl_mode(match mode {
            Tls::Disable => SslMode::Disable,
            Tls::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let tls = match mode {
            Tls::Disable => None,
            mode => Some(connector(&mode, root.as_deref())?),
        };
        Ok(Target { config, tls })
    }

    /// One connection (its driver runs on a spawned task).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, PgError> {
        let client = match &self.tls {
            None => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(|e| with_causes(&e))?;
                tokio::spawn(conn);
                client
            }
            Some(tls) => {
                let (client, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| with_causes(&e))?;
                tokio::spawn(conn);
                client
            }
        };
        Ok(client)
    }
}

/// One connection to `url` (for one-off queries outside a pool).
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, PgError> {
    Target::parse(url)?.connect().await
}

fn connector(mode: &Tls, root: Option<&std::path::Path>) -> Result<MakeRustlsConnect, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| PgError::Url(format!("sslrootcert {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(PgError::Url(format!(
                    "sslrootcert {}: no certificate in it",
                    path.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| PgError::Url(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| PgError::Url(format!("TLS roots: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, root) {
        // libpq: `require` (and `prefer`) verify only against a given root.
        (Tls::Require | Tls::Prefer, None) => Arc::new(Unverified(provider.clone())),
        (Tls::VerifyCa | Tls::Require | Tls::Prefer, _) => Arc::new(ChainOnly(webpki)),
        _ => webpki,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Url(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not
/// checked (the server may be reached by an address its certificate
/// does not list).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// libpq's `require` without a root: encrypted, the peer not verified
/// (handshake signatures still checked).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A pool of at most `size` connections to `url`; waiting for, creating
/// and recycling a connection each give up after `timeout`. Nothing is
/// connected yet: the server need not be up.
pub fn pool(url: &str, size: usize, timeout: Duration) -> Result<Pool, PgError> {
    let target = Target::parse(url)?;
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = match target.tls {
        None => Manager::from_config(target.config, NoTls, manager_config),
        Some(tls) => Manager::from_config(target.config, tls, manager_config),
    };
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(unavailable)
}

/// Applies the `migrations` not yet recorded in `version_table`, in one
/// transaction holding advisory lock `lock`.
pub async fn migrate(
    pool: &Pool,
    version_table: &str,
    lock: i64,
    migrations: &[&str],
) -> Result<(), PgError> {
    let mut client = pool.get().await.map_err(|e| with_causes(&e))?;
    let tx = client.transaction().await.map_err(unavailable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .map_err(unavailable)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {version_table} (version int NOT NULL)"
    ))
    .await
    .map_err(unavailable)?;
    let done: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {version_table}"), &[])
        .await
        .map_err(unavailable)?
        .get(0);
    for (i, sql) in migrations.iter().enumerate().skip(done as usize) {
        tx.batch_execute(sql).await.map_err(unavailable)?;
        tx.execute(
            &format!("INSERT INTO {version_table} VALUES ($1)"),
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(unavailable)?;
        tracing::info!(schema = version_table, version = i + 1, "schema migrated");
    }
    tx.commit().await.map_err(unavailable)
}
