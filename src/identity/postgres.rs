//! Identity links in PostgreSQL, for several wxgate instances sharing one store. The tables, rules
//! and constraints are those of the SQLite store ([`super::sql`]); what differs is how two logins
//! of one person are kept apart: each login's transaction first takes transaction-scoped advisory
//! locks on the person's unionid and (appid, openid), always in the same order, so the instances
//! queue behind each other for that person only. The unique constraints still back the rules up.

use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use super::sql::{Embedded, migrator, sql_identity_store, store_error};
use super::{LoginIds, OpenIdLink, Phone, Resolved, StoreError, UserKey, UserRecord};

/// `migrations/postgres/`, in order. A migration that has landed is never edited: databases hold
/// its checksum.
pub(super) const MIGRATIONS: &[Embedded] = &[(
    1,
    "identities",
    include_str!("../../migrations/postgres/0001_identities.sql"),
)];

/// Connections per instance. Logins hold one for a few statements; returning users need one read.
pub const POOL_SIZE: u32 = 8;
/// How long a login waits for a connection (or for PostgreSQL to answer a connect) before it fails
/// with 503: an unreachable database must not hold logins for sqlx's default 30 s.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Identity links in a PostgreSQL database.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// Checks a `postgres://` URL without connecting, for `wxgate check`. The error never repeats the
/// URL, which may hold a password.
pub fn parse_url(url: &str) -> Result<PgConnectOptions, String> {
    PgConnectOptions::from_str(url).map_err(|e| match e {
        sqlx::Error::Configuration(e) => e.to_string(),
        _ => "is not a valid PostgreSQL URL".to_owned(),
    })
}

impl PostgresStore {
    /// Connects to the database at `url` and applies migrations. Several instances starting at once
    /// is safe: sqlx serialises migrations with an advisory lock.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let options = parse_url(url).map_err(|e| StoreError(e.into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(store_error)?;
        migrator(MIGRATIONS).run(&pool).await.map_err(store_error)?;
        Ok(PostgresStore { pool })
    }

    /// The pool, for tests and admin queries that read the tables directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction holding the person's advisory locks until it ends.
    async fn begin_login(
        &self,
        ids: LoginIds<'_>,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut keys = vec![lock_key(&[
            b"openid",
            ids.appid.as_bytes(),
            ids.openid.as_bytes(),
        ])];
        if let Some(unionid) = ids.unionid {
            keys.push(lock_key(&[b"unionid", unionid.as_bytes()]));
        }
        // One order for everyone: two logins never hold one lock each while waiting for the other's.
        keys.sort_unstable();
        let mut tx = self.pool.begin().await?;
        for key in keys {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }
}

/// A 64-bit advisory lock key for one id: the first 8 bytes of a SHA-256 over its parts, each
/// length-prefixed so that no two different ids can be spelt the same.
fn lock_key(parts: &[&[u8]]) -> i64 {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

sql_identity_store!(PostgresStore, Postgres);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_per_id_and_cannot_be_confused() {
        let a = lock_key(&[b"openid", b"wxA", b"o1"]);
        assert_eq!(a, lock_key(&[b"openid", b"wxA", b"o1"]));
        assert_ne!(a, lock_key(&[b"openid", b"wxA", b"o2"]));
        assert_ne!(
            lock_key(&[b"openid", b"wxA", b"bc"]),
            lock_key(&[b"openid", b"wxAb", b"c"])
        );
        assert_ne!(lock_key(&[b"unionid", b"x"]), lock_key(&[b"openid", b"x"]));
    }

    #[test]
    fn a_bad_url_is_refused_without_repeating_it() {
        let error = parse_url("postgres://user:hunter2@host:notaport/db").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(parse_url("postgres://user:pw@127.0.0.1:5432/db?sslmode=require").is_ok());
    }
}
