//! The in-memory session store for a single node, built to hold a million sessions in a few hundred
//! megabytes and answer a lookup in well under a microsecond.
//!
//! Sessions live in 64 shards, each a dense `Vec<Arc<Session>>` with a `hashbrown` table of
//! positions into it and, beside it, a column of the sessions' expiry times: the table's buckets
//! are 4 bytes and so are the times, so the store adds about 25 bytes to each session's own ~200.
//! Eviction and the sweep read only the column, so neither follows a pointer to a session it does
//! not remove: with a million sessions, each such pointer is a miss in every cache.
//!
//! The position table is keyed by the session id's first eight bytes as they are: ids are 128
//! random bits minted here, so they are already uniformly spread, and a client can choose only the
//! id it looks up, never the ids that are stored (lookups of chosen ids cost one probe sequence
//! each; the table's layout stays random).
//!
//! A login's session_keys are kept with its session, and a second table points at the latest session
//! of each (app, openid): that session's keys are the person's current ones in that app (WeChat
//! issues one at each login, and the previous ones go on working for a short while). A new login
//! starts its key list from them.
//!
//! Sessions expire by time: a lookup refuses an expired session, and [`MemoryStore::sweep`] (once a
//! minute) removes them. When `max_sessions` is reached, a new session replaces the one nearest its
//! expiry among a few sampled in its shard, i.e. one of the least recently refreshed; its user logs
//! in again, silently, through the SDK.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use hashbrown::HashTable;
use smallvec::SmallVec;
use subtle::ConstantTimeEq;

use super::{
    RefreshHash, Rotation, SESSION_KEY_HISTORY, Session, SessionId, SessionStore, StoreError,
    UserChange,
};
use crate::config::Secret;

const SHARDS: usize = 64;
/// Sessions sampled for eviction when a shard is full.
const EVICTION_SAMPLE: usize = 8;

/// Sessions in process memory.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// The latest session of each (app, openid), for its session_keys.
    latest: Box<[Mutex<HashTable<Arc<Session>>>]>,
    /// Hashes (appid, openid) for `latest`; keyed at random, because clients choose openids no more
    /// than WeChat lets them, but nothing should depend on that.
    hasher: std::collections::hash_map::RandomState,
    per_shard: usize,
    live: AtomicU64,
}

#[derive(Default)]
struct Shard {
    /// Positions in `entries`, hashed by [`sid_hash`].
    index: HashTable<u32>,
    entries: Vec<Arc<Session>>,
    /// `entries[i].expires_at`, at the same positions: changed only with `entries`, by the methods
    /// below.
    expiry: Vec<u32>,
}

fn sid_hash(sid: &SessionId) -> u64 {
    u64::from_le_bytes(sid.0[..8].try_into().expect("16-byte ids"))
}

fn shard_of(sid: &SessionId) -> usize {
    usize::from(sid.0[15]) % SHARDS
}

impl Shard {
    fn position(&self, sid: &SessionId) -> Option<usize> {
        self.index
            .find(sid_hash(sid), |&i| self.entries[i as usize].sid == *sid)
            .map(|&i| i as usize)
    }

    fn get(&self, sid: &SessionId) -> Option<&Arc<Session>> {
        self.position(sid).map(|i| &self.entries[i])
    }

    /// Adds `session`, or replaces the one with its id.
    fn put(&mut self, session: Arc<Session>) {
        if let Some(i) = self.position(&session.sid) {
            self.replace_at(i, session);
            return;
        }
        let hash = sid_hash(&session.sid);
        let position = u32::try_from(self.entries.len()).expect("fewer than 2^32 sessions a shard");
        self.expiry.push(session.expires_at);
        self.entries.push(session);
        let entries = &self.entries;
        self.index
            .insert_unique(hash, position, |&i| sid_hash(&entries[i as usize].sid));
    }

    /// Puts `session` at `position`, in place of the session with its id.
    fn replace_at(&mut self, position: usize, session: Arc<Session>) {
        self.expiry[position] = session.expires_at;
        self.entries[position] = session;
    }

