//! Signed, expiring download links: HMAC-SHA256 over the customer, the
//! backup id, the file and the expiry, checked in constant time. The key
//! is derived from the service secret, so links survive restarts and work
//! on every jobs process.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

/// Why a link is refused (all answered 403).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link has expired")]
    Expired,
    #[error("the link signature is invalid")]
    BadSignature,
}

impl Signer {
    pub fn new(secret: &[u8]) -> Signer {
        // A key of its own: a token signature can never pass as a link's.
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"portico-jobs download links v1");
        Signer {
            key: mac.finalize().into_bytes().to_vec(),
        }
    }

    fn mac(&self, customer: &str, backup: &str, file: &str, expires: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        // Length-prefixed fields: no two different tuples sign the same bytes.
        for part in [customer, backup, file] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.update(&expires.to_be_bytes());
        mac
    }

    pub fn sign(&self, customer: &str, backup: &str, file: &str, expires: u64) -> String {
        hex::encode(self.mac(customer, backup, file, expires).finalize().into_bytes())
    }

    pub fn verify(
        &self,
        customer: &str,
        backup: &str,
        file: &str,
        expires: u64,
        sig: &str,
        now: u64,
    ) -> Result<(), LinkError> {
        let sig = hex::decode(sig).map_err(|_| LinkError::BadSignature)?;
        // `verify_slice` compares in constant time.
        self.mac(customer, backup, file, expires)
            .verify_slice(&sig)
            .map_err(|_| LinkError::BadSignature)?;
        if now > expires {
            return Err(LinkError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tampering_and_expiry_are_refused() {
        let s = Signer::new(b"secret-secret-secret-secret-secret");
        let sig = s.sign("acme", "20261123-101010", "db.dump", 1000);
        assert_eq!(
            s.verify("acme", "20261123-101010", "db.dump", 1000, &sig, 999),
            Ok(())
        );
        assert_eq!(
            s.verify("acme", "20261123-101010", "db.dump", 1000, &sig, 1001),
            Err(LinkError::Expired)
        );
        assert_eq!(
            s.verify("acme", "20261123-101010", "db.dump", 2000, &sig, 999),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            s.verify("acme", "20261123-101010", "uploads.tar.gz", 1000, &sig, 999),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            s.verify("other", "20261123-101010", "db.dump", 1000, &sig, 999),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            s.verify("acme", "20261123-101010", "db.dump", 1000, "zz", 999),
            Err(LinkError::BadSignature)
        );
    }
}
