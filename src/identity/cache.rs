//! Returning users' links in memory, in front of the single-node (SQLite) store: most logins are of
//! people whose links are all in place, and answering them here skips a round trip to sqlx's
//! connection thread (a query, two thread wake-ups) on every login.
//!
//! It is exact, not approximately fresh, because every change to the SQLite store is made by this
//! process, through [`super::Identities`], which tells the cache:
//! - a login that merged users (rule 4) drops every entry of the survivor's openids (the merged
//!   users' openids are among them now). Under today's rules a merged user only ever held the
//!   openid that was just re-linked, whose entry the login refills anyway; the drop keeps the
//!   cache exact should a user ever hold more;
//! - a verified phone number drops the user's entries;
//! - an entry filled from a read that a drop may have overtaken is not kept (an epoch, as in the
//!   Redis session cache).
//!
//! With PostgreSQL other instances change links, so there is no cache: every login asks the store.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashlink::LruCache;
use hashlink::linked_hash_map::RawEntryMut;

use super::{LoginIds, Resolved};

/// People whose links are kept; past this the least recently used are dropped (their next login
/// asks the store). Each entry is about 300 bytes. Nothing expires by age: every entry is exact.
const CAPACITY: usize = 100_000;
/// Independent locks, so logins on different runtime threads seldom wait for each other.
const SHARDS: usize = 16;

/// What one (appid, openid) resolves to while nothing changes.
struct Linked {
    user_id: String,
    /// The unionid that, arriving with this openid, is known to be linked to the same user.
    unionid: Option<String>,
    phone: Option<String>,
}

/// (appid, openid). It hashes as the `(&str, &str)` a lookup hashes, so a lookup builds no key.
type Key = (Box<str>, Box<str>);
type Shard = LruCache<Key, Arc<Linked>, RandomState>;

pub(super) struct LinkCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Moves on at every drop: a fill that started before it is not kept.
    epoch: AtomicU64,
}

impl LinkCache {
    pub(super) fn new() -> LinkCache {
        LinkCache::with_capacity(CAPACITY)
    }

