//! Sessions in Redis, shared by every wxgate instance, with a one-second local cache in front.
//!
//! What Redis holds (every key under `wxgate:`):
//! - `wxgate:s:{sid}`: a hash per session (user, app, WeChat ids, expiry, the current refresh-token
//!   hash and the used ones), expiring with the session (`EXPIREAT`);
//! - `wxgate:us:{user_id}`: the ids of a user's sessions, so a merge or a phone number reaches all of
//!   them on every instance;
//! - `wxgate:k:{appid}:{openid}`: the last session_keys WeChat issued, newest first.
//!
//! Refresh rotation runs as one Lua script on the session's key, so two instances presenting the same
//! refresh token cannot both win, and a replay revokes the session atomically.
//!
//! Invalidation: a change to a session (logout, replay, merge, phone, unionid) is published on the
//! channel `wxgate:invalidate`, and every instance drops that session from its local cache when the
//! message arrives (well under a millisecond on one network). Pub/sub rather than keyspace
//! notifications: they need `notify-keyspace-events` in the server's configuration, which managed
//! Redis services often do not let you set, and they would wake every instance for every session
//! write, where we publish only the changes that matter. Pub/sub is fire-and-forget, so the local
//! cache keeps an entry for at most [`LOCAL_TTL`]: a lost message is covered within a second, and
//! while the subscription is down the cache is emptied and not used at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use moka::sync::Cache;
use redis::aio::ConnectionManager;

use super::{
    REMEMBERED_REFRESH_TOKENS, RefreshHash, Rotation, SESSION_KEY_HISTORY, Session, SessionApp,
    SessionId, SessionIds, SessionStore, StoreError, UserChange,
};
use crate::config::Secret;
use crate::shared::{RESPONSE_TIMEOUT, SharedRedis};

/// The channel invalidations travel on.
pub const CHANNEL: &str = "wxgate:invalidate";
/// How long an instance trusts its local copy of a session: the bound on how late it sees a change
/// whose invalidation message was lost.
pub const LOCAL_TTL: Duration = Duration::from_secs(1);
/// Sessions kept in the local cache (the ones used in the last second).
const LOCAL_CAPACITY: u64 = 100_000;

fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError(Box::new(e))
}

fn session_key(sid: &SessionId) -> String {
    format!("wxgate:s:{}", hex::encode(sid.0))
}

fn user_key(user_id: &str) -> String {
    format!("wxgate:us:{user_id}")
}

fn session_keys_key(appid: &str, openid: &str) -> String {
    format!("wxgate:k:{appid}:{openid}")
}

/// Rotates a refresh token. KEYS[1]: the session. ARGV: presented hash, next hash, now, new expiry,
/// how many used hashes to remember. Returns `{"rotated", field, value, ...}`, `{"replayed",
/// user_id}` or `{"unknown"}`. The comparisons are on SHA-256 hashes of the tokens, so their timing
/// tells nothing about a token.
const ROTATE: &str = r#"
local key = KEYS[1]
local current = redis.call('HGET', key, 'r')
if not current then return {'unknown'} end
if tonumber(redis.call('HGET', key, 'e')) <= tonumber(ARGV[3]) then
  redis.call('DEL', key)
  return {'unknown'}
end
local used = redis.call('HGET', key, 'x') or ''
if current == ARGV[1] then
  used = used .. current
  local keep = tonumber(ARGV[5]) * 32
  if #used > keep then used = string.sub(used, #used - keep + 1) end
  redis.call('HSET', key, 'r', ARGV[2], 'x', used, 'e', ARGV[4])
  redis.call('EXPIREAT', key, ARGV[4])
  local out = redis.call('HGETALL', key)
  table.insert(out, 1, 'rotated')
  return out
end
for i = 1, #used, 32 do
  if string.sub(used, i, i + 31) == ARGV[1] then
    local user = redis.call('HGET', key, 'u')
    redis.call('DEL', key)
    return {'replayed', user}
  end
end
return {'unknown'}
"#;

