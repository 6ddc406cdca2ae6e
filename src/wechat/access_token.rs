//! The app-level access_token (wechat-protocol.md "access_token"): one cached token per app, fetched
//! with `cgi-bin/stable_token` (normal mode) by one caller at a time, renewed about five minutes before
//! it expires, and dropped on `40001`/`40014`/`42001` only if it is still the cached one (another
//! caller may already have renewed it), then the call is retried once.
//!
//! Behind [`AccessTokens`]: [`LocalAccessTokens`] for one instance, [`RedisAccessTokens`] for several
//! sharing one token through Redis.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::client::{WechatClient, WechatError};
use crate::config::{AppConfig, Secret};

/// Renew this long before WeChat says the token expires.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);

/// WeChat's answers meaning "this access_token is not (or no longer) valid".
pub fn is_token_error(e: &WechatError) -> bool {
    matches!(
        e,
        WechatError::Api {
            errcode: 40001 | 40014 | 42001
        }
    )
}

/// A source of app access_tokens.
#[async_trait]
pub trait AccessTokens: Send + Sync + 'static {
    /// A token for `app`, valid for a while yet.
    async fn token(&self, app: &AppConfig) -> Result<Secret, WechatError>;

    /// WeChat refused `stale`: forget it, unless the cache already holds another token.
    async fn invalidate(&self, appid: &str, stale: &Secret);
}

/// Calls `f` with a token for `app`; when WeChat says the token is invalid, gets a fresh one and calls
/// `f` once more.
pub async fn with_token<T, F, Fut>(
    tokens: &dyn AccessTokens,
    app: &AppConfig,
    f: F,
) -> Result<T, WechatError>
where
    F: Fn(Secret) -> Fut,
    Fut: Future<Output = Result<T, WechatError>>,
{
    let token = tokens.token(app).await?;
    match f(token.clone()).await {
        Err(e) if is_token_error(&e) => {
            tracing::info!(appid = %app.appid, "WeChat refused the access_token; fetching a new one");
            tokens.invalidate(&app.appid, &token).await;
            f(tokens.token(app).await?).await
        }
        other => other,
    }
}

struct Cached {
    token: Secret,
    renew_at: Instant,
}

/// Tokens cached in this process: right for one instance.
pub struct LocalAccessTokens {
    wechat: WechatClient,
    /// One slot per appid; the async lock makes concurrent callers wait for one fetch.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
}

impl LocalAccessTokens {
    pub fn new(wechat: WechatClient) -> Self {
        LocalAccessTokens {
            wechat,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, appid: &str) -> Arc<tokio::sync::Mutex<Option<Cached>>> {
        self.slots
            .lock()
            .expect("not poisoned")
            .entry(appid.to_owned())
            .or_default()
            .clone()
    }
}

#[async_trait]
impl AccessTokens for LocalAccessTokens {
    async fn token(&self, app: &AppConfig) -> Result<Secret, WechatError> {
        let slot = self.slot(&app.appid);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.renew_at) {
            return Ok(c.token.clone());
        }
        let (token, expires_in) = self.wechat.stable_token(&app.appid, &app.secret).await?;
        let lifetime = Duration::from_secs(expires_in).saturating_sub(REFRESH_AHEAD);
        *cached = Some(Cached {
            token: token.clone(),
            renew_at: Instant::now() + lifetime,
        });
        Ok(token)
    }

    async fn invalidate(&self, appid: &str, stale: &Secret) {
        let slot = self.slot(appid);
        let mut cached = slot.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| c.token.expose() == stale.expose())
        {
            *cached = None;
        }
    }
}

/// Tokens shared by every instance through Redis: `wxgate:at:{appid}` holds the token until it is due
/// for renewal. When it is missing, one instance takes the lease `wxgate:atlock:{appid}` (`SET NX PX`
/// with a random value) and fetches; the others wait for the token to appear. The lease outlives any
/// fetch (it is longer than the WeChat timeout, so it needs no renewal) and is released only by its
/// holder; if the holder dies mid-fetch, the lease expires and another instance takes over.
pub struct RedisAccessTokens {
    wechat: WechatClient,
    redis: crate::shared::SharedRedis,
    lease: Duration,
    release: redis::Script,
}

/// Deletes KEYS[1] only if it still holds ARGV[1]: a lease or a token is only ever removed by the one
/// who knows its value.
const DELETE_IF: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// How often a waiting instance looks for the token another one is fetching.
const POLL: Duration = Duration::from_millis(25);

impl RedisAccessTokens {
    /// `wechat_timeout` bounds one fetch; the lease is twice that and a second.
    pub fn new(
        wechat: WechatClient,
        redis: crate::shared::SharedRedis,
        wechat_timeout: Duration,
    ) -> Self {
        RedisAccessTokens {
            wechat,
            redis,
            lease: wechat_timeout * 2 + Duration::from_secs(1),
            release: redis::Script::new(DELETE_IF),
        }
    }

    async fn cached(&self, key: &str) -> Result<Option<String>, WechatError> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.redis.conn())
            .await
            .map_err(unavailable)
    }
}

/// A Redis failure as WeChat being unreachable: the caller answers 503 either way. Only the kind of
/// failure is kept, never a command (which could hold a token).
fn unavailable(e: redis::RedisError) -> WechatError {
    WechatError::Unavailable(format!("access_token cache in Redis: {:?}", e.kind()))
}

#[async_trait]
impl AccessTokens for RedisAccessTokens {
    async fn token(&self, app: &AppConfig) -> Result<Secret, WechatError> {
        let key = format!("wxgate:at:{}", app.appid);
        let lock = format!("wxgate:atlock:{}", app.appid);
        let deadline = Instant::now() + self.lease + Duration::from_secs(1);
        loop {
            if let Some(token) = self.cached(&key).await? {
                return Ok(Secret::new(token));
            }
            let holder = hex::encode(crate::session::token::random_bytes::<16>());
            let taken: Option<String> = redis::cmd("SET")
                .arg(&lock)
                .arg(&holder)
                .arg("NX")
                .arg("PX")
                .arg(self.lease.as_millis() as u64)
                .query_async(&mut self.redis.conn())
                .await
                .map_err(unavailable)?;
            if taken.is_some() {
                let fetched = self.wechat.stable_token(&app.appid, &app.secret).await;
                let stored = match &fetched {
                    Ok((token, expires_in)) => {
                        let lifetime =
                            Duration::from_secs(*expires_in).saturating_sub(REFRESH_AHEAD);
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(token.expose())
                            .arg("PX")
                            .arg((lifetime.as_millis() as u64).max(1))
                            .query_async::<()>(&mut self.redis.conn())
                            .await
                            .map_err(unavailable)
                    }
                    Err(_) => Ok(()),
                };
                let _: Result<i64, _> = self
                    .release
                    .key(&lock)
                    .arg(&holder)
                    .invoke_async(&mut self.redis.conn())
                    .await;
                stored?;
                return fetched.map(|(token, _)| token);
            }
            if Instant::now() >= deadline {
                return Err(WechatError::Unavailable(
                    "another instance is fetching the access_token and has not finished".into(),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn invalidate(&self, appid: &str, stale: &Secret) {
        let result: Result<i64, _> = self
            .release
            .key(format!("wxgate:at:{appid}"))
            .arg(stale.expose())
            .invoke_async(&mut self.redis.conn())
            .await;
        if let Err(e) = result {
            tracing::warn!(error = ?e.kind(), "could not drop a refused access_token from Redis");
        }
    }
}