    fn with_capacity(capacity: usize) -> LinkCache {
        let hasher = RandomState::new();
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        LinkCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::with_hasher(per_shard, hasher.clone())))
                .collect(),
            hasher,
            epoch: AtomicU64::new(0),
        }
    }

    /// The shard of (appid, openid) and the pair's hash in it.
    fn shard(&self, appid: &str, openid: &str) -> (MutexGuard<'_, Shard>, u64) {
        let hash = self.hasher.hash_one((appid, openid));
        (
            self.shards[crate::session::shard_bits(hash) % SHARDS]
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            hash,
        )
    }

    /// The entry of (appid, openid) in its `shard`, found by its `hash` without building a key.
    fn entry<'s>(
        shard: &'s mut Shard,
        hash: u64,
        appid: &str,
        openid: &str,
    ) -> RawEntryMut<'s, Key, Arc<Linked>, RandomState> {
        shard
            .raw_entry_mut()
            .from_hash(hash, |(a, o)| **a == *appid && **o == *openid)
    }

    /// The user `ids` resolve to when the store would answer from links already in place.
    pub(super) fn get(&self, ids: LoginIds<'_>) -> Option<Resolved> {
        let linked = {
            let (mut shard, hash) = self.shard(ids.appid, ids.openid);
            match Self::entry(&mut shard, hash, ids.appid, ids.openid) {
                RawEntryMut::Occupied(mut found) => {
                    found.to_back();
                    found.get().clone()
                }
                RawEntryMut::Vacant(_) => return None,
            }
        };
        // A unionid not known to be linked to this user needs the store's rules (link or merge).
        if ids.unionid.is_some() && ids.unionid != linked.unionid.as_deref() {
            return None;
        }
        Some(Resolved {
            user_id: linked.user_id.clone(),
            created: false,
            merged: Vec::new(),
            phone: linked.phone.clone(),
        })
    }

    /// The epoch to pass to [`LinkCache::fill`] for a read that starts now.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Keeps what the store answered for `ids`, unless something was dropped since `epoch`.
    pub(super) fn fill(&self, ids: LoginIds<'_>, resolved: &Resolved, epoch: u64) {
        let linked = Arc::new(Linked {
            user_id: resolved.user_id.clone(),
            unionid: ids.unionid.map(str::to_owned),
            phone: resolved.phone.clone(),
        });
        let (mut shard, _) = self.shard(ids.appid, ids.openid);
        // Checked under the shard's lock, which a drop of this pair takes after moving the epoch
        // on: either the drop comes later and removes this entry, or the check sees it.
        if self.epoch() != epoch {
            return;
        }
        shard.insert((ids.appid.into(), ids.openid.into()), linked);
    }

    /// Forgets the entries of these (appid, openid) pairs.
    pub(super) fn drop_links<'a>(&self, links: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for (appid, openid) in links {
            let (mut shard, hash) = self.shard(appid, openid);
            if let RawEntryMut::Occupied(found) = Self::entry(&mut shard, hash, appid, openid) {
                found.remove();
            }
        }
    }

    /// Forgets everything (when a user's links could not be listed).
    pub(super) fn drop_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for shard in &self.shards {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<'a>(openid: &'a str, unionid: Option<&'a str>) -> LoginIds<'a> {
        LoginIds {
            appid: "wx1",
            openid,
            unionid,
        }
    }

    fn resolved(user_id: &str, phone: Option<&str>) -> Resolved {
        Resolved {
            user_id: user_id.into(),
            created: false,
            merged: Vec::new(),
            phone: phone.map(str::to_owned),
        }
    }

    #[test]
    fn a_hit_needs_the_same_unionid_or_none() {
        let cache = LinkCache::new();
        let epoch = cache.epoch();
        cache.fill(ids("o1", Some("u1")), &resolved("user", Some("138")), epoch);
        assert_eq!(
            cache.get(ids("o1", Some("u1"))),
            Some(resolved("user", Some("138")))
        );
        assert_eq!(
            cache.get(ids("o1", None)),
            Some(resolved("user", Some("138")))
        );
        assert_eq!(
            cache.get(ids("o1", Some("u2"))),
            None,
            "another unionid: the rules"
        );
        assert_eq!(cache.get(ids("o2", None)), None);
        // Known without a unionid: one arriving now must be linked by the store.
        cache.fill(ids("o3", None), &resolved("other", None), epoch);
        assert_eq!(cache.get(ids("o3", Some("u3"))), None);
        assert!(cache.get(ids("o3", None)).is_some());
    }

    #[test]
    fn past_capacity_the_least_recently_used_go_and_the_rest_are_found() {
        let cache = LinkCache::with_capacity(SHARDS * 64);
        let epoch = cache.epoch();
        let openid = |i: usize| format!("o{i}");
        // About 16 a shard, and never near its 64: the tables grow from empty, rehashing the keys
        // they hold, which must hash as the lookups do.
        for i in 0..SHARDS * 16 {
            cache.fill(
                ids(&openid(i), None),
                &resolved(&format!("u{i}"), None),
                epoch,
            );
        }
        for i in 0..SHARDS * 16 {
            assert_eq!(
                cache.get(ids(&openid(i), None)).unwrap().user_id,
                format!("u{i}")
            );
        }
        // Keep the first ones in use while many more arrive: they stay, and the rest are bounded.
        for i in SHARDS * 16..SHARDS * 400 {
            for kept in 0..4 {
                assert!(
                    cache.get(ids(&openid(kept), None)).is_some(),
                    "{kept} at {i}"
                );
            }
            cache.fill(ids(&openid(i), None), &resolved("later", None), epoch);
        }
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS * 64, "{held} entries");
        assert!(
            cache.get(ids(&openid(40), None)).is_none(),
            "unused since: dropped"
        );
        assert!(cache.get(ids(&openid(SHARDS * 400 - 1), None)).is_some());
    }

    #[test]
    fn a_drop_forgets_and_a_fill_it_overtook_is_not_kept() {
        let cache = LinkCache::new();
        let before = cache.epoch();
        cache.fill(ids("o1", None), &resolved("user", None), before);
        cache.drop_links([("wx1", "o1")]);
        assert_eq!(cache.get(ids("o1", None)), None);
        // A read that started before the drop answers what was true before it.
        cache.fill(ids("o1", None), &resolved("stale", None), before);
        assert_eq!(cache.get(ids("o1", None)), None);
        let now = cache.epoch();
        cache.fill(ids("o1", None), &resolved("fresh", None), now);
        assert_eq!(cache.get(ids("o1", None)).unwrap().user_id, "fresh");
        cache.drop_all();
        assert_eq!(cache.get(ids("o1", None)), None);
    }
}
