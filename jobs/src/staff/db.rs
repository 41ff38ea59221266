//! The staff tables: `staff_users` (who may log in, with which role),
//! `staff_sessions` (one per login: the access token's hash, its CSRF
//! token, revoked or not), `staff_refresh` (the refresh tokens of a
//! session, hashed; a used one stays as a tripwire) and `login_attempts`
//! (what the login throttle counts).
//!
//! Tokens are stored only as SHA-256 hashes: a database dump does not
//! hold a usable session.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::error::SqlState;

use super::Role;
use crate::queue::db::{Db, DbError, Schema, unavailable};

pub static SCHEMA: Schema = Schema {
    version_table: "jobs_staff_schema",
    migrations: &[r#"
CREATE TABLE staff_users (
    id            text PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('super_admin', 'ops_lead', 'technician')),
    password_hash text NOT NULL,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE staff_sessions (
    id             bigserial PRIMARY KEY,
    user_id        text NOT NULL REFERENCES staff_users(id) ON DELETE CASCADE,
    access_hash    bytea NOT NULL UNIQUE,
    access_expires timestamptz NOT NULL,
    csrf           text NOT NULL,
    ip             text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires        timestamptz NOT NULL,
    revoked_at     timestamptz,
    revoked_why    text
);
CREATE INDEX staff_sessions_by_user ON staff_sessions (user_id) WHERE revoked_at IS NULL;
CREATE TABLE staff_refresh (
    hash       bytea PRIMARY KEY,
    session_id bigint NOT NULL REFERENCES staff_sessions(id) ON DELETE CASCADE,
    used_at    timestamptz
);
CREATE TABLE login_attempts (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    account text NOT NULL,
    ip      text NOT NULL,
    ok      boolean NOT NULL
);
CREATE INDEX login_attempts_by_account ON login_attempts (account, at);
CREATE INDEX login_attempts_by_ip ON login_attempts (ip, at);
"#],
};

/// A staff account as the API shows it (never its password hash).
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub disabled: bool,
}

fn user_from(r: &tokio_postgres::Row) -> User {
    let role: String = r.get(3);
    User {
        id: r.get(0),
        email: r.get(1),
        name: r.get(2),
        // The column's CHECK admits only known roles.
        role: Role::parse(&role).unwrap_or(Role::Technician),
        disabled: r.get(4),
    }
}

/// A live session, found by its access token.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: i64,
    pub user: User,
    pub csrf: String,
    /// Seconds since the epoch.
    pub access_expires: u64,
}

/// What a refresh token turned out to be.
pub enum Refreshed {
    /// Rotated: the session's new tokens are in place.
    Rotated { session: i64, user: User },
    /// Unknown, expired, or its session is over.
    Invalid,
    /// Already used: someone replayed it; its whole session is revoked.
    Reused { session: i64, user_id: String },
}

/// How many failed logins an account and an address have had lately.
#[derive(Debug, Clone, Copy)]
pub struct Failures {
    /// Failures of the account since its last success, in the window.
    pub account: i64,
    /// Seconds since the account's latest failure.
    pub account_last_secs: u64,
    /// Failures from the address, in the window.
    pub ip: i64,
}

const USER_COLUMNS: &str = "id, email, name, role, disabled";

impl Db {
    pub async fn add_user(&self, u: &User, password_hash: &str) -> Result<(), DbError> {
        let r = self
            .client()
            .await?
            .execute(
                "INSERT INTO staff_users (id, email, name, role, password_hash) VALUES ($1, $2, $3, $4, $5)",
                &[&u.id, &u.email, &u.name, &u.role.as_str(), &password_hash],
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(DbError::Exists(format!("user {} or e-mail {}", u.id, u.email)))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    pub async fn users(&self) -> Result<Vec<User>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {USER_COLUMNS} FROM staff_users ORDER BY id"),
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(user_from).collect())
    }