    /// Removes the session at `position`; the last one takes its place.
    fn remove_at(&mut self, position: usize) -> Arc<Session> {
        let last = self.entries.len() - 1;
        let sid = self.entries[position].sid;
        if let Ok(bucket) = self
            .index
            .find_entry(sid_hash(&sid), |&i| i as usize == position)
        {
            bucket.remove();
        }
        if position != last {
            let moved = self.entries[last].sid;
            if let Some(bucket) = self
                .index
                .find_mut(sid_hash(&moved), |&i| i as usize == last)
            {
                *bucket = position as u32;
            }
        }
        self.expiry.swap_remove(position);
        self.entries.swap_remove(position)
    }

    fn remove(&mut self, sid: &SessionId) -> Option<Arc<Session>> {
        let position = self.position(sid)?;
        Some(self.remove_at(position))
    }

    /// Makes room by removing the sampled session nearest its expiry. `seed` picks the sample.
    fn evict_one(&mut self, seed: u64) -> Arc<Session> {
        let victim = sample(seed, self.expiry.len())
            .min_by_key(|&i| self.expiry[i])
            .expect("a non-empty sample");
        self.remove_at(victim)
    }
}

/// The positions, among `len`, that `seed` picks for an eviction.
fn sample(seed: u64, len: usize) -> impl Iterator<Item = usize> {
    (0..EVICTION_SAMPLE as u32).map(move |k| {
        (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(k * 8) % len as u64) as usize
    })
}

fn same(a: &RefreshHash, b: &RefreshHash) -> bool {
    a.ct_eq(b).into()
}

fn key_text(key: &[u8; 16]) -> Secret {
    use base64::Engine;
    Secret::new(base64::engine::general_purpose::STANDARD.encode(key))
}

impl MemoryStore {
    /// A store holding at most about `max_sessions` sessions.
    pub fn new(max_sessions: u64) -> Self {
        let per_shard = usize::try_from(max_sessions.div_ceil(SHARDS as u64))
            .unwrap_or(usize::MAX)
            .max(1);
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            latest: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            per_shard,
            live: AtomicU64::new(0),
        }
    }

    fn shard(&self, sid: &SessionId) -> MutexGuard<'_, Shard> {
        // A panic while a shard is locked leaves its data consistent (every change is one call on a
        // `Vec` and a table that cannot observe half of it), so a poisoned lock is used as it is.
        self.shards[shard_of(sid)]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn latest_hash(&self, appid: &str, openid: &str) -> u64 {
        self.hasher.hash_one((appid, openid))
    }

    fn latest_shard(&self, hash: u64) -> MutexGuard<'_, HashTable<Arc<Session>>> {
        self.latest[super::shard_bits(hash) % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The latest session of the person of `session` in its app.
    fn latest_of(&self, session: &Session) -> Option<Arc<Session>> {
        let hash = self.latest_hash(session.appid(), session.openid());
        self.latest_shard(hash)
            .find(hash, |s| same_person(s, session))
            .cloned()
    }

    /// Where `old` was the latest session of its person, `new` is now (after a change to it), so
    /// that the table does not keep the old copy alive.
    fn replace_latest(&self, old: &Arc<Session>, new: &Arc<Session>) {
        let hash = self.latest_hash(old.appid(), old.openid());
        if let Some(latest) = self
            .latest_shard(hash)
            .find_mut(hash, |s| Arc::ptr_eq(s, old))
        {
            *latest = new.clone();
        }
    }

    /// Replaces the session `sid` by what `change` makes of it, in one step under its shard's lock.
    /// Returns the old and the new session, or `None` when `change` declines (or there is none).
    fn change(
        &self,
        sid: &SessionId,
        change: impl FnOnce(&Arc<Session>) -> Option<Session>,
    ) -> Option<(Arc<Session>, Arc<Session>)> {
        let mut shard = self.shard(sid);
        let position = shard.position(sid)?;
        let old = shard.entries[position].clone();
        let new = Arc::new(change(&old)?);
        shard.replace_at(position, new.clone());
        Some((old, new))
    }

    /// Removes expired sessions, and the latest-session entries that point at them.
    pub fn sweep_expired(&self, now: u64) {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let mut i = 0;
            while i < shard.expiry.len() {
                if u64::from(shard.expiry[i]) <= now {
                    shard.remove_at(i);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
        }
        self.live.fetch_sub(removed, Ordering::Relaxed);
        for latest in self.latest.iter() {
            latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s| s.expires_at() > now);
        }
    }
}

