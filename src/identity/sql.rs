//! The identity rules over SQL, written once for both SQL stores ([`super::sqlite`] and
//! [`super::postgres`]). The statements use `$N` placeholders, which sqlx's SQLite and PostgreSQL
//! drivers both accept, and only types both engines share (TEXT and 64-bit integers). A store brings
//! its pool and says how a login's transaction begins: that is where the engines differ (SQLite takes
//! the database's write lock, PostgreSQL takes advisory locks on the person's ids).
//!
//! A macro rather than generic code: sqlx's generic executor bounds would bury the rules, and the two
//! expansions are the same text over two concrete types.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::{Resolved, StoreError};

/// One migration of a store: its version, description and SQL, as in its file's name
/// (`migrations/<store>/<version>_<description>.sql`) and text.
pub(super) type Embedded = (i64, &'static str, &'static str);

/// A store's migrations, compiled in. `sqlx::migrate!` would read the same files, but the macro
/// builds sqlx's database drivers a second time, for the compiler (with SQLite's C source), which was
/// a large part of a cold build. The migrations are the same: version, description, type and
/// checksum (of the SQL) are what the macro made, and a test holds the checksums to the ones
/// databases migrated by earlier builds already hold.
pub(super) fn migrator(migrations: &[Embedded]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql)| {
                let no_tx = sql.starts_with("-- no-transaction");
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    no_tx,
                )
            })
            .collect(),
    )
}

pub(super) fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError(Box::new(e))
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(super) fn existing(user_id: String) -> Resolved {
    Resolved {
        user_id,
        created: false,
        merged: Vec::new(),
        phone: None,
    }
}

pub(super) fn created(user_id: String) -> Resolved {
    Resolved {
        created: true,
        ..existing(user_id)
    }
}

/// How many times a login's transaction is tried. The locks make a conflict unexpected; a unique
/// constraint, a serialisation failure or a deadlock is answered by trying again from the start,
/// when the other login's links are visible.
pub(super) const ATTEMPTS: usize = 3;

/// Whether `e` is a conflict with a concurrent transaction, worth trying again.
pub(super) fn conflict(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        d.is_unique_violation() || matches!(d.code().as_deref(), Some("40001" | "40P01"))
    })
}

