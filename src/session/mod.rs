//! Sessions: what a login leaves on the server (the user, the app, the WeChat ids, the refresh-token
//! state) and the store that keeps them. The session_key is kept per (appid, openid) in a short history,
//! because WeChat rotates it on every login of that user in that app, whatever session asked.
//! The session_key never leaves the server.

pub mod memory;
pub mod redis;
pub mod token;

use std::sync::Arc;

use async_trait::async_trait;

use crate::body::BoxError;
use crate::config::Secret;
pub use token::{RefreshHash, SessionId};

/// How many refresh tokens of a session are remembered after use, to recognise a replay.
pub const REMEMBERED_REFRESH_TOKENS: usize = 16;
/// How many session_keys are kept per (appid, openid), newest first.
pub const SESSION_KEY_HISTORY: usize = 4;

/// One login's server-side state.
#[derive(Clone)]
pub struct Session {
    pub sid: SessionId,
    pub user_id: String,
    /// The app's configured name.
    pub app: Arc<str>,
    pub appid: String,
    pub openid: String,
    pub unionid: Option<String>,
    /// Verified with `/auth/phone` (or known from the store at login).
    pub phone: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; moved forward by every refresh.
    pub expires_at: u64,
    /// Hash of the one refresh token that may be used next.
    pub refresh: RefreshHash,
    /// Hashes of refresh tokens already used, newest last.
    pub used_refresh: Vec<RefreshHash>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user_id", &self.user_id)
            .field("app", &self.app)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What to record on the sessions of a user besides its id.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserChange<'a> {
    pub unionid: Option<&'a str>,
    pub phone: Option<&'a str>,
}

impl UserChange<'_> {
    /// `session` with this change recorded.
    pub fn apply(&self, session: &Session) -> Session {
        let mut changed = session.clone();
        if let Some(unionid) = self.unionid {
            changed.unionid = Some(unionid.to_owned());
        }
        if let Some(phone) = self.phone {
            changed.phone = Some(phone.to_owned());
        }
        changed
    }
}

/// What presenting a refresh token did.
#[derive(Debug)]
pub enum Rotation {
    /// The token was current: the session now expects the next one, and lives until the new expiry.
    Rotated(Arc<Session>),
    /// The token was used before: someone holds a copy. The whole session has been revoked.
    Replayed { user_id: String },
    /// No such session, or the session has expired.
    Unknown,
}

/// A failure of the session store. Requests that need a session fail closed on it.
#[derive(Debug, thiserror::Error)]
#[error("session store: {0}")]
pub struct StoreError(#[source] pub BoxError);

/// Where sessions live.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn insert(&self, session: Session) -> Result<(), StoreError>;

    /// The live session `sid`, if it exists and has not expired at `now`.
    async fn get(&self, sid: &SessionId, now: u64) -> Result<Option<Arc<Session>>, StoreError>;

    /// Atomically checks `presented` against the session's refresh state and rotates it to `next`
    /// (moving the expiry to `expires_at`), or revokes the session on a replay.
    async fn rotate_refresh(
        &self,
        sid: &SessionId,
        presented: &RefreshHash,
        next: RefreshHash,
        now: u64,
        expires_at: u64,
    ) -> Result<Rotation, StoreError>;

    /// Points every session of user `from` at user `into` and records what `change` says: after a
    /// merge, a unionid learned later or a phone verified, the next request of those sessions carries
    /// it. Returns how many sessions changed.
    async fn repoint_user(
        &self,
        from: &str,
        into: &str,
        change: UserChange<'_>,
    ) -> Result<u64, StoreError>;

    /// Records `change` on one session (cheap, unlike [`SessionStore::repoint_user`]); `false` if the
    /// session is gone.
    async fn update_session(
        &self,
        sid: &SessionId,
        change: UserChange<'_>,
    ) -> Result<bool, StoreError>;

    /// Removes the session; `true` if it existed.
    async fn revoke(&self, sid: &SessionId) -> Result<bool, StoreError>;

    /// Records the session_key WeChat issued for (appid, openid) at `at`; older ones stay, up to
    /// [`SESSION_KEY_HISTORY`].
    async fn push_session_key(
        &self,
        appid: &str,
        openid: &str,
        key: Secret,
        at: u64,
    ) -> Result<(), StoreError>;

    /// The session_keys of (appid, openid), newest first.
    async fn session_keys(&self, appid: &str, openid: &str) -> Result<Vec<Secret>, StoreError>;

    /// Live sessions (approximate), for metrics; `None` when the store cannot count them cheaply.
    fn count(&self) -> Option<u64>;

    /// Whether the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
