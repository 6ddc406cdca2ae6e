//! The embedded identity store: one SQLite file (WAL mode), created and migrated on first run. Each
//! login's rule runs in a `BEGIN IMMEDIATE` transaction, so concurrent logins are serialised by SQLite
//! itself and the unique constraints in the migration catch anything else.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::{
    IdentityStore, LoginIds, OpenIdLink, Phone, Resolved, StoreError, UserKey, UserRecord,
    new_user_id,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Identity links in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError(Box::new(e))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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
        MIGRATOR.run(&pool).await.map_err(store_error)?;
        Ok(SqliteStore { pool })
    }

    /// The pool, for tests and admin queries that read the tables directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

async fn user_of_unionid(
    tx: &mut Transaction<'_, Sqlite>,
    unionid: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM unionids WHERE unionid = ?")
        .bind(unionid)
        .fetch_optional(&mut **tx)
        .await
}

async fn user_of_openid(
    tx: &mut Transaction<'_, Sqlite>,
    appid: &str,
    openid: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM app_openids WHERE appid = ? AND openid = ?")
        .bind(appid)
        .bind(openid)
        .fetch_optional(&mut **tx)
        .await
}

async fn unionid_of_user(
    tx: &mut Transaction<'_, Sqlite>,
    user_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT unionid FROM unionids WHERE user_id = ?")
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await
}

async fn insert_user(
    tx: &mut Transaction<'_, Sqlite>,
    user_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO users (user_id, created_at) VALUES (?, ?)")
        .bind(user_id)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map(drop)
}

async fn link_openid(
    tx: &mut Transaction<'_, Sqlite>,
    ids: LoginIds<'_>,
    user_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO app_openids (appid, openid, user_id, linked_at) VALUES (?, ?, ?, ?)")
        .bind(ids.appid)
        .bind(ids.openid)
        .bind(user_id)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map(drop)
}

async fn link_unionid(
    tx: &mut Transaction<'_, Sqlite>,
    unionid: &str,
    user_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO unionids (unionid, user_id, linked_at) VALUES (?, ?, ?)")
        .bind(unionid)
        .bind(user_id)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map(drop)
}

/// Rule 4: `from` is the same person as `into`. Every openid link of `from` moves to `into`, and
/// `from` stays as a record that points at its survivor. No link is dropped.
async fn merge(
    tx: &mut Transaction<'_, Sqlite>,
    from: &str,
    into: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE app_openids SET user_id = ?, linked_at = ? WHERE user_id = ?")
        .bind(into)
        .bind(now)
        .bind(from)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE users SET merged_into = ?, merged_at = ? WHERE user_id = ?")
        .bind(into)
        .bind(now)
        .bind(from)
        .execute(&mut **tx)
        .await?;
    // Earlier merges into `from` now point at the survivor too, so every chain is one step long.
    sqlx::query("UPDATE users SET merged_into = ? WHERE merged_into = ?")
        .bind(into)
        .bind(from)
        .execute(&mut **tx)
        .await
        .map(drop)
}

