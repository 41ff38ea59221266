//! User tokens: HS256 JWTs carrying the user id, roles and expiry.
//!
//! Tokens are issued by the customer's application (or by `/demo/token` in
//! development) with the shared `auth.jwt_secret`; chat, jobs and the gateway
//! verify them here. The HMAC check is constant-time (RustCrypto `hmac`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use portico_config::Secret;
use serde::{Deserialize, Serialize};

/// The claims Portico reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Role names, e.g. `super_admin`, `ops_lead`, `technician`, `service`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Why a token was refused. Deliberately coarse: the client learns that the
/// token is bad, not which check it failed, beyond expiry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("user id in token is empty or longer than 128 bytes")]
    BadSubject,
}

/// Longest accepted user id (it becomes a key in registries and limits).
pub const MAX_SUBJECT_LEN: usize = 128;

/// A user id as tokens carry it and APIs take it: 1-128 bytes, no control
/// characters (a NUL cannot be stored in PostgreSQL text, and none belongs
/// in a name shown to people).
pub fn is_subject(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SUBJECT_LEN && !s.chars().any(char::is_control)
}

/// Signing and verification keys derived from the shared secret.
#[derive(Clone)]
pub struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(***)")
    }
}

impl Tokens {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            enc: EncodingKey::from_secret(secret.expose().as_bytes()),
            dec: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        }
    }

    /// Signs a token for `sub` valid for `ttl`.
    pub fn issue(&self, sub: &str, roles: &[&str], ttl: Duration) -> String {
        let exp = now_secs() + ttl.as_secs();
        let claims = Claims {
            sub: sub.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .expect("HS256 signing cannot fail")
    }

    /// Verifies signature and expiry and returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid,
        })?;
        let c = data.claims;
        if !is_subject(&c.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(c)
    }
}

/// The token of an `Authorization: Bearer <jwt>` header.
pub fn bearer_token(h: &http::HeaderMap) -> Option<&str> {
    h.get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Finds the token of a WebSocket handshake: `Sec-WebSocket-Protocol:
/// <subprotocol>, bearer.<jwt>`, then `Authorization: Bearer <jwt>`, then
/// `?token=<jwt>` (for clients that can set neither). Also says whether the
/// client offered `subprotocol`.
pub fn handshake_token(
    h: &http::HeaderMap,
    query: Option<&str>,
    subprotocol: &str,
) -> Option<(String, bool)> {
    let protocols: Vec<&str> = h
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let offered = protocols.contains(&subprotocol);
    let token = protocols
        .iter()
        .find_map(|p| p.strip_prefix("bearer."))
        .or_else(|| bearer_token(h))
        .or_else(|| query?.split('&').find_map(|kv| kv.strip_prefix("token=")))?;
    Some((token.to_string(), offered))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(s: &str) -> Tokens {
        Tokens::new(&Secret::new(s))
    }

    #[test]
    fn round_trip() {
        let t = tokens("0123456789abcdef0123456789abcdef");
        let tok = t.issue("alice", &["technician"], Duration::from_secs(60));
        let c = t.verify(&tok).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.has_role("technician"));
    }

    #[test]
    fn forged_and_expired_are_refused() {
        let t = tokens("0123456789abcdef0123456789abcdef");
        let other = tokens("ffffffffffffffffffffffffffffffff");
        let forged = other.issue("alice", &[], Duration::from_secs(60));
        assert_eq!(t.verify(&forged), Err(AuthError::Invalid));
        let claims = Claims {
            sub: "a".into(),
            roles: vec![],
            exp: now_secs() - 3600,
        };
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &t.enc).unwrap();
        assert_eq!(t.verify(&expired), Err(AuthError::Expired));
        assert_eq!(t.verify("not.a.token"), Err(AuthError::Invalid));
    }

    #[test]
    fn alg_none_is_refused() {
        let t = tokens("0123456789abcdef0123456789abcdef");
        // {"alg":"none"} . {"sub":"a","exp":9999999999} . (no signature)
        let tok = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(t.verify(tok), Err(AuthError::Invalid));
    }
}
