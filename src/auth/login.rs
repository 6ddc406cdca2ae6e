//! `POST /auth/login`: a `wx.login()` code becomes a user and a token pair.
//!
//! One code, one exchange: WeChat codes are single use, and clients retry, double-submit and race. The
//! first post of a code asks WeChat; every other post of the same code while it could still be alive
//! (5 minutes) — concurrent or later — gets that same answer, success or error, without a second call.
//! A code is never sent to WeChat again after WeChat answered.

use std::time::Duration;

use http::Response;
use moka::future::Cache;
use sha2::{Digest, Sha256};

use super::open_data;
use super::service::{App, AuthService, LOGIN_EXPECTED, LoginRequest, NewSession};
use crate::body::Body;
use crate::config::Secret;
use crate::error::Error;
use crate::identity::LoginIds;
use crate::shared::SharedRedis;
use crate::wechat::client::{CodeSession, OauthGrant, WechatError};

/// How long an exchange's answer is kept: the life of a `wx.login()` code.
pub const CODE_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// WeChat's answers per single-use code (a `wx.login()` code, an OAuth code), kept for the code's
/// life and keyed by a hash of (appid, code) so no code is kept in memory. With Redis
/// ([`CodeExchanges::shared`]) the guard spans every instance: a retry that lands on another instance
/// gets the same answer, and the code still goes to WeChat once.
pub struct CodeExchanges<T> {
    answers: Cache<[u8; 32], Result<T, WechatError>>,
    lifetime: Duration,
    shared: Option<SharedExchanges>,
}

struct SharedExchanges {
    redis: SharedRedis,
    /// How long an instance waits for another one's exchange of the same code.
    wait: Duration,
}

/// The marker an instance leaves on a code it is exchanging.
const PENDING: &str = "pending";
/// How often an instance looks for the answer to a code another one is exchanging.
const POLL: Duration = Duration::from_millis(20);

/// An answer that can travel between instances through Redis. The secrets in it (a session_key, an
/// OAuth user access token) are written out on purpose: Redis keeps them for the code's life, no
/// longer, so that a retry on another instance can be served.
pub trait Shareable: Sized {
    fn share(&self) -> serde_json::Value;
    fn unshare(value: &serde_json::Value) -> Option<Self>;
}

impl Shareable for CodeSession {
    fn share(&self) -> serde_json::Value {
        serde_json::json!({
            "openid": self.openid,
            "session_key": self.session_key.expose(),
            "unionid": self.unionid,
        })
    }

    fn unshare(value: &serde_json::Value) -> Option<Self> {
        Some(CodeSession {
            openid: value["openid"].as_str()?.to_owned(),
            session_key: Secret::new(value["session_key"].as_str()?),
            unionid: value["unionid"].as_str().map(str::to_owned),
        })
    }
}

impl Shareable for OauthGrant {
    fn share(&self) -> serde_json::Value {
        serde_json::json!({
            "openid": self.openid,
            "unionid": self.unionid,
            "scope": self.scope,
            "snapshot_user": self.snapshot_user,
            "access_token": self.access_token.expose(),
        })
    }

    fn unshare(value: &serde_json::Value) -> Option<Self> {
        Some(OauthGrant {
            openid: value["openid"].as_str()?.to_owned(),
            unionid: value["unionid"].as_str().map(str::to_owned),
            scope: value["scope"].as_str()?.to_owned(),
            snapshot_user: value["snapshot_user"].as_bool()?,
            access_token: Secret::new(value["access_token"].as_str()?),
        })
    }
}

fn encode<T: Shareable>(answer: &Result<T, WechatError>) -> String {
    match answer {
        Ok(value) => serde_json::json!({ "ok": value.share() }),
        Err(WechatError::Api { errcode }) => serde_json::json!({ "errcode": errcode }),
        Err(WechatError::Timeout) => serde_json::json!({ "timeout": true }),
        Err(WechatError::Unavailable(why)) => serde_json::json!({ "unavailable": why }),
    }
    .to_string()
}

