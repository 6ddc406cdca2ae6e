//! Who a WeChat user is: the identity rules of DESIGN.md, turning (appid, openid) and unionid into one
//! stable `user_id`. The rules live here; the stores ([`sqlite`], [`postgres`]) only keep links and
//! apply a rule atomically. Nothing here knows about sessions or tokens.

mod cache;
pub mod postgres;
mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::body::BoxError;
use crate::config::{IdentityConfig, IdentityStoreConfig, UserIdMode};

/// The ids one login yields.
#[derive(Debug, Clone, Copy)]
pub struct LoginIds<'a> {
    pub appid: &'a str,
    pub openid: &'a str,
    pub unionid: Option<&'a str>,
}

/// The user a login belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub user_id: String,
    /// A new user was created by this login.
    pub created: bool,
    /// Users merged into `user_id` by this login (rule 4): they were the same person all along.
    pub merged: Vec<String>,
    /// The user's verified phone number, if one was recorded.
    pub phone: Option<String>,
}

/// How an operator names a user.
#[derive(Debug, Clone, Copy)]
pub enum UserKey<'a> {
    UserId(&'a str),
    /// `appid` may be left out: openids differ per app, so one openid names one user.
    OpenId {
        appid: Option<&'a str>,
        openid: &'a str,
    },
    UnionId(&'a str),
}

/// Everything the store knows about a user, for operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserRecord {
    pub user_id: String,
    pub created_at: i64,
    /// Set when this user turned out to be the same person as another: the survivor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    pub openids: Vec<OpenIdLink>,
    /// Users merged into this one.
    pub merged_from: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<Phone>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpenIdLink {
    pub appid: String,
    pub openid: String,
    pub linked_at: i64,
}

/// A phone number WeChat verified for the user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Phone {
    /// With country code, as WeChat gives it, e.g. `+86 13580006666` or `13580006666`.
    pub phone_number: String,
    pub country_code: String,
    pub verified_at: i64,
}

/// A failure of the identity store (unreachable, corrupt, full). Logins fail closed on it.
#[derive(Debug, thiserror::Error)]
#[error("identity store: {0}")]
pub struct StoreError(#[source] pub BoxError);

/// Persistent identity links.
#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    /// Applies identity rules 3, 4 and 6 to one login, atomically:
    ///
    /// - a unionid already linked decides the user; the (appid, openid) is linked to it, and a
    ///   different user that held the openid is merged into it (rule 4);
    /// - else a known (appid, openid) decides the user, and a new unionid is linked to it;
    /// - else a new user is created with both links.
    async fn resolve(&self, ids: LoginIds<'_>) -> Result<Resolved, StoreError>;

    /// The user `key` names (for a merged user: the record that points at its survivor).
    async fn user(&self, key: UserKey<'_>) -> Result<Option<UserRecord>, StoreError>;

    /// Records a verified phone number on the user.
    async fn set_phone(&self, user_id: &str, phone: &Phone) -> Result<(), StoreError>;

    /// Whether the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Why no user could be determined.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `identity.user_id = "unionid"` but this login has no unionid.
    #[error("no unionid for this login")]
    NoUnionid,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The configured way of deriving `user_id`.
#[derive(Clone)]
pub struct Identities {
    mode: UserIdMode,
    /// Present in `internal` mode only: the other modes need no mapping.
    store: Option<Arc<dyn IdentityStore>>,
    /// Returning users' links, when this process is the store's only writer (SQLite).
    cache: Option<Arc<cache::LinkCache>>,
}

impl Identities {
    /// Opens (and, for SQLite, creates and migrates) the configured store.
    pub async fn open(config: &IdentityConfig) -> Result<Identities, StoreError> {
        let single_writer = matches!(config.store, IdentityStoreConfig::Sqlite { .. });
        let store: Option<Arc<dyn IdentityStore>> = match (config.user_id, &config.store) {
            (UserIdMode::Internal, IdentityStoreConfig::Sqlite { path }) => {
                Some(Arc::new(sqlite::SqliteStore::open(path).await?))
            }
            (UserIdMode::Internal, IdentityStoreConfig::Postgres { url }) => {
                Some(Arc::new(postgres::PostgresStore::open(url.expose()).await?))
            }
            (UserIdMode::UnionId | UserIdMode::OpenId, _) => None,
        };
        let cache = (single_writer && store.is_some()).then(|| Arc::new(cache::LinkCache::new()));
        Ok(Identities {
            mode: config.user_id,
            store,
            cache,
        })
    }

    /// Identities over an already opened store, in `internal` mode. `sole_writer`: no other process
    /// changes the store, so returning users' links may be kept in memory.
    pub fn with_store(store: Arc<dyn IdentityStore>, sole_writer: bool) -> Identities {
        Identities {
            mode: UserIdMode::Internal,
            store: Some(store),
            cache: sole_writer.then(|| Arc::new(cache::LinkCache::new())),
        }
    }

    pub async fn resolve(&self, ids: LoginIds<'_>) -> Result<Resolved, IdentityError> {
        let direct = |user_id: &str| Resolved {
            user_id: user_id.to_owned(),
            created: false,
            merged: Vec::new(),
            phone: None,
        };
        match (self.mode, &self.store) {
            (UserIdMode::Internal, Some(store)) => {
                let Some(cache) = &self.cache else {
                    return Ok(store.resolve(ids).await?);
                };
                if let Some(known) = cache.get(ids) {
                    return Ok(known);
                }
                let epoch = cache.epoch();
                let resolved = store.resolve(ids).await?;
                if !resolved.merged.is_empty() {
                    // The merged users' openids now belong to the survivor.
                    self.forget_user(store, cache, &resolved.user_id).await;
                }
                cache.fill(ids, &resolved, epoch);
                Ok(resolved)
            }
            (UserIdMode::Internal, None) => Err(StoreError("no identity store".into()).into()),
            (UserIdMode::UnionId, _) => ids.unionid.map(direct).ok_or(IdentityError::NoUnionid),
            (UserIdMode::OpenId, _) => Ok(direct(ids.openid)),
        }
    }

    /// The user `key` names; `None` also when this mode keeps no store.
    pub async fn user(&self, key: UserKey<'_>) -> Result<Option<UserRecord>, StoreError> {
        match &self.store {
            Some(store) => store.user(key).await,
            None => Ok(None),
        }
    }

    /// Records a verified phone number; a no-op in the modes that keep no store.
    pub async fn set_phone(&self, user_id: &str, phone: &Phone) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let set = store.set_phone(user_id, phone).await;
        if let Some(cache) = &self.cache {
            // Even when the write failed: it may have happened.
            self.forget_user(store, cache, user_id).await;
        }
        set
    }

    /// Drops the cached links of every openid of `user_id`.
    async fn forget_user(
        &self,
        store: &Arc<dyn IdentityStore>,
        cache: &cache::LinkCache,
        user_id: &str,
    ) {
        match store.user(UserKey::UserId(user_id)).await {
            Ok(Some(record)) => cache.drop_links(
                record
                    .openids
                    .iter()
                    .map(|link| (link.appid.as_str(), link.openid.as_str())),
            ),
            Ok(None) | Err(_) => cache.drop_all(),
        }
    }

    /// Whether a store is kept (mode `internal`).
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.ping().await,
            None => Ok(()),
        }
    }
}

/// A new opaque, stable user id: `u_` and 32 hex digits of a time-ordered UUID (v7), so ids sort by
/// creation and index well.
pub fn new_user_id() -> String {
    format!("u_{}", uuid::Uuid::now_v7().simple())
}
