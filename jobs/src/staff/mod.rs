//! Staff accounts and their sessions: who may use the ops console and the
//! API with a browser. People log in with a password (Argon2id) and get
//! two `HttpOnly` cookies: a short-lived access token and a rotating
//! refresh token (both random, stored hashed: [`db`]). Machines keep using
//! bearer JWTs. [`auth`] is the one extractor every route uses to learn
//! who is calling and whether their role may; [`api`] holds the login,
//! refresh, logout and user-management routes.

pub mod api;
pub mod auth;
pub mod db;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use db::User;

/// A staff role, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    SuperAdmin,
    OpsLead,
    Technician,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::SuperAdmin, Role::OpsLead, Role::Technician];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::SuperAdmin => crate::api::SUPER_ADMIN,
            Role::OpsLead => crate::api::OPS_LEAD,
            Role::Technician => crate::api::TECHNICIAN,
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Shortest and longest accepted password (Argon2 itself takes any; the
/// upper bound keeps a login request from buying minutes of hashing).
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 12..=256;

/// Why a new account or password was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("user id must be 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")]
    Id,
    #[error("`{0}` is not an e-mail address")]
    Email(String),
    #[error("name must be 1-128 characters without control characters")]
    Name,
    #[error("role must be one of super_admin, ops_lead, technician")]
    Role,
    #[error("password must be {} to {} characters", PASSWORD_LEN.start(), PASSWORD_LEN.end())]
    Password,
}

pub fn check_id(id: &str) -> Result<(), AccountError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && id.as_bytes()[0].is_ascii_alphanumeric();
    ok.then_some(()).ok_or(AccountError::Id)
}

pub fn check_email(email: &str) -> Result<(), AccountError> {
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    ok.then_some(())
        .ok_or_else(|| AccountError::Email(email.chars().take(64).collect()))
}

pub fn check_name(name: &str) -> Result<(), AccountError> {
    let n = name.chars().count();
    ((1..=128).contains(&n) && !name.chars().any(char::is_control))
        .then_some(())
        .ok_or(AccountError::Name)
}

pub fn check_password(pw: &str) -> Result<(), AccountError> {
    PASSWORD_LEN
        .contains(&pw.chars().count())
        .then_some(())
        .ok_or(AccountError::Password)
}

/// Hashes a password with Argon2id (the crate's defaults: 19 MiB, two
/// passes, OWASP's minimum). CPU-heavy: call from a blocking thread.
pub fn hash_password(pw: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes is a valid salt");
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .expect("Argon2 with default parameters cannot fail")
        .to_string()
}

/// Checks a password against a stored hash (constant-time comparison
/// inside). With no hash (unknown account) a dummy one is checked, so an
/// unknown account takes as long as a known one.
pub fn verify_password(pw: &str, hash: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("not a password of anyone"));
    let (stored, real) = match hash {
        Some(h) => (h, true),
        None => (dummy.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(stored) else {
        return false;
    };
    Argon2::default().verify_password(pw.as_bytes(), &parsed).is_ok() && real
}

/// A new random token (256 bits, URL-safe base64).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What the database keeps of a token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A password people can type: 20 characters from an unambiguous set
/// (about 114 bits).
pub fn generate_password() -> String {
    const SET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..20)
        .map(|_| SET[rand::random_range(0..SET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let h = hash_password("correct horse battery");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", Some(&h)));
        assert!(!verify_password("correct horse batterY", Some(&h)));
        assert!(!verify_password("correct horse battery", None));
        assert!(!verify_password("x", Some("not a hash")));
    }

    #[test]
    fn account_fields_are_checked() {
        assert!(check_id("alice").is_ok() && check_id("a.b_c-1").is_ok());
        for bad in ["", "Alice", "-a", "a b", "a/b", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        assert!(check_email("a@b.example").is_ok());
        for bad in ["a", "@b.c", "a@b", "a@.b", "a b@c.d", "a@b.c."] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_name("Ayşe Yılmaz").is_ok());
        assert!(check_name("").is_err() && check_name("a\nb").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password(&"x".repeat(257)).is_err());
        assert!(check_password(&generate_password()).is_ok());
        assert_eq!(Role::parse("ops_lead"), Some(Role::OpsLead));
        assert_eq!(Role::parse("root"), None);
        assert_ne!(new_token(), new_token());
    }
}