    pub async fn user_count(&self) -> Result<i64, DbError> {
        let row = self
            .client()
            .await?
            .query_one("SELECT count(*) FROM staff_users", &[])
            .await
            .map_err(unavailable)?;
        Ok(row.get(0))
    }

    /// A user by id or e-mail, with its password hash.
    pub async fn user_login(&self, account: &str) -> Result<Option<(User, String)>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {USER_COLUMNS}, password_hash FROM staff_users WHERE id = $1 OR lower(email) = lower($1)"
                ),
                &[&account],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| (user_from(&r), r.get(5))))
    }

    /// Sets a user's password; every session of theirs ends.
    pub async fn set_password(&self, id: &str, password_hash: &str) -> Result<(), DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let n = tx
            .execute(
                "UPDATE staff_users SET password_hash = $2 WHERE id = $1",
                &[&id, &password_hash],
            )
            .await
            .map_err(unavailable)?;
        if n == 0 {
            return Err(DbError::Missing(format!("user {id}")));
        }
        revoke_user(&tx, id, "password changed").await?;
        tx.commit().await.map_err(unavailable)
    }

    /// Disables (or enables) a user; disabling ends every session at once.
    pub async fn set_disabled(&self, id: &str, disabled: bool) -> Result<(), DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let n = tx
            .execute(
                "UPDATE staff_users SET disabled = $2 WHERE id = $1",
                &[&id, &disabled],
            )
            .await
            .map_err(unavailable)?;
        if n == 0 {
            return Err(DbError::Missing(format!("user {id}")));
        }
        if disabled {
            revoke_user(&tx, id, "user disabled").await?;
        }
        tx.commit().await.map_err(unavailable)
    }

    /// Starts a session: its access token (hash, expiry), CSRF token and
    /// first refresh token (hash).
    #[allow(clippy::too_many_arguments)]
    pub async fn open_session(
        &self,
        user: &str,
        access_hash: &[u8],
        access_ttl: Duration,
        csrf: &str,
        refresh_hash: &[u8],
        refresh_ttl: Duration,
        ip: &str,
    ) -> Result<i64, DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO staff_sessions (user_id, access_hash, access_expires, csrf, ip, expires)
                 VALUES ($1, $2, now() + make_interval(secs => $3), $4, $5, now() + make_interval(secs => $6))
                 RETURNING id",
                &[
                    &user,
                    &access_hash,
                    &(access_ttl.as_secs() as f64),
                    &csrf,
                    &ip,
                    &(refresh_ttl.as_secs() as f64),
                ],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        tx.execute(
            "INSERT INTO staff_refresh (hash, session_id) VALUES ($1, $2)",
            &[&refresh_hash, &id],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(id)
    }

    /// The live session whose access token hashes to `access_hash`: not
    /// revoked, not expired, its user not disabled.
    pub async fn session(&self, access_hash: &[u8]) -> Result<Option<Session>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT u.id, u.email, u.name, u.role, u.disabled, s.id, s.csrf,
                        extract(epoch FROM s.access_expires)::bigint
                 FROM staff_sessions s JOIN staff_users u ON u.id = s.user_id
                 WHERE s.access_hash = $1 AND s.revoked_at IS NULL AND s.access_expires > now()
                   AND s.expires > now() AND NOT u.disabled",
                &[&access_hash],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Session {
            user: user_from(&r),
            id: r.get(5),
            csrf: r.get(6),
            access_expires: r.get::<_, i64>(7).max(0) as u64,
        }))
    }

    /// Exchanges a refresh token: a fresh one marks it used and puts new
    /// tokens on its session; a used one revokes the session (the family)
    /// — the tokens were stolen, or replayed.
    pub async fn refresh(
        &self,
        refresh_hash: &[u8],
        new_access_hash: &[u8],
        access_ttl: Duration,
        new_refresh_hash: &[u8],
        new_csrf: &str,
    ) -> Result<Refreshed, DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let row = tx
            .query_opt(
                "SELECT r.session_id, r.used_at IS NOT NULL, s.revoked_at IS NULL AND s.expires > now(),
                        u.id, u.email, u.name, u.role, u.disabled
                 FROM staff_refresh r JOIN staff_sessions s ON s.id = r.session_id
                 JOIN staff_users u ON u.id = s.user_id
                 WHERE r.hash = $1 FOR UPDATE OF r, s",
                &[&refresh_hash],
            )
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(Refreshed::Invalid);
        };
        let session: i64 = row.get(0);
        let used: bool = row.get(1);
        let live: bool = row.get(2);
        let user = User {
            id: row.get(3),
            email: row.get(4),
            name: row.get(5),
            role: Role::parse(row.get(6)).unwrap_or(Role::Technician),
            disabled: row.get(7),
        };
        if used {
            tx.execute(
                "UPDATE staff_sessions SET revoked_at = now(), revoked_why = 'refresh token reused'
                 WHERE id = $1 AND revoked_at IS NULL",
                &[&session],
            )
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            return Ok(Refreshed::Reused {
                session,
                user_id: user.id,
            });
        }
        if !live || user.disabled {
            return Ok(Refreshed::Invalid);
        }
        tx.execute(
            "UPDATE staff_refresh SET used_at = now() WHERE hash = $1",
            &[&refresh_hash],
        )
        .await
        .map_err(unavailable)?;
        tx.execute(
            "INSERT INTO staff_refresh (hash, session_id) VALUES ($1, $2)",
            &[&new_refresh_hash, &session],
        )
        .await
        .map_err(unavailable)?;
        tx.execute(
            "UPDATE staff_sessions SET access_hash = $2, access_expires = now() + make_interval(secs => $3),
                    csrf = $4
             WHERE id = $1",
            &[
                &session,
                &new_access_hash,
                &(access_ttl.as_secs() as f64),
                &new_csrf,
            ],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Refreshed::Rotated { session, user })
    }

    /// Ends a session (logout).
    pub async fn revoke_session(&self, id: i64, why: &str) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "UPDATE staff_sessions SET revoked_at = now(), revoked_why = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &why],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Records a login attempt; forgets attempts older than a day.
    pub async fn login_attempt(&self, account: &str, ip: &str, ok: bool) -> Result<(), DbError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO login_attempts (account, ip, ok) VALUES ($1, $2, $3)",
            &[&account, &ip, &ok],
        )
        .await
        .map_err(unavailable)?;
        c.execute(
            "DELETE FROM login_attempts WHERE at < now() - interval '1 day'",
            &[],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// Failed logins of `account` (since its last success) and from `ip`
    /// within `window`.
    pub async fn login_failures(
        &self,
        account: &str,
        ip: &str,
        window: Duration,
    ) -> Result<Failures, DbError> {
        let secs = window.as_secs() as f64;
        let row = self
            .client()
            .await?
            .query_one(
                "WITH recent AS (SELECT * FROM login_attempts WHERE at > now() - make_interval(secs => $3)),
                      last_ok AS (SELECT max(at) AS at FROM recent WHERE account = $1 AND ok)
                 SELECT
                   (SELECT count(*) FROM recent, last_ok WHERE account = $1 AND NOT ok
                      AND (last_ok.at IS NULL OR recent.at > last_ok.at)),
                   (SELECT coalesce(extract(epoch FROM now() - max(at)), 0)::bigint FROM recent WHERE account = $1 AND NOT ok),
                   (SELECT count(*) FROM recent WHERE ip = $2 AND NOT ok)",
                &[&account, &ip, &secs],
            )
            .await
            .map_err(unavailable)?;
        Ok(Failures {
            account: row.get(0),
            account_last_secs: row.get::<_, i64>(1).max(0) as u64,
            ip: row.get(2),
        })
    }
}

async fn revoke_user(tx: &deadpool_postgres::Transaction<'_>, id: &str, why: &str) -> Result<(), DbError> {
    tx.execute(
        "UPDATE staff_sessions SET revoked_at = now(), revoked_why = $2 WHERE user_id = $1 AND revoked_at IS NULL",
        &[&id, &why],
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}