#[async_trait]
impl IdentityStore for SqliteStore {
    async fn resolve(&self, ids: LoginIds<'_>) -> Result<Resolved, StoreError> {
        // Most logins are returning users whose links are all in place: answer them with one read and
        // no write lock.
        let (by_openid, by_unionid, phone): (Option<String>, Option<String>, Option<String>) =
            sqlx::query_as(
                "SELECT o.user_id, (SELECT user_id FROM unionids WHERE unionid = ?), u.phone \
             FROM (SELECT 1) LEFT JOIN app_openids o ON o.appid = ? AND o.openid = ? \
             LEFT JOIN users u ON u.user_id = o.user_id",
            )
            .bind(ids.unionid)
            .bind(ids.appid)
            .bind(ids.openid)
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        match (ids.unionid, by_openid, by_unionid) {
            (None, Some(user), _) => {
                return Ok(Resolved {
                    phone,
                    ..existing(user)
                });
            }
            (Some(_), Some(user), Some(same)) if user == same => {
                return Ok(Resolved {
                    phone,
                    ..existing(user)
                });
            }
            _ => {}
        }
        let now = unix_now();
        // IMMEDIATE takes the write lock up front: two logins of one new person cannot both read
        // "unknown" and both create a user.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        let by_unionid = match ids.unionid {
            Some(unionid) => user_of_unionid(&mut tx, unionid)
                .await
                .map_err(store_error)?,
            None => None,
        };
        let by_openid = user_of_openid(&mut tx, ids.appid, ids.openid)
            .await
            .map_err(store_error)?;
        let resolved = match (ids.unionid, by_unionid, by_openid) {
            (Some(_), Some(user), Some(holder)) if user == holder => existing(user),
            (Some(_), Some(user), Some(holder)) => {
                merge(&mut tx, &holder, &user, now)
                    .await
                    .map_err(store_error)?;
                Resolved {
                    user_id: user,
                    created: false,
                    merged: vec![holder],
                    phone: None,
                }
            }
            (Some(_), Some(user), None) => {
                link_openid(&mut tx, ids, &user, now)
                    .await
                    .map_err(store_error)?;
                existing(user)
            }
            (Some(unionid), None, Some(holder)) => {
                match unionid_of_user(&mut tx, &holder)
                    .await
                    .map_err(store_error)?
                {
                    None => link_unionid(&mut tx, unionid, &holder, now)
                        .await
                        .map_err(store_error)?,
                    Some(_other) => {
                        // One openid cannot belong to two unionids; WeChat never does this. Keep the
                        // existing links rather than guess, and say so loudly.
                        tracing::error!(
                            user_id = %holder,
                            "an openid already linked to one unionid arrived with another; links left unchanged"
                        );
                    }
                }
                existing(holder)
            }
            (Some(unionid), None, None) => {
                let user = new_user_id();
                insert_user(&mut tx, &user, now)
                    .await
                    .map_err(store_error)?;
                link_openid(&mut tx, ids, &user, now)
                    .await
                    .map_err(store_error)?;
                link_unionid(&mut tx, unionid, &user, now)
                    .await
                    .map_err(store_error)?;
                created(user)
            }
            (None, _, Some(holder)) => existing(holder),
            (None, _, None) => {
                let user = new_user_id();
                insert_user(&mut tx, &user, now)
                    .await
                    .map_err(store_error)?;
                link_openid(&mut tx, ids, &user, now)
                    .await
                    .map_err(store_error)?;
                created(user)
            }
        };
        let phone: Option<String> = sqlx::query_scalar("SELECT phone FROM users WHERE user_id = ?")
            .bind(&resolved.user_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(Resolved { phone, ..resolved })
    }

