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

/// The bits of a table's hash that pick one of several mutexed tables. Neither end of the hash
/// will do: hashbrown places an entry by its low bits and tags it with its top seven, which it
/// compares before the keys. In a table picked by the top bits the entries' tags would differ in
/// only a bit or three, and a lookup would compare keys (a cache miss each) with most of the
/// entries it probes. Bits 32 to 47 are clear of both below 2^32 buckets.
pub(crate) fn shard_bits(hash: u64) -> usize {
    (hash >> 32) as usize & 0xffff
}

/// The longest user_id, openid, unionid or phone number a session holds. WeChat's ids are 28
/// characters and wxgate's own user ids 34; anything near this is not an id.
pub const MAX_ID_LEN: usize = 128;

/// The app a session belongs to: its configured name and its WeChat appid, shared by every session
/// of that app.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SessionApp {
    pub name: Arc<str>,
    pub appid: Box<str>,
}

impl SessionApp {
    pub fn new(name: &str, appid: &str) -> Arc<SessionApp> {
        Arc::new(SessionApp {
            name: Arc::from(name),
            appid: Box::from(appid),
        })
    }
}

/// The people-facing ids of a session, as given to [`Session::new`].
#[derive(Debug, Clone, Copy)]
pub struct SessionIds<'a> {
    pub user_id: &'a str,
    pub openid: &'a str,
    pub unionid: Option<&'a str>,
    /// Verified with `/auth/phone` (or known from the store at login).
    pub phone: Option<&'a str>,
}

/// An id longer than [`MAX_ID_LEN`], or empty: the session is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a session id field is empty or longer than {MAX_ID_LEN} bytes")]
pub struct BadIds;

/// One login's server-side state.
///
/// Laid out for the memory store, which keeps a million of these: the four ids (and, in the memory
/// store, the session_keys of the login) share one allocation, the app is shared by all its sessions,
/// times are seconds in 32 bits (good until 2106), and the used refresh tokens are allocated only
/// once the session has been refreshed. 96 bytes, plus its ids and keys in one allocation.
#[derive(Clone)]
pub struct Session {
    pub sid: SessionId,
    /// Shared with every session of the app.
    app: Arc<SessionApp>,
    /// user_id, openid, unionid, phone, then 16-byte session_keys newest first.
    data: Box<[u8]>,
    /// Where user_id, openid, unionid and phone end in `data` (an absent one is empty).
    ends: [u16; 4],
    created_at: u32,
    expires_at: u32,
    /// Hash of the one refresh token that may be used next.
    pub refresh: RefreshHash,
    /// The refresh tokens already used, to recognise a replay; boxed (a thin pointer) because most
    /// sessions have none.
    used_refresh: Option<Box<UsedRefresh>>,
}

/// The first 16 bytes of the SHA-256 of each of the last [`REMEMBERED_REFRESH_TOKENS`] refresh
/// tokens used, in a ring. 128 bits are plenty to recognise a token presented again (a forger
/// would need a second preimage of them), and keep a much refreshed session at a fixed size
/// instead of a growing vector: 258 bytes in a 320-byte allocation, ~322 bytes more a session as
/// `cargo bench --bench sessions_memory` measures it after 16 refreshes each.
#[derive(Clone)]
struct UsedRefresh {
    hashes: [[u8; 16]; REMEMBERED_REFRESH_TOKENS],
    len: u8,
    next: u8,
}

fn prefix(hash: &RefreshHash) -> [u8; 16] {
    hash[..16].try_into().expect("32-byte hashes")
}

impl UsedRefresh {
    fn remember(&mut self, hash: &RefreshHash) {
        self.hashes[usize::from(self.next)] = prefix(hash);
        self.next = ((usize::from(self.next) + 1) % REMEMBERED_REFRESH_TOKENS) as u8;
        self.len = (usize::from(self.len) + 1).min(REMEMBERED_REFRESH_TOKENS) as u8;
    }
}