/// Records a change on a session that still exists. KEYS[1]: the session. ARGV: field, value, ...
/// Returns 1 if the session exists.
const UPDATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
"#;

/// Sessions in Redis.
pub struct RedisStore {
    redis: SharedRedis,
    /// The configured apps, which sessions read from Redis belong to.
    apps: Vec<Arc<SessionApp>>,
    /// Sessions read in the last [`LOCAL_TTL`], trusted only while `subscribed`.
    local: Cache<SessionId, Arc<Session>>,
    /// Whether this instance is subscribed to [`CHANNEL`] right now.
    subscribed: Arc<AtomicBool>,
    /// Counts invalidations; a read that saw it change must not fill the cache.
    epoch: Arc<AtomicU64>,
    rotate: redis::Script,
    update: redis::Script,
    /// Lifetime of the per-user index and the session_key history: a refresh token's.
    ttl: Duration,
    listener: tokio::task::JoinHandle<()>,
}

impl RedisStore {
    /// A store on the shared Redis. It does not wait for Redis: until it answers, requests that
    /// need a session fail with 503 and `/readyz` says so, and both recover by themselves.
    pub fn open(redis: SharedRedis, ttl: Duration, apps: Vec<Arc<SessionApp>>) -> RedisStore {
        let local = Cache::builder()
            .max_capacity(LOCAL_CAPACITY)
            .time_to_live(LOCAL_TTL)
            .build();
        let subscribed = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(AtomicU64::new(0));
        let listener = tokio::spawn(listen(
            redis.clone(),
            local.clone(),
            subscribed.clone(),
            epoch.clone(),
        ));
        RedisStore {
            redis,
            apps,
            local,
            subscribed,
            epoch,
            rotate: redis::Script::new(ROTATE),
            update: redis::Script::new(UPDATE),
            ttl,
            listener,
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.redis.conn()
    }

    /// Tells every instance (this one included) to drop `sids` from its local cache.
    async fn invalidate(&self, sids: &[SessionId]) -> Result<(), StoreError> {
        if sids.is_empty() {
            return Ok(());
        }
        for sid in sids {
            self.local.invalidate(sid);
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut pipe = redis::pipe();
        for sid in sids {
            pipe.cmd("PUBLISH").arg(CHANNEL).arg(&sid.0[..]).ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(store_error)
    }

    async fn change(&self, sid: &SessionId, fields: &[(&str, &str)]) -> Result<bool, StoreError> {
        let mut call = self.update.key(session_key(sid));
        for (field, value) in fields {
            call.arg(*field).arg(*value);
        }
        let found: i64 = call
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(found == 1)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Keeps this instance subscribed to [`CHANNEL`], dropping invalidated sessions from `local`.
/// Whenever the subscription is down, the cache is emptied and bypassed; it is used again only once
/// the subscription is back, so no message can have been missed while it was trusted.
async fn listen(
    redis: SharedRedis,
    local: Cache<SessionId, Arc<Session>>,
    subscribed: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
) {
    let lost = |why: &dyn std::fmt::Display| {
        if subscribed.swap(false, Ordering::SeqCst) {
            tracing::warn!(error = %why, "session store: lost the Redis invalidation channel; local cache off until it is back");
        }
        local.invalidate_all();
        epoch.fetch_add(1, Ordering::SeqCst);
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = tokio::time::timeout(RESPONSE_TIMEOUT, async {
            // Asked each time: after a failover the primary is another server.
            let mut pubsub = redis.client().get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(mut pubsub)) => {
                local.invalidate_all();
                epoch.fetch_add(1, Ordering::SeqCst);
                if !subscribed.swap(true, Ordering::SeqCst) {
                    tracing::info!("session store: subscribed to Redis invalidations");
                }
                backoff = Duration::from_millis(50);
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    match <[u8; 16]>::try_from(message.get_payload_bytes()) {
                        Ok(sid) => local.invalidate(&SessionId(sid)),
                        Err(_) => local.invalidate_all(),
                    }
                    epoch.fetch_add(1, Ordering::SeqCst);
                }
                lost(&"connection closed");
            }
            Ok(Err(e)) => lost(&e),
            Err(_) => lost(&"timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// A session from its hash fields; `None` if a field is missing or malformed (the key was written by
/// something else, or partly expired), or its app is no longer configured.
fn parse(
    sid: SessionId,
    fields: &HashMap<String, Vec<u8>>,
    apps: &[Arc<SessionApp>],
) -> Option<Session> {
    let text = |name: &str| fields.get(name).and_then(|v| std::str::from_utf8(v).ok());
    let number = |name: &str| text(name)?.parse::<u64>().ok();
    // The used refresh tokens ("x") stay in Redis, where the rotation script checks them.
    if !fields
        .get("x")
        .is_none_or(|used| used.len().is_multiple_of(32))
    {
        return None;
    }
    let (name, appid) = (text("a")?, text("ai")?);
    let app = apps
        .iter()
        .find(|app| &*app.name == name && &*app.appid == appid)?;
    let ids = SessionIds {
        user_id: text("u")?,
        openid: text("o")?,
        unionid: text("un"),
        phone: text("p"),
    };
    Session::new(
        sid,
        app.clone(),
        ids,
        number("c")?,
        number("e")?,
        fields.get("r")?.as_slice().try_into().ok()?,
    )
    .ok()
}

fn change_fields<'a>(change: &UserChange<'a>, user_id: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut fields = Vec::new();
    if let Some(user_id) = user_id {
        fields.push(("u", user_id));
    }
    if let Some(unionid) = change.unionid {
        fields.push(("un", unionid));
    }
    if let Some(phone) = change.phone {
        fields.push(("p", phone));
    }
    fields
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn insert(&self, session: Session, login_key: Option<&Secret>) -> Result<(), StoreError> {
        let key = session_key(&session.sid);
        let user_key = user_key(session.user_id());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("u")
            .arg(session.user_id())
            .arg("a")
            .arg(&**session.app())
            .arg("ai")
            .arg(session.appid())
            .arg("o")
            .arg(session.openid())
            .arg("c")
            .arg(session.created_at())
            .arg("e")
            .arg(session.expires_at())
            .arg("r")
            .arg(&session.refresh[..])
            // A new session has used no refresh token yet.
            .arg("x")
            .arg("")
            .ignore();
        if let Some(unionid) = session.unionid() {
            pipe.cmd("HSET").arg(&key).arg("un").arg(unionid).ignore();
        }
        if let Some(phone) = session.phone() {
            pipe.cmd("HSET").arg(&key).arg("p").arg(phone).ignore();
        }
        pipe.cmd("EXPIREAT")
            .arg(&key)
            .arg(session.expires_at())
            .ignore()
            .cmd("SADD")
            .arg(&user_key)
            .arg(hex::encode(session.sid.0))
            .ignore()
            .cmd("EXPIRE")
            .arg(&user_key)
            .arg(self.ttl.as_secs().max(1))
            .ignore();
        // The login's session_key, in the same transaction: a session never exists without the key
        // its user's client encrypts with.
        if let Some(login_key) = login_key {
            let list = session_keys_key(session.appid(), session.openid());
            pipe.cmd("LPUSH")
                .arg(&list)
                .arg(format!("{} {}", session.created_at(), login_key.expose()))
                .ignore()
                .cmd("LTRIM")
                .arg(&list)
                .arg(0)
                .arg(SESSION_KEY_HISTORY - 1)
                .ignore()
                .cmd("EXPIRE")
                .arg(&list)
                .arg(self.ttl.as_secs().max(1))
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(store_error)
    }

    async fn get(&self, sid: &SessionId, now: u64) -> Result<Option<Arc<Session>>, StoreError> {
        let trusted = self.subscribed.load(Ordering::SeqCst);
        if trusted && let Some(session) = self.local.get(sid) {
            return Ok(Some(session).filter(|s| s.expires_at() > now));
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(session_key(sid))
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let Some(session) = parse(*sid, &fields, &self.apps) else {
            tracing::error!(
                "session store: a session in Redis is malformed or of an app no longer configured; treated as absent"
            );
            return Ok(None);
        };
        let session = Arc::new(session);
        // Only a read that no invalidation overtook may fill the cache.
        if trusted && self.epoch.load(Ordering::SeqCst) == epoch {
            self.local.insert(*sid, session.clone());
        }
        Ok(Some(session).filter(|s| s.expires_at() > now))
    }

    async fn rotate_refresh(
        &self,
        sid: &SessionId,
        presented: &RefreshHash,
        next: RefreshHash,
        now: u64,
        expires_at: u64,
    ) -> Result<Rotation, StoreError> {
        let reply: Vec<Vec<u8>> = self
            .rotate
            .key(session_key(sid))
            .arg(&presented[..])
            .arg(&next[..])
            .arg(now)
            .arg(expires_at)
            .arg(REMEMBERED_REFRESH_TOKENS)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        match reply.split_first() {
            Some((status, rest)) if status == b"rotated" => {
                let fields = rest
                    .chunks_exact(2)
                    .filter_map(|pair| {
                        Some((String::from_utf8(pair[0].clone()).ok()?, pair[1].clone()))
                    })
                    .collect();
                let Some(session) = parse(*sid, &fields, &self.apps) else {
                    return Err(StoreError("a rotated session in Redis is malformed".into()));
                };
                let mut pipe = redis::pipe();
                pipe.cmd("EXPIRE")
                    .arg(user_key(session.user_id()))
                    .arg(self.ttl.as_secs().max(1))
                    .ignore();
                pipe.query_async::<()>(&mut self.conn())
                    .await
                    .map_err(store_error)?;
                Ok(Rotation::Rotated(Arc::new(session)))
            }
            Some((status, [user_id])) if status == b"replayed" => {
                self.invalidate(&[*sid]).await?;
                Ok(Rotation::Replayed {
                    user_id: String::from_utf8_lossy(user_id).into_owned(),
                })
            }
            _ => Ok(Rotation::Unknown),
        }
    }

    async fn repoint_user(
        &self,
        from: &str,
        into: &str,
        change: UserChange<'_>,
    ) -> Result<u64, StoreError> {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(user_key(from))
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let fields = change_fields(&change, Some(into));
        let mut changed = Vec::new();
        for member in &members {
            let Some(sid) = hex::decode(member)
                .ok()
                .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                .map(SessionId)
            else {
                continue;
            };
            if self.change(&sid, &fields).await? {
                changed.push(sid);
            }
        }
        if from != into && !members.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("SADD").arg(user_key(into)).arg(&members).ignore();
            pipe.cmd("EXPIRE")
                .arg(user_key(into))
                .arg(self.ttl.as_secs().max(1))
                .ignore();
            pipe.cmd("DEL").arg(user_key(from)).ignore();
            pipe.query_async::<()>(&mut self.conn())
                .await
                .map_err(store_error)?;
        }
        self.invalidate(&changed).await?;
        Ok(changed.len() as u64)
    }

    async fn update_session(
        &self,
        sid: &SessionId,
        change: UserChange<'_>,
    ) -> Result<bool, StoreError> {
        let found = self.change(sid, &change_fields(&change, None)).await?;
        if found {
            self.invalidate(&[*sid]).await?;
        }
        Ok(found)
    }

    async fn revoke(&self, sid: &SessionId) -> Result<bool, StoreError> {
        let removed: i64 = redis::cmd("DEL")
            .arg(session_key(sid))
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        self.invalidate(&[*sid]).await?;
        Ok(removed == 1)
    }

    async fn session_keys(&self, session: &Session) -> Result<Vec<Secret>, StoreError> {
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(session_keys_key(session.appid(), session.openid()))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(entries
            .iter()
            .filter_map(|entry| entry.split_once(' ').map(|(_, key)| Secret::new(key)))
            .collect())
    }

    fn count(&self) -> Option<u64> {
        // Counting sessions in Redis means scanning its keys; Redis's own INFO keyspace does it.
        None
    }

    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(store_error)
    }
}