    async fn user(&self, key: UserKey<'_>) -> Result<Option<UserRecord>, StoreError> {
        let user_id: Option<String> = match key {
            UserKey::UserId(id) => {
                sqlx::query_scalar("SELECT user_id FROM users WHERE user_id = ?").bind(id)
            }
            UserKey::OpenId {
                appid: Some(appid),
                openid,
            } => {
                sqlx::query_scalar("SELECT user_id FROM app_openids WHERE appid = ? AND openid = ?")
                    .bind(appid)
                    .bind(openid)
            }
            UserKey::OpenId {
                appid: None,
                openid,
            } => sqlx::query_scalar("SELECT user_id FROM app_openids WHERE openid = ? LIMIT 1")
                .bind(openid),
            UserKey::UnionId(unionid) => {
                sqlx::query_scalar("SELECT user_id FROM unionids WHERE unionid = ?").bind(unionid)
            }
        }
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        let Some(user_id) = user_id else {
            return Ok(None);
        };
        type UserRow = (
            i64,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let (created_at, merged_into, merged_at, phone, country_code, verified_at): UserRow = sqlx::query_as(
            "SELECT created_at, merged_into, merged_at, phone, phone_country_code, phone_verified_at \
             FROM users WHERE user_id = ?",
        )
        .bind(&user_id)
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        let unionid: Option<String> =
            sqlx::query_scalar("SELECT unionid FROM unionids WHERE user_id = ?")
                .bind(&user_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        let openids: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT appid, openid, linked_at FROM app_openids WHERE user_id = ? ORDER BY appid, openid",
        )
        .bind(&user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        let merged_from: Vec<String> = sqlx::query_scalar(
            "SELECT user_id FROM users WHERE merged_into = ? ORDER BY merged_at, user_id",
        )
        .bind(&user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        let phone = match (phone, country_code, verified_at) {
            (Some(phone_number), country_code, Some(verified_at)) => Some(Phone {
                phone_number,
                country_code: country_code.unwrap_or_default(),
                verified_at,
            }),
            _ => None,
        };
        Ok(Some(UserRecord {
            user_id,
            created_at,
            merged_into,
            merged_at,
            unionid,
            openids: openids
                .into_iter()
                .map(|(appid, openid, linked_at)| OpenIdLink {
                    appid,
                    openid,
                    linked_at,
                })
                .collect(),
            merged_from,
            phone,
        }))
    }

    async fn set_phone(&self, user_id: &str, phone: &Phone) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET phone = ?, phone_country_code = ?, phone_verified_at = ? WHERE user_id = ?")
            .bind(&phone.phone_number)
            .bind(&phone.country_code)
            .bind(phone.verified_at)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(store_error)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(store_error)
    }
}

fn existing(user_id: String) -> Resolved {
    Resolved {
        user_id,
        created: false,
        merged: Vec::new(),
        phone: None,
    }
}

fn created(user_id: String) -> Resolved {
    Resolved {
        created: true,
        ..existing(user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ids.db")).await.unwrap();
        (store, dir)
    }

    fn ids<'a>(appid: &'a str, openid: &'a str, unionid: Option<&'a str>) -> LoginIds<'a> {
        LoginIds {
            appid,
            openid,
            unionid,
        }
    }

    #[tokio::test]
    async fn the_same_person_across_apps_is_one_user() {
        let (store, _dir) = store().await;
        let first = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert!(first.created);
        let again = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert_eq!(again, existing(first.user_id.clone()));
        let other_app = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_eq!(other_app, existing(first.user_id.clone()));
        let someone_else = store.resolve(ids("wxA", "oC", Some("V"))).await.unwrap();
        assert!(someone_else.created && someone_else.user_id != first.user_id);
    }

    #[tokio::test]
    async fn a_unionid_learned_later_is_linked_not_a_new_user() {
        let (store, _dir) = store().await;
        let first = store.resolve(ids("wxA", "oA", None)).await.unwrap();
        let later = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert_eq!(later, existing(first.user_id.clone()));
        let app = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_eq!(app.user_id, first.user_id);
    }

    #[tokio::test]
    async fn an_openid_only_user_is_merged_into_the_unionid_user() {
        let (store, _dir) = store().await;
        let orphan = store.resolve(ids("wxA", "oA", None)).await.unwrap();
        let person = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_ne!(orphan.user_id, person.user_id);
        let merged = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert_eq!(merged.user_id, person.user_id);
        assert_eq!(merged.merged, std::slice::from_ref(&orphan.user_id));
        // The openid now resolves to the survivor even without the unionid, and the old user is kept.
        assert_eq!(
            store.resolve(ids("wxA", "oA", None)).await.unwrap().user_id,
            person.user_id
        );
        let into: Option<String> =
            sqlx::query_scalar("SELECT merged_into FROM users WHERE user_id = ?")
                .bind(&orphan.user_id)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(into, Some(person.user_id));
    }

    #[tokio::test]
    async fn concurrent_first_logins_of_one_person_make_one_user() {
        let (store, _dir) = store().await;
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let appid = if i % 2 == 0 { "wxA" } else { "wxB" };
                    let openid = if i % 2 == 0 { "oA" } else { "oB" };
                    store
                        .resolve(ids(appid, openid, Some("U")))
                        .await
                        .unwrap()
                        .user_id
                })
            })
            .collect();
        let mut users = Vec::new();
        for task in tasks {
            users.push(task.await.unwrap());
        }
        users.dedup();
        assert_eq!(users.len(), 1, "{users:?}");
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(count, 1);
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