fn seconds(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

impl Session {
    /// A new session that lives from `created_at` until `expires_at` (Unix seconds).
    pub fn new(
        sid: SessionId,
        app: Arc<SessionApp>,
        ids: SessionIds<'_>,
        created_at: u64,
        expires_at: u64,
        refresh: RefreshHash,
    ) -> Result<Session, BadIds> {
        let (data, ends) = pack(ids, &[])?;
        Ok(Session {
            sid,
            app,
            data,
            ends,
            created_at: seconds(created_at),
            expires_at: seconds(expires_at),
            refresh,
            used_refresh: None,
        })
    }

    fn text(&self, from: usize, to: u16) -> &str {
        // Written from `&str`s by `pack`, so always UTF-8; ASCII in practice.
        std::str::from_utf8(&self.data[from..usize::from(to)]).unwrap_or_default()
    }

    fn ids(&self) -> SessionIds<'_> {
        SessionIds {
            user_id: self.user_id(),
            openid: self.openid(),
            unionid: self.unionid(),
            phone: self.phone(),
        }
    }

    /// user_id, openid, unionid and phone as bytes (an absent one is empty), for writing them
    /// into a request head without reading them back as text.
    pub fn id_bytes(&self) -> [&[u8]; 4] {
        let [a, b, c, d] = self.ends.map(usize::from);
        [
            &self.data[..a],
            &self.data[a..b],
            &self.data[b..c],
            &self.data[c..d],
        ]
    }

    pub fn user_id(&self) -> &str {
        self.text(0, self.ends[0])
    }

    pub fn openid(&self) -> &str {
        self.text(usize::from(self.ends[0]), self.ends[1])
    }

    pub fn unionid(&self) -> Option<&str> {
        Some(self.text(usize::from(self.ends[1]), self.ends[2])).filter(|u| !u.is_empty())
    }

    pub fn phone(&self) -> Option<&str> {
        Some(self.text(usize::from(self.ends[2]), self.ends[3])).filter(|p| !p.is_empty())
    }

    /// The app's configured name.
    pub fn app(&self) -> &Arc<str> {
        &self.app.name
    }

    pub fn app_ids(&self) -> &Arc<SessionApp> {
        &self.app
    }

    pub fn appid(&self) -> &str {
        &self.app.appid
    }

    /// Unix seconds.
    pub fn created_at(&self) -> u64 {
        u64::from(self.created_at)
    }

    /// Unix seconds; moved forward by every refresh.
    pub fn expires_at(&self) -> u64 {
        u64::from(self.expires_at)
    }

    /// Whether `presented` is one of the last [`REMEMBERED_REFRESH_TOKENS`] refresh tokens used,
    /// compared in constant time.
    pub fn was_used(&self, presented: &RefreshHash) -> bool {
        use subtle::ConstantTimeEq;
        let Some(used) = self.used_refresh.as_deref() else {
            return false;
        };
        let presented = prefix(presented);
        used.hashes[..usize::from(used.len)]
            .iter()
            .fold(subtle::Choice::from(0), |seen, hash| {
                seen | hash.ct_eq(&presented)
            })
            .into()
    }

    /// This session after presenting its current refresh token: `next` is expected from now on, and
    /// the session lives until `expires_at`.
    pub fn rotated(&self, next: RefreshHash, expires_at: u64) -> Session {
        let mut rotated = self.clone();
        rotated
            .used_refresh
            .get_or_insert_with(|| {
                Box::new(UsedRefresh {
                    hashes: [[0; 16]; REMEMBERED_REFRESH_TOKENS],
                    len: 0,
                    next: 0,
                })
            })
            .remember(&self.refresh);
        rotated.refresh = next;
        rotated.expires_at = seconds(expires_at);
        rotated
    }

    /// This session with `change` recorded, and its user replaced by `user_id` when given.
    pub fn changed(
        &self,
        user_id: Option<&str>,
        change: UserChange<'_>,
    ) -> Result<Session, BadIds> {
        let mut ids = self.ids();
        if let Some(user_id) = user_id {
            ids.user_id = user_id;
        }
        ids.unionid = change.unionid.or(ids.unionid);
        ids.phone = change.phone.or(ids.phone);
        let (data, ends) = pack(ids, self.key_bytes())?;
        Ok(Session {
            data,
            ends,
            ..self.clone()
        })
    }

    fn key_bytes(&self) -> &[u8] {
        &self.data[usize::from(self.ends[3])..]
    }

    /// The session_keys this session carries (the memory store keeps a login's keys with its
    /// session), newest first.
    pub(crate) fn session_keys(&self) -> impl Iterator<Item = [u8; 16]> + '_ {
        self.key_bytes()
            .chunks_exact(16)
            .map(|key| key.try_into().expect("16-byte chunks"))
    }

    /// This session carrying `keys` (newest first, at most [`SESSION_KEY_HISTORY`]).
    pub(crate) fn with_session_keys(self, keys: &[[u8; 16]]) -> Session {
        let keys = &keys[..keys.len().min(SESSION_KEY_HISTORY)];
        let mut data = Vec::with_capacity(usize::from(self.ends[3]) + keys.len() * 16);
        data.extend_from_slice(&self.data[..usize::from(self.ends[3])]);
        for key in keys {
            data.extend_from_slice(key);
        }
        Session {
            data: data.into_boxed_slice(),
            ..self
        }
    }
}

