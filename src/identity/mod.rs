//! Who a WeChat user is: the identity rules of DESIGN.md, turning (appid, openid) and unionid into one
//! stable `user_id`. The rules live here; the stores ([`sqlite`]) only keep links and apply a rule
//! atomically. Nothing here knows about sessions or tokens.

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
}

impl Identities {
    /// Opens (and, for SQLite, creates and migrates) the configured store.
    pub async fn open(config: &IdentityConfig) -> Result<Identities, StoreError> {
        let store: Option<Arc<dyn IdentityStore>> = match (config.user_id, &config.store) {
            (UserIdMode::Internal, IdentityStoreConfig::Sqlite { path }) => {
                Some(Arc::new(sqlite::SqliteStore::open(path).await?))
            }
            (UserIdMode::Internal, IdentityStoreConfig::Postgres { .. }) => {
                return Err(StoreError(
                    "identity.store: PostgreSQL is not supported by this build yet; use sqlite://PATH".into(),
                ));
            }
            (UserIdMode::UnionId | UserIdMode::OpenId, _) => None,
        };
        Ok(Identities {
            mode: config.user_id,
            store,
        })
    }

    /// Identities over an already opened store, in `internal` mode.
    pub fn with_store(store: Arc<dyn IdentityStore>) -> Identities {
        Identities {
            mode: UserIdMode::Internal,
            store: Some(store),
        }
    }

    pub async fn resolve(&self, ids: LoginIds<'_>) -> Result<Resolved, IdentityError> {
        let direct = |user_id: &str| Resolved {
            user_id: user_id.to_owned(),
            created: false,
            merged: Vec::new(),
        };
        match (self.mode, &self.store) {
            (UserIdMode::Internal, Some(store)) => Ok(store.resolve(ids).await?),
            (UserIdMode::Internal, None) => Err(StoreError("no identity store".into()).into()),
            (UserIdMode::UnionId, _) => ids.unionid.map(direct).ok_or(IdentityError::NoUnionid),
            (UserIdMode::OpenId, _) => Ok(direct(ids.openid)),
        }
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
