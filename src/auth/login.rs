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
use crate::error::Error;
use crate::identity::LoginIds;
use crate::wechat::client::WechatError;

/// How long an exchange's answer is kept: the life of a `wx.login()` code.
pub const CODE_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// WeChat's answers per single-use code (a `wx.login()` code, an OAuth code), kept for the code's
/// life and keyed by a hash of (appid, code) so no code is kept in memory.
pub struct CodeExchanges<T> {
    answers: Cache<[u8; 32], Result<T, WechatError>>,
}

impl<T: Clone + Send + Sync + 'static> CodeExchanges<T> {
    /// Answers kept for `lifetime`, the longest the code could still be presented.
    pub fn new(lifetime: Duration) -> Self {
        CodeExchanges {
            answers: Cache::builder()
                // Each answer is a few hundred bytes; past this, the oldest codes lose only their
                // retry protection.
                .max_capacity(200_000)
                .time_to_live(lifetime)
                .build(),
        }
    }

    /// WeChat's answer for `code` of `appid`: `ask` runs once, however many callers present the
    /// code at the same time or later.
    pub async fn exchange(
        &self,
        appid: &str,
        code: &str,
        ask: impl Future<Output = Result<T, WechatError>>,
    ) -> Result<T, WechatError> {
        let mut hasher = Sha256::new();
        hasher.update(appid.as_bytes());
        hasher.update([0]);
        hasher.update(code.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        // moka runs one `init` per key and hands its value to every concurrent caller (single flight),
        // then keeps it for the code's lifetime.
        self.answers.get_with(key, ask).await
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
pub(super) fn login_error(e: WechatError) -> Error {
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
            .await
            .map_err(login_error)?;
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
        self.sessions
            .push_session_key(appid, &exchanged.openid, exchanged.session_key.clone(), now)
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        let new = NewSession {
            user_id: resolved.user_id,
            openid: exchanged.openid,
            unionid,
            phone: resolved.phone,
            profile: opened.as_ref().map(open_data::profile),
        };
        self.start_session(app, new, now).await
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
