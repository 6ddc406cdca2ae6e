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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::sync::Cache;

use super::{LoginIds, Resolved};

/// People whose links are kept; past this the least used are dropped (their next login asks the
/// store). Each entry is about 300 bytes.
const CAPACITY: u64 = 100_000;
/// An entry unused this long is dropped.
const IDLE: Duration = Duration::from_secs(3600);

/// What one (appid, openid) resolves to while nothing changes.
struct Linked {
    user_id: String,
    /// The unionid that, arriving with this openid, is known to be linked to the same user.
    unionid: Option<String>,
    phone: Option<String>,
}

pub(super) struct LinkCache {
    entries: Cache<String, Arc<Linked>>,
    /// Moves on at every drop: a fill that started before it is not kept.
    epoch: AtomicU64,
}

fn key(appid: &str, openid: &str) -> String {
    let mut key = String::with_capacity(appid.len() + openid.len() + 1);
    key.push_str(appid);
    key.push('\0');
    key.push_str(openid);
    key
}

impl LinkCache {
    pub(super) fn new() -> LinkCache {
        LinkCache {
            entries: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_idle(IDLE)
                .build(),
            epoch: AtomicU64::new(0),
        }
    }

    /// The user `ids` resolve to when the store would answer from links already in place.
    pub(super) fn get(&self, ids: LoginIds<'_>) -> Option<Resolved> {
        let linked = self.entries.get(&key(ids.appid, ids.openid))?;
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
        if self.epoch() != epoch {
            return;
        }
        let linked = Arc::new(Linked {
            user_id: resolved.user_id.clone(),
            unionid: ids.unionid.map(str::to_owned),
            phone: resolved.phone.clone(),
        });
        self.entries.insert(key(ids.appid, ids.openid), linked);
        // A drop between the check and the insert would have been missed: undo.
        if self.epoch() != epoch {
            self.entries.invalidate(&key(ids.appid, ids.openid));
        }
    }

    /// Forgets the entries of these (appid, openid) pairs.
    pub(super) fn drop_links<'a>(&self, links: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for (appid, openid) in links {
            self.entries.invalidate(&key(appid, openid));
        }
    }

    /// Forgets everything (when a user's links could not be listed).
    pub(super) fn drop_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
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