/// The ids one after the other, and where each ends; then `keys`.
fn pack(ids: SessionIds<'_>, keys: &[u8]) -> Result<(Box<[u8]>, [u16; 4]), BadIds> {
    let fields = [
        ids.user_id,
        ids.openid,
        ids.unionid.unwrap_or(""),
        ids.phone.unwrap_or(""),
    ];
    if ids.user_id.is_empty()
        || ids.openid.is_empty()
        || fields.iter().any(|f| f.len() > MAX_ID_LEN)
    {
        return Err(BadIds);
    }
    let mut data = Vec::with_capacity(fields.iter().map(|f| f.len()).sum::<usize>() + keys.len());
    let mut ends = [0u16; 4];
    for (end, field) in ends.iter_mut().zip(fields) {
        data.extend_from_slice(field.as_bytes());
        // At most 4 × MAX_ID_LEN bytes in all.
        *end = u16::try_from(data.len()).map_err(|_| BadIds)?;
    }
    data.extend_from_slice(keys);
    Ok((data.into_boxed_slice(), ends))
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user_id", &self.user_id())
            .field("app", self.app())
            .field("expires_at", &self.expires_at())
            .finish_non_exhaustive()
    }
}

/// What to record on the sessions of a user besides its id.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserChange<'a> {
    pub unionid: Option<&'a str>,
    pub phone: Option<&'a str>,
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
    /// Stores a new session. `session_key` is the one WeChat issued at this login (mini programs):
    /// it becomes the newest of the person's session_keys in that app, and the older ones stay, up
    /// to [`SESSION_KEY_HISTORY`].
    async fn insert(
        &self,
        session: Session,
        session_key: Option<&Secret>,
    ) -> Result<(), StoreError>;

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

    /// The session_keys WeChat issued for the session's (appid, openid), newest first: the person's
    /// logins on any device, not only this session's.
    async fn session_keys(&self, session: &Session) -> Result<Vec<Secret>, StoreError>;

    /// Live sessions (approximate), for metrics; `None` when the store cannot count them cheaply.
    fn count(&self) -> Option<u64>;

    /// Drops what expired by `now` (called about once a minute); stores that expire entries by
    /// themselves do nothing.
    fn sweep(&self, _now: u64) {}

    /// Whether the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries one shard gets still differ in the bits hashbrown tags them with (the top
    /// seven: all 128 tags occur) and in the bits that place them (low ones).
    #[test]
    fn a_shard_leaves_the_tag_and_index_bits_free() {
        use std::hash::BuildHasher;
        let hasher = std::hash::RandomState::new();
        let shard: Vec<u64> = (0..200_000u64)
            .map(|i| hasher.hash_one(i))
            .filter(|&h| shard_bits(h).is_multiple_of(64))
            .collect();
        let tags: std::collections::HashSet<u64> = shard.iter().map(|h| h >> 57).collect();
        let places: std::collections::HashSet<u64> = shard.iter().map(|h| h & 0xfff).collect();
        assert_eq!(tags.len(), 128, "{} entries", shard.len());
        assert!(places.len() > 1_500, "{} places", places.len());
    }

    fn ids<'a>(unionid: Option<&'a str>, phone: Option<&'a str>) -> SessionIds<'a> {
        SessionIds {
            user_id: "u_0123456789abcdef0123456789abcdef",
            openid: "oVBkZ0aYgDMDIywRdgPW8-joxXc4",
            unionid,
            phone,
        }
    }

    #[test]
    fn a_session_is_small() {
        // The memory store's budget per session starts here: see benches/sessions_memory.rs.
        assert_eq!(std::mem::size_of::<Session>(), 96);
    }

    #[test]
    fn ids_read_back_as_given_and_changes_keep_the_rest() {
        let app = SessionApp::new("shop", "wx0123456789abcdef");
        let sid = SessionId::random();
        let session = Session::new(sid, app.clone(), ids(None, None), 10, 20, [1; 32]).unwrap();
        assert_eq!(session.user_id(), "u_0123456789abcdef0123456789abcdef");
        assert_eq!(session.openid(), "oVBkZ0aYgDMDIywRdgPW8-joxXc4");
        assert_eq!((session.unionid(), session.phone()), (None, None));
        assert_eq!(
            (&**session.app(), session.appid()),
            ("shop", "wx0123456789abcdef")
        );
        assert_eq!((session.created_at(), session.expires_at()), (10, 20));

        let keyed = session.with_session_keys(&[[7; 16], [8; 16]]);
        let changed = keyed
            .changed(
                Some("u_other"),
                UserChange {
                    unionid: Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"),
                    phone: Some("13580006666"),
                },
            )
            .unwrap();
        assert_eq!(changed.user_id(), "u_other");
        assert_eq!(changed.openid(), "oVBkZ0aYgDMDIywRdgPW8-joxXc4");
        assert_eq!(changed.unionid(), Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"));
        assert_eq!(changed.phone(), Some("13580006666"));
        assert_eq!(
            changed.session_keys().collect::<Vec<_>>(),
            [[7; 16], [8; 16]]
        );
        assert_eq!((changed.sid, changed.refresh), (sid, [1; 32]));
    }

    #[test]
    fn refreshes_are_remembered_up_to_the_limit() {
        let app = SessionApp::new("shop", "wx0123456789abcdef");
        let mut session =
            Session::new(SessionId::random(), app, ids(None, None), 10, 20, [0; 32]).unwrap();
        assert!(
            !session.was_used(&[0; 32]),
            "the current token is not a used one"
        );
        let last = REMEMBERED_REFRESH_TOKENS as u8 + 3;
        for i in 1..=last {
            session = session.rotated([i; 32], 100 + u64::from(i));
        }
        // Tokens 0..=18 were used; the ring remembers the last 16 of them, 3..=18.
        for i in 0..last {
            assert_eq!(session.was_used(&[i; 32]), i >= 3, "token {i}");
        }
        assert!(!session.was_used(&[last; 32]), "the current token");
        assert_eq!(session.refresh, [last; 32]);
        assert_eq!(session.expires_at(), 100 + u64::from(last));
    }

    #[test]
    fn empty_or_huge_ids_make_no_session() {
        let app = SessionApp::new("shop", "wx0123456789abcdef");
        let long = "o".repeat(MAX_ID_LEN + 1);
        for bad in [
            SessionIds {
                user_id: "",
                ..ids(None, None)
            },
            SessionIds {
                openid: "",
                ..ids(None, None)
            },
            SessionIds {
                openid: &long,
                ..ids(None, None)
            },
            ids(Some(&long), None),
        ] {
            assert_eq!(
                Session::new(SessionId::random(), app.clone(), bad, 0, 1, [0; 32]).map(drop),
                Err(BadIds)
            );
        }
        let longest = "o".repeat(MAX_ID_LEN);
        let all = SessionIds {
            user_id: &longest,
            openid: &longest,
            unionid: Some(&longest),
            phone: Some(&longest),
        };
        assert!(Session::new(SessionId::random(), app, all, 0, 1, [0; 32]).is_ok());
    }
}
