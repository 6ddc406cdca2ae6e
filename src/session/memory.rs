//! The in-memory session store for a single node: a bounded moka cache whose entries live as long as
//! a refresh token (each refresh starts the period again). When the bound is reached, the sessions
//! least likely to be used again are evicted; their users log in again, silently, through the SDK.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::ops::compute::Op;
use moka::sync::Cache;
use subtle::ConstantTimeEq;

use super::{
    REMEMBERED_REFRESH_TOKENS, RefreshHash, Rotation, SESSION_KEY_HISTORY, Session, SessionId,
    SessionStore, StoreError, UserChange,
};
use crate::config::Secret;

type KeyRing = Arc<Vec<(Secret, u64)>>;

/// Sessions in process memory.
pub struct MemoryStore {
    sessions: Cache<SessionId, Arc<Session>>,
    session_keys: Cache<(String, String), KeyRing>,
}

impl MemoryStore {
    /// A store holding at most `max_sessions` sessions, each for at most `ttl` after its last refresh.
    pub fn new(max_sessions: u64, ttl: Duration) -> Self {
        MemoryStore {
            sessions: Cache::builder()
                .max_capacity(max_sessions)
                .time_to_live(ttl)
                .build(),
            session_keys: Cache::builder()
                .max_capacity(max_sessions)
                .time_to_live(ttl)
                .build(),
        }
    }
}

fn same(a: &RefreshHash, b: &RefreshHash) -> bool {
    a.ct_eq(b).into()
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn insert(&self, session: Session) -> Result<(), StoreError> {
        self.sessions.insert(session.sid, Arc::new(session));
        Ok(())
    }

    async fn get(&self, sid: &SessionId, now: u64) -> Result<Option<Arc<Session>>, StoreError> {
        Ok(self.sessions.get(sid).filter(|s| s.expires_at > now))
    }

    async fn rotate_refresh(
        &self,
        sid: &SessionId,
        presented: &RefreshHash,
        next: RefreshHash,
        now: u64,
        expires_at: u64,
    ) -> Result<Rotation, StoreError> {
        let mut outcome = Rotation::Unknown;
        // One atomic step per session: two refreshes with the same token cannot both succeed.
        self.sessions.entry(*sid).and_compute_with(|entry| {
            let Some(entry) = entry else {
                return Op::Nop;
            };
            let session = entry.into_value();
            if session.expires_at <= now {
                return Op::Remove;
            }
            if same(&session.refresh, presented) {
                let mut rotated = Session::clone(&session);
                rotated.used_refresh.push(rotated.refresh);
                if rotated.used_refresh.len() > REMEMBERED_REFRESH_TOKENS {
                    rotated.used_refresh.remove(0);
                }
                rotated.refresh = next;
                rotated.expires_at = expires_at;
                let rotated = Arc::new(rotated);
                outcome = Rotation::Rotated(rotated.clone());
                Op::Put(rotated)
            } else if session
                .used_refresh
                .iter()
                .any(|used| same(used, presented))
            {
                outcome = Rotation::Replayed {
                    user_id: session.user_id.clone(),
                };
                Op::Remove
            } else {
                Op::Nop
            }
        });
        Ok(outcome)
    }

    async fn repoint_user(
        &self,
        from: &str,
        into: &str,
        change: UserChange<'_>,
    ) -> Result<u64, StoreError> {
        // Merges are rare; a scan is simpler than keeping a user -> sessions index on every login.
        let affected: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.user_id == from)
            .map(|(sid, _)| *sid)
            .collect();
        let mut changed = 0;
        for sid in affected {
            self.sessions
                .entry(sid)
                .and_compute_with(|entry| match entry {
                    Some(entry) if entry.value().user_id == from => {
                        let mut session = change.apply(entry.value());
                        session.user_id = into.to_owned();
                        changed += 1;
                        Op::Put(Arc::new(session))
                    }
                    _ => Op::Nop,
                });
        }
        Ok(changed)
    }

    async fn update_session(
        &self,
        sid: &SessionId,
        change: UserChange<'_>,
    ) -> Result<bool, StoreError> {
        let mut found = false;
        self.sessions
            .entry(*sid)
            .and_compute_with(|entry| match entry {
                Some(entry) => {
                    found = true;
                    Op::Put(Arc::new(change.apply(entry.value())))
                }
                None => Op::Nop,
            });
        Ok(found)
    }

    async fn revoke(&self, sid: &SessionId) -> Result<bool, StoreError> {
        Ok(self.sessions.remove(sid).is_some())
    }

    async fn push_session_key(
        &self,
        appid: &str,
        openid: &str,
        key: Secret,
        at: u64,
    ) -> Result<(), StoreError> {
        self.session_keys
            .entry((appid.to_owned(), openid.to_owned()))
            .and_upsert_with(|existing| {
                let mut ring: Vec<(Secret, u64)> = Vec::with_capacity(SESSION_KEY_HISTORY);
                ring.push((key, at));
                if let Some(existing) = existing {
                    ring.extend(
                        existing
                            .into_value()
                            .iter()
                            .take(SESSION_KEY_HISTORY - 1)
                            .cloned(),
                    );
                }
                Arc::new(ring)
            });
        Ok(())
    }

    async fn session_keys(&self, appid: &str, openid: &str) -> Result<Vec<Secret>, StoreError> {
        Ok(self
            .session_keys
            .get(&(appid.to_owned(), openid.to_owned()))
            .map(|ring| ring.iter().map(|(key, _)| key.clone()).collect())
            .unwrap_or_default())
    }

    fn count(&self) -> Option<u64> {
        // moka counts lazily; settle its pending bookkeeping first (cheap, and only on a scrape).
        self.sessions.run_pending_tasks();
        Some(self.sessions.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::token::new_refresh_token;

    fn session(sid: SessionId, refresh: RefreshHash, expires_at: u64) -> Session {
        Session {
            sid,
            user_id: "u_1".into(),
            app: Arc::from("shop"),
            appid: "wx0123456789abcdef".into(),
            openid: "o".into(),
            unionid: None,
            phone: None,
            created_at: 0,
            expires_at,
            refresh,
            used_refresh: Vec::new(),
        }
    }

    #[tokio::test]
    async fn refresh_rotates_and_a_replay_revokes_the_session() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let sid = SessionId::random();
        let (_, first) = new_refresh_token(sid);
        store.insert(session(sid, first, 1000)).await.unwrap();
        let (_, second) = new_refresh_token(sid);
        match store
            .rotate_refresh(&sid, &first, second, 10, 2000)
            .await
            .unwrap()
        {
            Rotation::Rotated(s) => assert_eq!((s.refresh, s.expires_at), (second, 2000)),
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
    }

    #[tokio::test]
    async fn unknown_and_expired_sessions_do_not_rotate() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let sid = SessionId::random();
        let (_, current) = new_refresh_token(sid);
        store.insert(session(sid, current, 100)).await.unwrap();
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
    async fn session_keys_are_kept_newest_first_and_bounded() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        for i in 0..6 {
            store
                .push_session_key("wx", "o", Secret::new(format!("key{i}")), i)
                .await
                .unwrap();
        }
        let keys: Vec<String> = store
            .session_keys("wx", "o")
            .await
            .unwrap()
            .iter()
            .map(|k| k.expose().to_owned())
            .collect();
        assert_eq!(keys, ["key5", "key4", "key3", "key2"]);
        assert!(store.session_keys("wx", "other").await.unwrap().is_empty());
    }
}