/// Implements [`super::IdentityStore`] for `$store`, a struct with a `pool: sqlx::Pool<$db>` field and
/// an inherent `async fn begin_login(&self, ids: LoginIds<'_>) -> Result<Transaction<'static, $db>,
/// sqlx::Error>` that returns a transaction no other login of the same person can run beside.
macro_rules! sql_identity_store {
    ($store:ty, $db:ty) => {
        type Conn = <$db as sqlx::Database>::Connection;

        async fn unionid_of_user(
            conn: &mut Conn,
            user_id: &str,
        ) -> Result<Option<String>, sqlx::Error> {
            sqlx::query_scalar("SELECT unionid FROM unionids WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(conn)
                .await
        }

        async fn insert_user(conn: &mut Conn, user_id: &str, now: i64) -> Result<(), sqlx::Error> {
            sqlx::query("INSERT INTO users (user_id, created_at) VALUES ($1, $2)")
                .bind(user_id)
                .bind(now)
                .execute(conn)
                .await
                .map(drop)
        }

        async fn link_openid(
            conn: &mut Conn,
            ids: LoginIds<'_>,
            user_id: &str,
            now: i64,
        ) -> Result<(), sqlx::Error> {
            sqlx::query(
                "INSERT INTO app_openids (appid, openid, user_id, linked_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(ids.appid)
            .bind(ids.openid)
            .bind(user_id)
            .bind(now)
            .execute(conn)
            .await
            .map(drop)
        }

        async fn link_unionid(
            conn: &mut Conn,
            unionid: &str,
            user_id: &str,
            now: i64,
        ) -> Result<(), sqlx::Error> {
            sqlx::query("INSERT INTO unionids (unionid, user_id, linked_at) VALUES ($1, $2, $3)")
                .bind(unionid)
                .bind(user_id)
                .bind(now)
                .execute(conn)
                .await
                .map(drop)
        }

        /// Rule 4: `from` is the same person as `into`. Every openid link of `from` moves to `into`,
        /// and `from` stays as a record that points at its survivor. No link is dropped.
        async fn merge(conn: &mut Conn, from: &str, into: &str, now: i64) -> Result<(), sqlx::Error> {
            sqlx::query("UPDATE app_openids SET user_id = $1, linked_at = $2 WHERE user_id = $3")
                .bind(into)
                .bind(now)
                .bind(from)
                .execute(&mut *conn)
                .await?;
            sqlx::query("UPDATE users SET merged_into = $1, merged_at = $2 WHERE user_id = $3")
                .bind(into)
                .bind(now)
                .bind(from)
                .execute(&mut *conn)
                .await?;
            // Earlier merges into `from` now point at the survivor too, so every chain is one step.
            sqlx::query("UPDATE users SET merged_into = $1 WHERE merged_into = $2")
                .bind(into)
                .bind(from)
                .execute(conn)
                .await
                .map(drop)
        }

        /// Rules 3, 4 and 6 inside the login's transaction.
        async fn apply_rules(
            conn: &mut Conn,
            ids: LoginIds<'_>,
            now: i64,
        ) -> Result<Resolved, sqlx::Error> {
            use $crate::identity::sql::{created, existing};
            // Both holders in one statement (without a unionid, `unionid = NULL` matches nothing):
            // on SQLite each statement is a hand-off to the connection's thread, and a new
            // person's transaction is made of little else.
            let (by_unionid, by_openid): (Option<String>, Option<String>) = sqlx::query_as(
                "SELECT (SELECT user_id FROM unionids WHERE unionid = $1), \
                        (SELECT user_id FROM app_openids WHERE appid = $2 AND openid = $3)",
            )
            .bind(ids.unionid)
            .bind(ids.appid)
            .bind(ids.openid)
            .fetch_one(&mut *conn)
            .await?;
            let resolved = match (ids.unionid, by_unionid, by_openid) {
                (Some(_), Some(user), Some(holder)) if user == holder => existing(user),
                (Some(_), Some(user), Some(holder)) => {
                    merge(conn, &holder, &user, now).await?;
                    Resolved {
                        user_id: user,
                        created: false,
                        merged: vec![holder],
                        phone: None,
                    }
                }
                (Some(_), Some(user), None) => {
                    link_openid(conn, ids, &user, now).await?;
                    existing(user)
                }
                (Some(unionid), None, Some(holder)) => {
                    match unionid_of_user(conn, &holder).await? {
                        None => link_unionid(conn, unionid, &holder, now).await?,
                        Some(_other) => {
                            // One openid cannot belong to two unionids; WeChat never does this. Keep
                            // the existing links rather than guess, and say so loudly.
                            tracing::error!(
                                user_id = %holder,
                                "an openid already linked to one unionid arrived with another; links left unchanged"
                            );
                        }
                    }
                    existing(holder)
                }
                (Some(unionid), None, None) => {
                    let user = $crate::identity::new_user_id();
                    insert_user(conn, &user, now).await?;
                    link_openid(conn, ids, &user, now).await?;
                    link_unionid(conn, unionid, &user, now).await?;
                    created(user)
                }
                (None, _, Some(holder)) => existing(holder),
                (None, _, None) => {
                    let user = $crate::identity::new_user_id();
                    insert_user(conn, &user, now).await?;
                    link_openid(conn, ids, &user, now).await?;
                    created(user)
                }
            };
            if resolved.created {
                // A user made a moment ago has no phone number yet.
                return Ok(resolved);
            }
            let phone: Option<String> =
                sqlx::query_scalar("SELECT phone FROM users WHERE user_id = $1")
                    .bind(&resolved.user_id)
                    .fetch_one(conn)
                    .await?;
            Ok(Resolved { phone, ..resolved })
        }

        #[async_trait::async_trait]
        impl $crate::identity::IdentityStore for $store {
            async fn resolve(&self, ids: LoginIds<'_>) -> Result<Resolved, StoreError> {
                use $crate::identity::sql::{ATTEMPTS, conflict, existing, store_error, unix_now};
                // Most logins are returning users whose links are all in place: answer them with
                // one read and no lock.
                let (by_openid, by_unionid, phone): (
                    Option<String>,
                    Option<String>,
                    Option<String>,
                ) = sqlx::query_as(
                    "SELECT o.user_id, (SELECT user_id FROM unionids WHERE unionid = $1), u.phone \
                     FROM (SELECT 1) AS one \
                     LEFT JOIN app_openids o ON o.appid = $2 AND o.openid = $3 \
                     LEFT JOIN users u ON u.user_id = o.user_id",
                )
                .bind(ids.unionid)
                .bind(ids.appid)
                .bind(ids.openid)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
                match (ids.unionid, by_openid, by_unionid) {
                    (None, Some(user), _) => return Ok(Resolved { phone, ..existing(user) }),
                    (Some(_), Some(user), Some(same)) if user == same => {
                        return Ok(Resolved { phone, ..existing(user) });
                    }
                    _ => {}
                }
                let mut attempt = 1;
                loop {
                    let outcome = async {
                        let mut tx = self.begin_login(ids).await?;
                        let resolved = apply_rules(&mut *tx, ids, unix_now()).await?;
                        tx.commit().await?;
                        Ok::<_, sqlx::Error>(resolved)
                    }
                    .await;
                    match outcome {
                        Err(e) if attempt < ATTEMPTS && conflict(&e) => {
                            tracing::warn!(attempt, "identity store: a login conflicted with a concurrent one; trying again");
                            attempt += 1;
                        }
                        outcome => return outcome.map_err(store_error),
                    }
                }
            }

            async fn user(&self, key: UserKey<'_>) -> Result<Option<UserRecord>, StoreError> {
                use $crate::identity::sql::store_error;
                let user_id: Option<String> = match key {
                    UserKey::UserId(id) => {
                        sqlx::query_scalar("SELECT user_id FROM users WHERE user_id = $1").bind(id)
                    }
                    UserKey::OpenId {
                        appid: Some(appid),
                        openid,
                    } => sqlx::query_scalar(
                        "SELECT user_id FROM app_openids WHERE appid = $1 AND openid = $2",
                    )
                    .bind(appid)
                    .bind(openid),
                    UserKey::OpenId {
                        appid: None,
                        openid,
                    } => sqlx::query_scalar(
                        "SELECT user_id FROM app_openids WHERE openid = $1 ORDER BY appid LIMIT 1",
                    )
                    .bind(openid),
                    UserKey::UnionId(unionid) => {
                        sqlx::query_scalar("SELECT user_id FROM unionids WHERE unionid = $1")
                            .bind(unionid)
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
                let (created_at, merged_into, merged_at, phone, country_code, verified_at): UserRow =
                    sqlx::query_as(
                        "SELECT created_at, merged_into, merged_at, phone, phone_country_code, \
                         phone_verified_at FROM users WHERE user_id = $1",
                    )
                    .bind(&user_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(store_error)?;
                let unionid: Option<String> =
                    sqlx::query_scalar("SELECT unionid FROM unionids WHERE user_id = $1")
                        .bind(&user_id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(store_error)?;
                let openids: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT appid, openid, linked_at FROM app_openids WHERE user_id = $1 \
                     ORDER BY appid, openid",
                )
                .bind(&user_id)
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                let merged_from: Vec<String> = sqlx::query_scalar(
                    "SELECT user_id FROM users WHERE merged_into = $1 ORDER BY merged_at, user_id",
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
                sqlx::query(
                    "UPDATE users SET phone = $1, phone_country_code = $2, phone_verified_at = $3 \
                     WHERE user_id = $4",
                )
                .bind(&phone.phone_number)
                .bind(&phone.country_code)
                .bind(phone.verified_at)
                .bind(user_id)
                .execute(&self.pool)
                .await
                .map(drop)
                .map_err($crate::identity::sql::store_error)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err($crate::identity::sql::store_error)
            }
        }
    };
}

pub(super) use sql_identity_store;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each store's list is its directory: every file, in order, with the version and description
    /// its name gives and its text as it is. A migration added to the directory but not to the list
    /// (or the other way round) fails here, not in production.
    #[test]
    fn the_embedded_migrations_are_the_directorys_files() {
        for (store, embedded) in [
            ("sqlite", super::super::sqlite::MIGRATIONS),
            ("postgres", super::super::postgres::MIGRATIONS),
        ] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(store);
            let mut files: Vec<(i64, String, String)> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|entry| {
                    let path = entry.unwrap().path();
                    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                    let stem = name.strip_suffix(".sql").expect("only .sql files");
                    let (version, description) = stem.split_once('_').unwrap();
                    let text = std::fs::read_to_string(&path).unwrap();
                    (
                        version.parse().unwrap(),
                        description.replace('_', " "),
                        text,
                    )
                })
                .collect();
            files.sort();
            let listed: Vec<(i64, String, String)> = embedded
                .iter()
                .map(|&(v, d, sql)| (v, d.to_owned(), sql.to_owned()))
                .collect();
            assert_eq!(listed, files, "migrations/{store}");
        }
    }

    /// Databases migrated by earlier builds (through `sqlx::migrate!`) hold these rows; a
    /// checksum that differs makes sqlx refuse to start on them. Recorded from the macro's
    /// migrators, so the embedded ones must match them exactly.
    #[test]
    fn the_migrations_are_those_existing_databases_hold() {
        let rows = |migrator: Migrator| -> Vec<(i64, String, bool, bool, String)> {
            migrator
                .iter()
                .map(|m| {
                    let simple = matches!(m.migration_type, MigrationType::Simple);
                    (
                        m.version,
                        m.description.to_string(),
                        simple,
                        m.no_tx,
                        hex::encode(&m.checksum),
                    )
                })
                .collect()
        };
        let row = |version, description: &str, checksum: &str| {
            (
                version,
                description.to_owned(),
                true,
                false,
                checksum.to_owned(),
            )
        };
        assert_eq!(
            rows(migrator(super::super::sqlite::MIGRATIONS)),
            [
                row(
                    1,
                    "identities",
                    "74d65569bd12e670c18ab47941d78fe1b7cb01102b6f3e88af7fb5a3bcd189b450c4606878365b25e50615249d3a87b9"
                ),
                row(
                    2,
                    "phone",
                    "56fbe9acd3f2f7c861f373462a5a2e223f9e5d4d38f8a79f99680f6067aaea47efe2c0832cf5b8afdc69e55a1d468121"
                ),
            ]
        );
        assert_eq!(
            rows(migrator(super::super::postgres::MIGRATIONS)),
            [row(
                1,
                "identities",
                "dcbef3cf6622803ab0a28f87b43845255931c43b55ed0e9c2b2e3e6437d8009ef5e504025befd08ec6de110e0ef296fe"
            )]
        );
    }
}