fn decode<T: Shareable>(text: &str) -> Option<Result<T, WechatError>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if let Some(ok) = value.get("ok") {
        return T::unshare(ok).map(Ok);
    }
    if let Some(errcode) = value["errcode"].as_i64() {
        return Some(Err(WechatError::Api { errcode }));
    }
    if value["timeout"].as_bool() == Some(true) {
        return Some(Err(WechatError::Timeout));
    }
    let why = value["unavailable"].as_str()?;
    Some(Err(WechatError::Unavailable(why.to_owned())))
}

/// Redis failed: the code's fate cannot be known, so the login fails (503 `auth_unavailable`) and
/// nothing is cached.
fn shared_failure(e: redis::RedisError) -> String {
    format!("code exchanges in Redis: {:?}", e.kind())
}

impl SharedExchanges {
    /// WeChat's answer for the code under `key`: asked here if this instance is first to claim the
    /// code, else awaited from the instance that did.
    async fn exchange<T: Shareable>(
        &self,
        key: &[u8; 32],
        lifetime: Duration,
        ask: impl Future<Output = Result<T, WechatError>>,
    ) -> Result<Result<T, WechatError>, String> {
        let redis_key = format!("wxgate:code:{}", hex::encode(key));
        let mut redis = self.redis.conn();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&redis_key)
            .arg(PENDING)
            .arg("NX")
            .arg("PX")
            .arg(lifetime.as_millis() as u64)
            .query_async(&mut redis)
            .await
            .map_err(shared_failure)?;
        if claimed.is_some() {
            let answer = ask.await;
            redis::cmd("SET")
                .arg(&redis_key)
                .arg(encode(&answer))
                .arg("PX")
                .arg(lifetime.as_millis() as u64)
                .query_async::<()>(&mut redis)
                .await
                .map_err(shared_failure)?;
            return Ok(answer);
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let found: Option<String> = redis::cmd("GET")
                .arg(&redis_key)
                .query_async(&mut redis)
                .await
                .map_err(shared_failure)?;
            match found.as_deref() {
                Some(PENDING) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Some(PENDING) | None => {
                    // The instance that claimed the code died mid-exchange (or its answer expired):
                    // WeChat may have used the code, so it is not sent again.
                    return Ok(Err(WechatError::Api { errcode: 40163 }));
                }
                Some(text) => {
                    return decode(text)
                        .ok_or_else(|| "a shared code exchange in Redis is malformed".to_owned());
                }
            }
        }
    }
}

impl<T: Shareable + Clone + Send + Sync + 'static> CodeExchanges<T> {
    /// Answers kept for `lifetime`, the longest the code could still be presented.
    pub fn new(lifetime: Duration) -> Self {
        CodeExchanges {
            answers: Cache::builder()
                // Each answer is a few hundred bytes; past this, the oldest codes lose only their
                // retry protection.
                .max_capacity(200_000)
                .time_to_live(lifetime)
                .build(),
            lifetime,
            shared: None,
        }
    }

    /// The guard across instances, through Redis; `wait` bounds how long an instance waits for the
    /// answer of another that is exchanging the same code (longer than one WeChat call).
    pub fn shared(mut self, redis: SharedRedis, wait: Duration) -> Self {
        self.shared = Some(SharedExchanges { redis, wait });
        self
    }

    /// WeChat's answer for `code` of `appid`: `ask` runs once, however many callers present the
    /// code at the same time or later, on this instance or (shared) any other. WeChat's errors are
    /// mapped to the client's (DESIGN.md's table); a Redis failure is 503 `auth_unavailable`.
    pub async fn exchange(
        &self,
        appid: &str,
        code: &str,
        ask: impl Future<Output = Result<T, WechatError>>,
    ) -> Result<T, Error> {
        let mut hasher = Sha256::new();
        hasher.update(appid.as_bytes());
        hasher.update([0]);
        hasher.update(code.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        // moka runs one `init` per key and hands its value to every concurrent caller (single flight),
        // then keeps it for the code's lifetime. A Redis failure is not kept: a retry asks again.
        // moka's futures are tens of kilobytes: boxed here, they are built once on the heap instead
        // of being carried (and copied) inside every future that awaits a login.
        let answer = match &self.shared {
            None => Ok(Box::pin(self.answers.get_with(key, ask)).await),
            Some(shared) => {
                let ask = Box::pin(shared.exchange(&key, self.lifetime, ask));
                Box::pin(self.answers.try_get_with(key, ask)).await
            }
        };
        match answer {
            Ok(answer) => answer.map_err(login_error),
            Err(failure) => Err(Error::AuthUnavailable(failure.to_string().into())),
        }
    }
}

