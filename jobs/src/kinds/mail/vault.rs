//! Mailbox credentials at rest: XChaCha20-Poly1305 (the `chacha20poly1305`
//! crate, RustCrypto) under a key chosen by id, so keys can be rotated:
//! new secrets use `jobs.mail.active_key`, old ones open with the key their
//! id names. The associated data binds a sealed secret to its row and
//! field, so a value copied into another row does not open.
//!
//! Sealed form: `v1:<key id>:<base64(nonce ‖ ciphertext)>`.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use portico_config::MailConfig;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "no encryption key: set jobs.mail.keys and jobs.mail.active_key (PORTICO_JOBS__MAIL__KEYS__<ID>, PORTICO_JOBS__MAIL__ACTIVE_KEY)"
    )]
    NoKey,
    #[error("the secret was sealed with key `{0}`, which is not configured")]
    UnknownKey(String),
    #[error("a sealed secret does not open (wrong key, or not its row)")]
    Corrupt,
}

pub struct Vault {
    keys: BTreeMap<String, XChaCha20Poly1305>,
    active: Option<String>,
}

impl Vault {
    pub fn new(cfg: &MailConfig) -> Vault {
        let keys = cfg
            .keys
            .iter()
            .filter_map(|(id, k)| {
                let bytes = STANDARD.decode(k.expose().trim()).ok()?;
                let cipher = XChaCha20Poly1305::new_from_slice(&bytes).ok()?;
                Some((id.clone(), cipher))
            })
            .collect();
        Vault {
            keys,
            active: cfg.active_key.clone(),
        }
    }

    pub fn ready(&self) -> Result<(), VaultError> {
        match &self.active {
            Some(k) if self.keys.contains_key(k) => Ok(()),
            _ => Err(VaultError::NoKey),
        }
    }

    pub fn seal(&self, plain: &str, aad: &str) -> Result<String, VaultError> {
        let id = self.active.as_deref().ok_or(VaultError::NoKey)?;
        let cipher = self.keys.get(id).ok_or(VaultError::NoKey)?;
        let nonce: [u8; 24] = rand::random();
        let ct = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Corrupt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(format!("v1:{id}:{}", STANDARD.encode(out)))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<String, VaultError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some("v1"), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(VaultError::Corrupt);
        };
        let cipher = self
            .keys
            .get(id)
            .ok_or_else(|| VaultError::UnknownKey(id.to_string()))?;
        let raw = STANDARD.decode(body).map_err(|_| VaultError::Corrupt)?;
        if raw.len() < 24 + 16 {
            return Err(VaultError::Corrupt);
        }
        let (nonce, ct) = raw.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().map_err(|_| VaultError::Corrupt)?;
        let plain = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Corrupt)?;
        String::from_utf8(plain).map_err(|_| VaultError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_config::Secret;

    fn cfg(keys: &[(&str, [u8; 32])], active: &str) -> MailConfig {
        MailConfig {
            keys: keys
                .iter()
                .map(|(id, k)| (id.to_string(), Secret::new(STANDARD.encode(k))))
                .collect(),
            active_key: Some(active.into()),
            ..MailConfig::default()
        }
    }

    #[test]
    fn seals_opens_rotates_and_binds_to_its_row() {
        let old = Vault::new(&cfg(&[("k1", [1; 32])], "k1"));
        let sealed = old.seal("hunter2", "mailbox:1:source").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert!(sealed.starts_with("v1:k1:"));
        assert_eq!(old.open(&sealed, "mailbox:1:source").unwrap(), "hunter2");
        assert!(matches!(
            old.open(&sealed, "mailbox:2:source"),
            Err(VaultError::Corrupt)
        ));
        // Rotation: k2 seals new secrets, k1's still open.
        let both = Vault::new(&cfg(&[("k1", [1; 32]), ("k2", [2; 32])], "k2"));
        assert_eq!(both.open(&sealed, "mailbox:1:source").unwrap(), "hunter2");
        assert!(both.seal("x", "a").unwrap().starts_with("v1:k2:"));
        let only_new = Vault::new(&cfg(&[("k2", [2; 32])], "k2"));
        assert!(matches!(
            only_new.open(&sealed, "mailbox:1:source"),
            Err(VaultError::UnknownKey(_))
        ));
        // Two seals of one value differ (random nonces).
        assert_ne!(old.seal("x", "a").unwrap(), old.seal("x", "a").unwrap());
    }
}
