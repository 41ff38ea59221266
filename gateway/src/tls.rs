//! The certificate store: PEM files on disk (directory 700, keys 600),
//! served by SNI through a rustls resolver whose map is swapped atomically,
//! so a new or renewed certificate applies to the next handshake without
//! touching open connections.
//!
//! Without ACME, a self-signed certificate for the configured hostnames is
//! generated on first start (rcgen) and reused afterwards.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate directory {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate {}: {reason}", path.display())]
    Bad { path: PathBuf, reason: String },
    #[error("`{0}` is not a valid hostname")]
    Hostname(String),
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
}

/// Certificates by hostname, loaded from and saved to one directory.
#[derive(Debug)]
pub struct CertStore {
    dir: PathBuf,
    by_host: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl CertStore {
    /// Opens (creating, mode 700) `dir` and loads every `<host>.crt`/`.key`.
    pub fn open(dir: &Path) -> Result<Arc<Self>, TlsError> {
        let io = |source| TlsError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        let store = Arc::new(CertStore {
            dir: dir.to_path_buf(),
            by_host: ArcSwap::default(),
        });
        let mut map = HashMap::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(host) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".crt"))
            else {
                continue;
            };
            if !portico_config::is_hostname(host) {
                continue;
            }
            let key = store.load(host)?;
            map.insert(host.to_string(), key);
        }
        store.by_host.store(Arc::new(map));
        Ok(store)
    }

    fn paths(&self, host: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{host}.crt")),
            self.dir.join(format!("{host}.key")),
        )
    }

    fn load(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let (crt, key) = self.paths(host);
        let read = |p: &Path| {
            fs::read(p).map_err(|source| TlsError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        parse(&read(&crt)?, &read(&key)?)
            .map(Arc::new)
            .map_err(|reason| TlsError::Bad { path: crt, reason })
    }

    /// The PEM chain on disk for `host`, if any.
    pub fn chain_pem(&self, host: &str) -> Option<Vec<u8>> {
        if !portico_config::is_hostname(host) {
            return None;
        }
        fs::read(self.paths(host).0).ok()
    }

    /// Whether a certificate for `host` is loaded.
    pub fn has(&self, host: &str) -> bool {
        self.by_host.load().contains_key(host)
    }

    /// Validates, saves (atomically, key mode 600) and serves a certificate
    /// chain and key for `host`.
    pub fn install(&self, host: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        if !portico_config::is_hostname(host) {
            return Err(TlsError::Hostname(host.to_string()));
        }
        let (crt, key) = self.paths(host);
        let certified = parse(chain_pem, key_pem).map_err(|reason| TlsError::Bad {
            path: crt.clone(),
            reason,
        })?;
        write_atomic(&key, key_pem)?;
        write_atomic(&crt, chain_pem)?;
        let mut map = HashMap::clone(&self.by_host.load());
        map.insert(host.to_string(), Arc::new(certified));
        self.by_host.store(Arc::new(map));
        Ok(())
    }

    /// Generates one self-signed certificate for `hosts` unless each has one.
    pub fn ensure_self_signed(&self, hosts: &[String]) -> Result<(), TlsError> {
        if hosts.iter().all(|h| self.has(h)) {
            return Ok(());
        }
        self.self_signed(hosts, hosts)
    }

    /// Generates a self-signed certificate for `domain` and `*.domain`,
    /// stored under `domain` (the resolver serves it for any direct
    /// subdomain without a certificate of its own), unless one exists.
    pub fn ensure_self_signed_wildcard(&self, domain: &str) -> Result<(), TlsError> {
        if self.has(domain) {
            return Ok(());
        }
        self.self_signed(
            &[domain.to_string()],
            &[domain.to_string(), format!("*.{domain}")],
        )
    }

    fn self_signed(&self, stored_as: &[String], names: &[String]) -> Result<(), TlsError> {
        let generated = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let (chain, key) = (generated.cert.pem(), generated.signing_key.serialize_pem());
        for h in stored_as {
            self.install(h, chain.as_bytes(), key.as_bytes())?;
        }
        tracing::info!(names = ?names, dir = %self.dir.display(), "generated a self-signed certificate");
        Ok(())
    }

    /// The rustls resolver that serves this store.
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(Resolver(self.clone()))
    }
}

fn parse(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("bad private key PEM: {e}"))?;
    CertifiedKey::from_der(chain, key, &default_provider()).map_err(|e| e.to_string())
}

/// Writes a private file (mode 600) atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| TlsError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_atomic(path, data)
}

/// Writes `path` via a temporary file and rename, mode 600 from the start.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    portico_common::files::write_private(path, data).map_err(io)
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let map = self.0.by_host.load();
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            if let Some(key) = map.get(&name) {
                return Some(key.clone());
            }
            // `app.paas.example.com` → the wildcard stored as `paas.example.com`.
            if let Some(key) = name.split_once('.').and_then(|(_, parent)| map.get(parent)) {
                return Some(key.clone());
            }
        }
        // No SNI (e.g. an IP literal) or an unknown name: any certificate,
        // chosen stably, so the client can at least report the mismatch.
        map.iter().min_by(|a, b| a.0.cmp(b.0)).map(|(_, k)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_generated_once_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("portico-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = CertStore::open(&dir).unwrap();
        store.ensure_self_signed(&["localhost".into()]).unwrap();
        let key_mode = fs::metadata(dir.join("localhost.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let first = fs::read(dir.join("localhost.crt")).unwrap();
        let again = CertStore::open(&dir).unwrap();
        assert!(again.has("localhost"));
        again.ensure_self_signed(&["localhost".into()]).unwrap();
        assert_eq!(
            first,
            fs::read(dir.join("localhost.crt")).unwrap(),
            "not regenerated"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_input() {
        let dir = std::env::temp_dir().join(format!("portico-tls-bad-{}", std::process::id()));
        let store = CertStore::open(&dir).unwrap();
        assert!(matches!(
            store.install("../etc", b"x", b"y"),
            Err(TlsError::Hostname(_))
        ));
        assert!(matches!(
            store.install("a.example", b"garbage", b"garbage"),
            Err(TlsError::Bad { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
