//! The embedded identity store: one SQLite file (WAL mode), created and migrated on first run. Each
//! login's rule runs in a `BEGIN IMMEDIATE` transaction, so concurrent logins are serialised by SQLite
//! itself and the unique constraints in the migration catch anything else.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::sql::{Embedded, migrator, sql_identity_store, store_error};
use super::{LoginIds, OpenIdLink, Phone, Resolved, StoreError, UserKey, UserRecord};

/// `migrations/sqlite/`, in order. A migration that has landed is never edited: databases hold its
/// checksum.
pub(super) const MIGRATIONS: &[Embedded] = &[
    (
        1,
        "identities",
        include_str!("../../migrations/sqlite/0001_identities.sql"),
    ),
    (
        2,
        "phone",
        include_str!("../../migrations/sqlite/0002_phone.sql"),
    ),
];

/// Identity links in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens the file at `path`, creating it (and its directory) if needed, and applies migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(store_error)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: durable across process crashes; a power cut may lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(store_error)?;
        migrator(MIGRATIONS).run(&pool).await.map_err(store_error)?;
        Ok(SqliteStore { pool })
    }

    /// The pool, for tests and admin queries that read the tables directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A transaction that takes SQLite's write lock up front (`BEGIN IMMEDIATE`): two logins of one
    /// new person cannot both read "unknown" and both create a user.
    async fn begin_login(
        &self,
        _ids: LoginIds<'_>,
    ) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }
}

sql_identity_store!(SqliteStore, Sqlite);

#[cfg(test)]
mod tests {
    // The identity rules themselves are tested against both SQL stores in tests/it/identity_stores.rs.
    use super::*;
    use crate::identity::IdentityStore;
    use crate::identity::sql::existing;

    fn ids<'a>(appid: &'a str, openid: &'a str, unionid: Option<&'a str>) -> LoginIds<'a> {
        LoginIds {
            appid,
            openid,
            unionid,
        }
    }

    #[tokio::test]
    async fn identities_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/ids.db");
        let first = SqliteStore::open(&path)
            .await
            .unwrap()
            .resolve(ids("wxA", "oA", Some("U")))
            .await
            .unwrap();
        let reopened = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            reopened.resolve(ids("wxA", "oA", None)).await.unwrap(),
            existing(first.user_id)
        );
    }
}
