//! The app-level access_token (wechat-protocol.md "access_token"): one cached token per app, fetched
//! with `cgi-bin/stable_token` (normal mode) by one caller at a time, renewed about five minutes before
//! it expires, and dropped on `40001`/`40014`/`42001` only if it is still the cached one (another
//! caller may already have renewed it), then the call is retried once.
//!
//! Behind [`AccessTokens`], so that several wxgate instances can share one token through Redis.

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