/// Whether `code` could be a `wx.login()` code (WeChat's are 32 alphanumerics; allow some slack).
pub(super) fn looks_like_code(code: &str) -> bool {
    (1..=128).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Maps WeChat's answer to the client's error (DESIGN.md's table).
fn login_error(e: WechatError) -> Error {
    match e {
        WechatError::Api {
            errcode: 40029 | 42003,
        } => Error::InvalidCode,
        WechatError::Api { errcode: 40163 } => Error::CodeUsed,
        WechatError::Api { errcode: 40226 } => Error::LoginBlocked,
        WechatError::Api { errcode: 45011 } => Error::RateLimited,
        WechatError::Api {
            errcode: errcode @ (40013 | 40125 | 41002 | 41004 | 41008 | 40002),
        } => {
            tracing::error!(
                errcode,
                "WeChat refused wxgate's own credentials: check apps[].appid and apps[].secret"
            );
            Error::WechatUnavailable(e)
        }
        other => Error::WechatUnavailable(other),
    }
}

impl AuthService {
    pub(super) async fn login(
        &self,
        request: LoginRequest,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let app = self.mini_program(request.app.as_deref())?;
        let result = self.login_to(app, request, now).await;
        self.count_login(app, &result);
        result
    }

    async fn login_to(
        &self,
        app: &App,
        request: LoginRequest,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let code = request.code.ok_or(Error::BadRequest(LOGIN_EXPECTED))?;
        if !looks_like_code(&code) {
            return Err(Error::InvalidCode);
        }
        let appid = app.config.appid.as_str();
        let exchanged = self
            .exchanges
            .exchange(
                appid,
                &code,
                self.wechat.jscode2session(appid, &app.config.secret, &code),
            )
            .await?;
        // User info sent with the code comes from the same wx.login() round: this exchange's
        // session_key is the one it was encrypted with.
        let opened = match request.open_data.is_present() {
            true => Some(request.open_data.open(
                std::slice::from_ref(&exchanged.session_key),
                appid,
                &exchanged.openid,
                now,
                self.watermark_max_age,
            )?),
            false => None,
        };
        let unionid = exchanged.unionid.clone().or_else(|| {
            opened
                .as_ref()
                .and_then(open_data::unionid)
                .map(str::to_owned)
        });
        let resolved = self
            .resolve_identity(LoginIds {
                appid,
                openid: &exchanged.openid,
                unionid: unionid.as_deref(),
            })
            .await?;
        tracing::info!(app = %app.name, user_id = %resolved.user_id, new_user = resolved.created, "login");
        let new = NewSession {
            user_id: resolved.user_id,
            openid: exchanged.openid,
            unionid,
            phone: resolved.phone,
            profile: opened.as_ref().map(open_data::profile),
        };
        self.start_session(app, new, Some(&exchanged.session_key), now)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_plausible_before_wechat_is_asked() {
        assert!(looks_like_code("0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"));
        for bad in ["", " ", "a b", "code\n", &"x".repeat(129), "码"] {
            assert!(!looks_like_code(bad), "{bad:?}");
        }
    }

    #[test]
    fn wechat_errors_map_to_the_documented_codes() {
        let code = |errcode| login_error(WechatError::Api { errcode }).code();
        assert_eq!(code(40029), "invalid_code");
        assert_eq!(code(42003), "invalid_code");
        assert_eq!(code(40163), "code_used");
        assert_eq!(code(40226), "login_blocked");
        assert_eq!(code(45011), "rate_limited");
        assert_eq!(code(-1), "wechat_unavailable");
        assert_eq!(code(40125), "wechat_unavailable");
        assert_eq!(code(12345), "wechat_unavailable");
        assert_eq!(login_error(WechatError::Timeout).status(), 504);
        assert_eq!(login_error(WechatError::Api { errcode: -1 }).status(), 503);
        assert_eq!(
            login_error(WechatError::Unavailable("html".into())).status(),
            502
        );
    }
}