fn same_person(a: &Session, b: &Session) -> bool {
    a.appid() == b.appid() && a.openid() == b.openid()
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn insert(
        &self,
        session: Session,
        session_key: Option<&Secret>,
    ) -> Result<(), StoreError> {
        let session =
            match session_key.and_then(|k| crate::wechat::client::decode_session_key(k.expose())) {
                Some(key) => {
                    // Under the person's lock: two logins of one person at once each keep the other's key.
                    let hash = self.latest_hash(session.appid(), session.openid());
                    let mut latest = self.latest_shard(hash);
                    let mut keys: SmallVec<[[u8; 16]; SESSION_KEY_HISTORY]> = SmallVec::new();
                    keys.push(key);
                    match latest.find_entry(hash, |s| same_person(s, &session)) {
                        Ok(mut previous) => {
                            keys.extend(
                                previous
                                    .get()
                                    .session_keys()
                                    .filter(|k| *k != key)
                                    .take(SESSION_KEY_HISTORY - 1),
                            );
                            let session = Arc::new(session.with_session_keys(&keys));
                            *previous.get_mut() = session.clone();
                            session
                        }
                        Err(absent) => {
                            let session = Arc::new(session.with_session_keys(&keys));
                            let hasher = &self.hasher;
                            absent
                                .into_table()
                                .insert_unique(hash, session.clone(), |s| {
                                    hasher.hash_one((s.appid(), s.openid()))
                                });
                            session
                        }
                    }
                }
                None => Arc::new(session),
            };
        let mut shard = self.shard(&session.sid);
        let replaced = shard.position(&session.sid).is_some();
        if !replaced && shard.entries.len() >= self.per_shard {
            shard.evict_one(sid_hash(&session.sid));
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        shard.put(session);
        if !replaced {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn get(&self, sid: &SessionId, now: u64) -> Result<Option<Arc<Session>>, StoreError> {
        Ok(self
            .shard(sid)
            .get(sid)
            .filter(|s| s.expires_at() > now)
            .cloned())
    }

    async fn rotate_refresh(
        &self,
        sid: &SessionId,
        presented: &RefreshHash,
        next: RefreshHash,
        now: u64,
        expires_at: u64,
    ) -> Result<Rotation, StoreError> {
        // One step under the shard's lock: two refreshes with the same token cannot both succeed.
        let mut shard = self.shard(sid);
        let Some(position) = shard.position(sid) else {
            return Ok(Rotation::Unknown);
        };
        let session = shard.entries[position].clone();
        if session.expires_at() <= now {
            shard.remove_at(position);
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Ok(Rotation::Unknown);
        }
        if same(&session.refresh, presented) {
            let rotated = Arc::new(session.rotated(next, expires_at));
            shard.replace_at(position, rotated.clone());
            drop(shard);
            self.replace_latest(&session, &rotated);
            Ok(Rotation::Rotated(rotated))
        } else if session.was_used(presented) {
            shard.remove_at(position);
            self.live.fetch_sub(1, Ordering::Relaxed);
            Ok(Rotation::Replayed {
                user_id: session.user_id().to_owned(),
            })
        } else {
            Ok(Rotation::Unknown)
        }
    }

    async fn repoint_user(
        &self,
        from: &str,
        into: &str,
        change: UserChange<'_>,
    ) -> Result<u64, StoreError> {
        // Merges are rare; a scan is simpler than keeping a user -> sessions index on every login.
        let mut affected = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            affected.extend(
                shard
                    .entries
                    .iter()
                    .filter(|s| s.user_id() == from)
                    .map(|s| s.sid),
            );
        }
        let mut changed = 0;
        for sid in affected {
            let replaced = self.change(&sid, |session| {
                (session.user_id() == from)
                    .then(|| session.changed(Some(into), change).ok())
                    .flatten()
            });
            if let Some((old, new)) = replaced {
                self.replace_latest(&old, &new);
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn update_session(
        &self,
        sid: &SessionId,
        change: UserChange<'_>,
    ) -> Result<bool, StoreError> {
        match self.change(sid, |session| session.changed(None, change).ok()) {
            Some((old, new)) => {
                self.replace_latest(&old, &new);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn revoke(&self, sid: &SessionId) -> Result<bool, StoreError> {
        // A revoked session that is its person's latest stays in that table, for its keys, until a
        // newer login replaces it or it expires: the keys are WeChat's, not the session's.
        let removed = self.shard(sid).remove(sid).is_some();
        if removed {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    async fn session_keys(&self, session: &Session) -> Result<Vec<Secret>, StoreError> {
        let latest = self.latest_of(session);
        let keys = latest.as_deref().unwrap_or(session).session_keys();
        Ok(keys.map(|key| key_text(&key)).collect())
    }

    fn count(&self) -> Option<u64> {
        Some(self.live.load(Ordering::Relaxed))
    }

    fn sweep(&self, now: u64) {
        self.sweep_expired(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::token::new_refresh_token;
    use crate::session::{SessionApp, SessionIds};

    fn session(sid: SessionId, refresh: RefreshHash, expires_at: u64) -> Session {
        session_of(sid, "o", refresh, expires_at)
    }

    fn session_of(sid: SessionId, openid: &str, refresh: RefreshHash, expires_at: u64) -> Session {
        Session::new(
            sid,
            SessionApp::new("shop", "wx0123456789abcdef"),
            SessionIds {
                user_id: "u_1",
                openid,
                unionid: None,
                phone: None,
            },
            0,
            expires_at,
            refresh,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn refresh_rotates_and_a_replay_revokes_the_session() {
        let store = MemoryStore::new(100);
        let sid = SessionId::random();
        let (_, first) = new_refresh_token(sid);
        store.insert(session(sid, first, 1000), None).await.unwrap();
        let (_, second) = new_refresh_token(sid);
        match store
            .rotate_refresh(&sid, &first, second, 10, 2000)
            .await
            .unwrap()
        {
            Rotation::Rotated(s) => assert_eq!((s.refresh, s.expires_at()), (second, 2000)),
            other => panic!("{other:?}"),
        }
        let (_, third) = new_refresh_token(sid);
        assert!(matches!(
            store
                .rotate_refresh(&sid, &first, third, 11, 2000)
                .await
                .unwrap(),
            Rotation::Replayed { .. }
        ));
        assert!(
            store.get(&sid, 12).await.unwrap().is_none(),
            "replay revoked the session"
        );
        assert!(matches!(
            store
                .rotate_refresh(&sid, &second, third, 13, 2000)
                .await
                .unwrap(),
            Rotation::Unknown
        ));
        assert_eq!(store.count(), Some(0));
    }

    #[tokio::test]
    async fn unknown_and_expired_sessions_do_not_rotate() {
        let store = MemoryStore::new(100);
        let sid = SessionId::random();
        let (_, current) = new_refresh_token(sid);
        store
            .insert(session(sid, current, 100), None)
            .await
            .unwrap();
        let (_, random) = new_refresh_token(sid);
        assert!(matches!(
            store
                .rotate_refresh(&sid, &random, random, 10, 200)
                .await
                .unwrap(),
            Rotation::Unknown
        ));
        assert!(
            store.get(&sid, 10).await.unwrap().is_some(),
            "a wrong token does not revoke"
        );
        assert!(matches!(
            store
                .rotate_refresh(&sid, &current, random, 100, 200)
                .await
                .unwrap(),
            Rotation::Unknown
        ));
        assert!(
            store.get(&sid, 50).await.unwrap().is_none(),
            "expired sessions are dropped"
        );
    }

    #[tokio::test]
    async fn session_keys_of_a_person_are_kept_newest_first_and_bounded() {
        let store = MemoryStore::new(100);
        let keys: Vec<String> = (0..6u8)
            .map(|i| key_text(&[i; 16]).expose().to_owned())
            .collect();
        let mut sessions = Vec::new();
        for key in &keys {
            let s = session(SessionId::random(), [0; 32], 1000);
            sessions.push(s.clone());
            store
                .insert(s, Some(&Secret::new(key.clone())))
                .await
                .unwrap();
        }
        let expected: Vec<&str> = keys
            .iter()
            .rev()
            .take(SESSION_KEY_HISTORY)
            .map(String::as_str)
            .collect();
        // Every session of the person sees the latest keys, the oldest session included.
        for s in [&sessions[0], &sessions[5]] {
            let got: Vec<String> = store
                .session_keys(s)
                .await
                .unwrap()
                .iter()
                .map(|k| k.expose().to_owned())
                .collect();
            assert_eq!(got, expected);
        }
        let stranger = session_of(SessionId::random(), "other", [0; 32], 1000);
        assert!(store.session_keys(&stranger).await.unwrap().is_empty());
        // The latest session revoked: its keys stay the person's.
        store.revoke(&sessions[5].sid).await.unwrap();
        assert_eq!(
            store.session_keys(&sessions[0]).await.unwrap().len(),
            SESSION_KEY_HISTORY
        );
    }

    #[tokio::test]
    async fn changes_reach_the_session_and_keep_its_keys() {
        let store = MemoryStore::new(100);
        let sid = SessionId::random();
        let key = key_text(&[9; 16]);
        store
            .insert(session(sid, [0; 32], 1000), Some(&key))
            .await
            .unwrap();
        let change = UserChange {
            unionid: Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"),
            phone: None,
        };
        assert_eq!(store.repoint_user("u_1", "u_2", change).await.unwrap(), 1);
        let now = store.get(&sid, 1).await.unwrap().unwrap();
        assert_eq!(
            (now.user_id(), now.unionid()),
            ("u_2", Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"))
        );
        let phone = UserChange {
            unionid: None,
            phone: Some("13580006666"),
        };
        assert!(store.update_session(&sid, phone).await.unwrap());
        assert!(
            !store
                .update_session(&SessionId::random(), phone)
                .await
                .unwrap()
        );
        let now = store.get(&sid, 1).await.unwrap().unwrap();
        assert_eq!((now.user_id(), now.phone()), ("u_2", Some("13580006666")));
        assert_eq!(
            store.session_keys(&now).await.unwrap()[0].expose(),
            key.expose()
        );
    }

    #[tokio::test]
    async fn a_full_store_evicts_and_the_sweep_removes_the_expired() {
        let store = MemoryStore::new(SHARDS as u64 * 4);
        let mut sids = Vec::new();
        for i in 0..(SHARDS * 8) as u64 {
            let sid = SessionId::random();
            store
                .insert(session(sid, [0; 32], 1000 + i), None)
                .await
                .unwrap();
            sids.push(sid);
        }
        let live = store.count().unwrap();
        assert!(live <= SHARDS as u64 * 4, "{live}");
        let mut found = 0;
        for sid in &sids {
            found += u64::from(store.get(sid, 0).await.unwrap().is_some());
        }
        assert_eq!(found, live, "the count is the sessions one can find");
        // Every session that is left can still be found and removed, after all the moving around.
        store.sweep(1000 + (SHARDS * 4) as u64);
        let mut left = 0;
        for sid in &sids {
            if let Some(s) = store.get(sid, 0).await.unwrap() {
                assert!(s.expires_at() > 1000 + (SHARDS * 4) as u64);
                left += 1;
            }
        }
        assert_eq!(store.count(), Some(left));
        store.sweep(u64::MAX);
        assert_eq!(store.count(), Some(0));
        for sid in &sids {
            assert!(store.get(sid, 0).await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn the_sweep_follows_refreshes_and_removals() {
        // About 16 sessions a shard: each revocation moves a shard's last session into its place.
        let store = MemoryStore::new(10_000);
        let mut sessions = Vec::new();
        for i in 0..1_000usize {
            let sid = SessionId::random();
            let refresh = [(i % 256) as u8; 32];
            store
                .insert(session(sid, refresh, 1000), None)
                .await
                .unwrap();
            sessions.push((sid, refresh));
        }
        // Every third is refreshed until 5000, and every fifth revoked.
        for (i, (sid, refresh)) in sessions.iter().enumerate() {
            if i % 3 == 0 {
                let rotation = store
                    .rotate_refresh(sid, refresh, [1; 32], 0, 5000)
                    .await
                    .unwrap();
                assert!(matches!(rotation, Rotation::Rotated(_)), "{i}");
            }
        }
        for (sid, _) in sessions.iter().step_by(5) {
            assert!(store.revoke(sid).await.unwrap());
        }
        store.sweep(1000);
        for (i, (sid, _)) in sessions.iter().enumerate() {
            let kept = store.get(sid, 0).await.unwrap();
            assert_eq!(kept.is_some(), i % 3 == 0 && i % 5 != 0, "{i}");
            assert!(kept.is_none_or(|s| s.expires_at() == 5000), "{i}");
        }
        let left = (0..1_000).filter(|i| i % 3 == 0 && i % 5 != 0).count();
        assert_eq!(store.count(), Some(left as u64));
    }

    #[test]
    fn eviction_takes_the_sampled_session_nearest_its_expiry() {
        // A shard whose sessions were moved about by removals and replaced by refreshes: each
        // eviction must take, of the sessions its seed samples, the one that expires first (the
        // times are all different, so that one is a single session).
        let mut shard = Shard::default();
        for i in 0..200u64 {
            let expires = 1000 + (i * 7919) % 1000;
            shard.put(Arc::new(session(SessionId::random(), [0; 32], expires)));
        }
        for position in (0..100).step_by(9) {
            shard.remove_at(position);
        }
        for position in (0..150).step_by(4) {
            let refreshed = shard.entries[position].rotated([1; 32], 5000 + position as u64);
            shard.replace_at(position, Arc::new(refreshed));
        }
        for seed in 0..100u64 {
            let seed = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let expected = sample(seed, shard.entries.len())
                .map(|i| (shard.entries[i].expires_at(), shard.entries[i].sid))
                .min_by_key(|&(expires, _)| expires)
                .unwrap();
            let evicted = shard.evict_one(seed);
            assert_eq!((evicted.expires_at(), evicted.sid), expected, "seed {seed}");
            assert!(shard.get(&evicted.sid).is_none());
        }
        assert_eq!(shard.entries.len(), 200 - 12 - 100);
        for (session, expires) in shard.entries.iter().zip(&shard.expiry) {
            assert_eq!(session.expires_at(), u64::from(*expires));
            assert!(shard.get(&session.sid).is_some());
        }
    }

    #[tokio::test]
    async fn removing_from_the_middle_keeps_every_other_session_findable() {
        let store = MemoryStore::new(10_000);
        let sids: Vec<SessionId> = (0..2_000).map(|_| SessionId::random()).collect();
        for sid in &sids {
            store
                .insert(session(*sid, [0; 32], 1000), None)
                .await
                .unwrap();
        }
        for sid in sids.iter().step_by(3) {
            assert!(store.revoke(sid).await.unwrap());
            assert!(!store.revoke(sid).await.unwrap());
        }
        for (i, sid) in sids.iter().enumerate() {
            assert_eq!(
                store.get(sid, 0).await.unwrap().is_some(),
                i % 3 != 0,
                "{i}"
            );
        }
        assert_eq!(store.count(), Some(2_000 - 667));
    }
}
