//! OAuth logins of mobile apps, websites and official-account pages (apps of kind `app`, `web`, `oa`):
//! the same person as in the mini program, found by unionid.
//!
//! - `POST /oauth/login` `{"app"?, "code"}`: a client that received an OAuth code (a mobile app's
//!   `SendAuth`, a single-page site that handles WeChat's redirect itself) trades it for the same token
//!   pair as `/login`.
//! - `GET /oauth/{app}/start?return_to=/path` and `GET /oauth/{app}/callback`: the browser flow of `web`
//!   and `oa` apps. Start sends the browser to WeChat with a one-time `state`, bound to this browser by
//!   a cookie; the callback consumes the state, logs in, sets the session cookie and sends the browser
//!   back to `return_to`, which must be a path on this site.
//!
//! As with `wx.login()` codes, each OAuth code is exchanged at WeChat once: concurrent or repeated
//! posts of it get the first answer.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cookie::{Cookie, SameSite};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use moka::future::Cache;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::login::{CodeExchanges, looks_like_code};
use super::service::{App, AppChoice, AuthService, NewSession, no_store};
use crate::body::{self, Body};
use crate::config::AppKind;
use crate::error::Error;
use crate::identity::LoginIds;
use crate::session::token::random_bytes;
use crate::shared::SharedRedis;
use crate::wechat::client::OauthGrant;

/// The session cookie of browser logins. `__Host-` makes browsers insist on `Secure`, `Path=/` and no
/// `Domain`: the cookie stays on the exact host that set it.
pub const SESSION_COOKIE: &str = "__Host-wxgate";
/// Binds a login's `state` to the browser that started it (against login CSRF: a victim's browser
/// cannot be made to finish a login the attacker started).
pub const STATE_COOKIE: &str = "__Host-wxgate-state";
/// How long a started browser login may take (WeChat's codes live at most 10 minutes).
pub const STATE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The longest OAuth code lifetime (mobile app and website codes; official-account ones live 5 minutes).
pub const OAUTH_CODE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The longest `return_to` accepted.
const MAX_RETURN_TO: usize = 2048;

pub(super) const OAUTH_LOGIN_EXPECTED: &str =
    "The body must be JSON like {\"app\": \"<app name>\", \"code\": \"<OAuth code>\"}.";

#[derive(Deserialize)]
pub(super) struct OauthLoginRequest {
    pub code: Option<String>,
    pub app: Option<String>,
}

/// A browser login between start and callback.
#[derive(Clone)]
struct Pending {
    app: std::sync::Arc<str>,
    return_to: String,
    /// SHA-256 of the browser's state cookie.
    binding: [u8; 32],
}

/// Where browser logins in progress wait for their callback: this instance's memory, or Redis when
/// several instances share the work (the callback may reach another instance than the start).
enum PendingLogins {
    Local(Cache<[u8; 32], Pending>),
    /// `wxgate:st:{sha256(state)}` -> the login as JSON, for [`STATE_LIFETIME`], taken with `GETDEL`.
    Redis(SharedRedis),
}

fn pending_key(state: &[u8; 32]) -> String {
    format!("wxgate:st:{}", hex::encode(state))
}

/// A Redis failure in a browser login: 503, the login can be started again.
fn pending_failure(e: redis::RedisError) -> Error {
    Error::AuthUnavailable(format!("OAuth states in Redis: {:?}", e.kind()).into())
}

impl PendingLogins {
    async fn put(&self, state: [u8; 32], pending: Pending) -> Result<(), Error> {
        match self {
            PendingLogins::Local(cache) => {
                cache.insert(state, pending).await;
                Ok(())
            }
            PendingLogins::Redis(redis) => {
                let value = json!({
                    "app": &*pending.app,
                    "return_to": pending.return_to,
                    "binding": hex::encode(pending.binding),
                });
                redis::cmd("SET")
                    .arg(pending_key(&state))
                    .arg(value.to_string())
                    .arg("PX")
                    .arg(STATE_LIFETIME.as_millis() as u64)
                    .query_async::<()>(&mut redis.conn())
                    .await
                    .map_err(pending_failure)
            }
        }
    }

    /// The login `state` started, removed so that it can be used once.
    async fn take(&self, state: [u8; 32]) -> Result<Option<Pending>, Error> {
        match self {
            PendingLogins::Local(cache) => Ok(cache.remove(&state).await),
            PendingLogins::Redis(redis) => {
                let value: Option<String> = redis::cmd("GETDEL")
                    .arg(pending_key(&state))
                    .query_async(&mut redis.conn())
                    .await
                    .map_err(pending_failure)?;
                let Some(value) = value else {
                    return Ok(None);
                };
                let parsed = serde_json::from_str::<serde_json::Value>(&value)
                    .ok()
                    .and_then(|v| {
                        Some(Pending {
                            app: std::sync::Arc::from(v["app"].as_str()?),
                            return_to: v["return_to"].as_str()?.to_owned(),
                            binding: hex::decode(v["binding"].as_str()?).ok()?.try_into().ok()?,
                        })
                    });
                if parsed.is_none() {
                    tracing::error!("a pending OAuth login in Redis is malformed; refused");
                }
                Ok(parsed)
            }
        }
    }
}

/// WeChat's answers per OAuth code, and the browser logins in progress.
pub struct OauthState {
    answers: CodeExchanges<OauthGrant>,
    /// SHA-256 of the state -> the login it started. Removed on first use.
    pending: PendingLogins,
}

impl Default for OauthState {
    fn default() -> Self {
        Self::new()
    }
}

impl OauthState {
    /// State for one instance, in memory.
    pub fn new() -> Self {
        OauthState {
            answers: CodeExchanges::new(OAUTH_CODE_LIFETIME),
            // Bounded, so a flood of starts cannot grow memory without limit; past it, the oldest
            // unfinished logins are forgotten and have to be started again.
            pending: PendingLogins::Local(
                Cache::builder()
                    .max_capacity(200_000)
                    .time_to_live(STATE_LIFETIME)
                    .build(),
            ),
        }
    }

    /// State shared by every instance through Redis; `wait` as in [`CodeExchanges::shared`].
    pub fn shared(redis: SharedRedis, wait: Duration) -> Self {
        OauthState {
            answers: CodeExchanges::new(OAUTH_CODE_LIFETIME).shared(redis.clone(), wait),
            pending: PendingLogins::Redis(redis),
        }
    }
}

fn sha256_of(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0]);
    }
    hasher.finalize().into()
}

/// `return_to` as a browser will follow it: a path (and query) on this host, or `/` when absent.
///
/// Refused: anything not starting with exactly one `/` (`//evil`, `https://evil`, `evil`), any
/// backslash (browsers read `/\evil` as `//evil`), and control characters, spaces and non-ASCII
/// (browsers drop tabs and newlines, so `/\t/evil` would become `//evil`).
pub fn safe_return_to(raw: Option<&str>) -> Result<String, Error> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok("/".to_owned());
    };
    let bytes = raw.as_bytes();
    let plain = bytes.len() <= MAX_RETURN_TO
        && bytes[0] == b'/'
        && bytes.get(1).is_none_or(|b| *b != b'/')
        && bytes.iter().all(|b| b.is_ascii_graphic() && *b != b'\\');
    if !plain || raw.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(Error::BadReturnTo);
    }
    Ok(raw.to_owned())
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 may send several).
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| cookie_in(v, name))
}

/// The value of cookie `name` in one `Cookie` header value.
pub fn cookie_in<'v>(value: &'v str, name: &str) -> Option<&'v str> {
    value.split(';').find_map(|pair| {
        let (n, value) = pair.trim().split_once('=')?;
        (n == name && !value.is_empty()).then_some(value)
    })
}

/// A `Set-Cookie` value for one of wxgate's cookies: host-only, `Secure`, `HttpOnly`, `SameSite=Lax`
/// (sent on the top-level navigation back from WeChat, not on cross-site subrequests).
pub fn set_cookie(name: &'static str, value: String, max_age: Duration) -> HeaderValue {
    let cookie = Cookie::build((name, value))
        .path("/")
        .secure(true)
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
        ))
        .build();
    HeaderValue::try_from(cookie.to_string())
        .expect("cookie names and base64url values are valid header text")
}

fn redirect(location: &str) -> Result<Response<Body>, Error> {
    let location = HeaderValue::try_from(location)
        .map_err(|_| Error::Internal("a redirect target is not valid header text".into()))?;
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::FOUND;
    response.headers_mut().insert(header::LOCATION, location);
    Ok(no_store(response))
}

impl AuthService {
    /// The OAuth app a request names, or the only one configured.
    fn oauth_app(&self, name: Option<&str>) -> Result<&App, Error> {
        self.select_app(
            name,
            |kind| kind != AppKind::MiniProgram,
            AppChoice {
                unknown: "The \"app\" named is not a configured app of kind app, web or oa.",
                none: "No app of kind app, web or oa is configured on this gateway.",
                several: "Several OAuth apps are configured; name one with \"app\".",
            },
        )
    }

    /// A browser app (`web` or `oa` with a `public_url`) by its name in the path.
    fn browser_app(&self, name: &str) -> Result<(&App, &str), Error> {
        self.apps
            .iter()
            .find(|a| &*a.name == name && a.config.kind.is_browser())
            .and_then(|a| Some((a, a.config.public_url.as_deref()?)))
            .ok_or(Error::NotFound)
    }

    /// Exchanges an OAuth code and applies the identity rules; snapshot users are refused before
    /// anything is linked.
    async fn oauth_identity(&self, app: &App, code: &str) -> Result<NewSession, Error> {
        if !looks_like_code(code) {
            return Err(Error::InvalidCode);
        }
        let appid = app.config.appid.as_str();
        let grant = self
            .oauth
            .answers
            .exchange(
                appid,
                code,
                self.wechat
                    .oauth_access_token(appid, &app.config.secret, code),
            )
            .await?;
        if grant.snapshot_user {
            tracing::info!(app = %app.name, "login refused: a snapshot-mode visitor has no real WeChat user");
            return Err(Error::SnapshotUser);
        }
        let mut unionid = grant.unionid.clone();
        let mut profile = None;
        if app.config.fetch_userinfo && grant.scope != "snsapi_base" {
            // The profile is a courtesy: a failure to fetch it does not fail the login.
            match self
                .wechat
                .sns_userinfo(&grant.access_token, &grant.openid)
                .await
            {
                Ok(user) => {
                    unionid = unionid.or(user.unionid.filter(|u| !u.is_empty()));
                    profile =
                        Some(json!({ "nickName": user.nickname, "avatarUrl": user.headimgurl }));
                }
                Err(e) => {
                    tracing::warn!(app = %app.name, error = %e, "sns/userinfo failed; logging in without the profile");
                }
            }
        }
        let resolved = self
            .resolve_identity(LoginIds {
                appid,
                openid: &grant.openid,
                unionid: unionid.as_deref(),
            })
            .await?;
        tracing::info!(app = %app.name, kind = app.config.kind.as_str(), user_id = %resolved.user_id, new_user = resolved.created, "login");
        Ok(NewSession {
            user_id: resolved.user_id,
            openid: grant.openid,
            unionid,
            phone: resolved.phone,
            profile,
        })
    }

    /// `POST /oauth/login`: an OAuth code becomes a token pair.
    pub(super) async fn oauth_login(
        &self,
        request: OauthLoginRequest,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let app = self.oauth_app(request.app.as_deref())?;
        let result = async {
            let code = request
                .code
                .ok_or(Error::BadRequest(OAUTH_LOGIN_EXPECTED))?;
            let new = self.oauth_identity(app, &code).await?;
            self.start_session(app, new, None, now).await
        }
        .await;
        self.count_login(app, &result);
        result
    }

    /// `GET /oauth/{app}/start?return_to=`: sends the browser to WeChat's login page.
    pub(super) async fn oauth_start(
        &self,
        name: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, Error> {
        let (app, public_url) = self.browser_app(name)?;
        let return_to = query_param(query, "return_to");
        let return_to = safe_return_to(return_to.as_deref())?;
        // One binding cookie per browser, reused by logins started in other tabs meanwhile.
        let existing = cookie_value(headers, STATE_COOKIE)
            .filter(|v| v.len() == 43 && URL_SAFE_NO_PAD.decode(v).is_ok());
        let binding_cookie = match existing {
            Some(value) => value.to_owned(),
            None => URL_SAFE_NO_PAD.encode(random_bytes::<32>()),
        };
        let state = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        self.oauth
            .pending
            .put(
                sha256_of(&[state.as_bytes()]),
                Pending {
                    app: app.name.clone(),
                    return_to,
                    binding: sha256_of(&[binding_cookie.as_bytes()]),
                },
            )
            .await?;
        let callback = format!(
            "{public_url}{}/oauth/{}/callback",
            self.auth_prefix, app.name
        );
        // WeChat's official-account page insists on this parameter order.
        let (page, scope) = match app.config.kind {
            AppKind::Web => ("/connect/qrconnect", "snsapi_login"),
            _ => ("/connect/oauth2/authorize", app.config.scope),
        };
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("appid", &app.config.appid)
            .append_pair("redirect_uri", &callback)
            .append_pair("response_type", "code")
            .append_pair("scope", scope)
            .append_pair("state", &state)
            .finish();
        let mut response = redirect(&format!("{}{page}?{query}#wechat_redirect", self.open_base))?;
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(STATE_COOKIE, binding_cookie, STATE_LIFETIME),
        );
        Ok(response)
    }

    /// `GET /oauth/{app}/callback?code=&state=`: finishes a browser login.
    pub(super) async fn oauth_callback(
        &self,
        name: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let (app, _) = self.browser_app(name)?;
        let state = query_param(query, "state").ok_or(Error::InvalidState)?;
        // Consumed before anything else is checked: a state is tried once, whatever the outcome.
        let pending = self
            .oauth
            .pending
            .take(sha256_of(&[state.as_bytes()]))
            .await?
            .ok_or(Error::InvalidState)?;
        let bound = cookie_value(headers, STATE_COOKIE).is_some_and(|cookie| {
            bool::from(sha256_of(&[cookie.as_bytes()]).ct_eq(&pending.binding))
        });
        if pending.app != app.name || !bound {
            tracing::warn!(app = %app.name, "OAuth callback refused: its state belongs to another app or browser");
            return Err(Error::InvalidState);
        }
        let logged_in = async {
            let code = query_param(query, "code").ok_or(Error::LoginDeclined)?;
            let new = self.oauth_identity(app, &code).await?;
            // A browser session is carried by its cookie alone; its refresh token is never handed
            // out.
            let (session, _refresh_token) = self.new_session(app, &new, now)?;
            let token = self.tokens.mint_access_until(
                session.sid,
                session.user_id(),
                now,
                session.expires_at(),
            );
            self.sessions
                .insert(session, None)
                .await
                .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
            Ok(token)
        }
        .await;
        self.count_login(app, &logged_in);
        let token = logged_in?;
        let mut response = redirect(&pending.return_to)?;
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(SESSION_COOKIE, token, Duration::from_secs(self.refresh_ttl)),
        );
        Ok(response)
    }
}

/// One query parameter, decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_must_be_a_local_path() {
        assert_eq!(safe_return_to(None).unwrap(), "/");
        assert_eq!(safe_return_to(Some("")).unwrap(), "/");
        for ok in [
            "/",
            "/orders",
            "/orders?id=1&x=%2F%2F",
            "/a/b/../c",
            "/%E4%B8%AD",
        ] {
            assert_eq!(safe_return_to(Some(ok)).unwrap(), ok);
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "https://evil.example/",
            "http:evil.example",
            "javascript:alert(1)",
            "evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            " /orders",
            "/orders path",
            "/中文",
            "/\u{7f}",
        ] {
            assert!(
                matches!(safe_return_to(Some(bad)), Err(Error::BadReturnTo)),
                "{bad:?}"
            );
        }
        assert!(safe_return_to(Some(&format!("/{}", "a".repeat(MAX_RETURN_TO)))).is_err());
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; __Host-wxgate-state=s1"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("__Host-wxgate=tok"),
        );
        assert_eq!(cookie_value(&headers, SESSION_COOKIE), Some("tok"));
        assert_eq!(cookie_value(&headers, STATE_COOKIE), Some("s1"));
        assert_eq!(cookie_value(&headers, "theme"), Some("dark"));
        assert_eq!(cookie_value(&headers, "__Host-wxgat"), None);
    }

    #[test]
    fn cookies_are_host_only_secure_http_only_and_lax() {
        let value = set_cookie(SESSION_COOKIE, "abc".into(), Duration::from_secs(60));
        let text = value.to_str().unwrap();
        for part in [
            "__Host-wxgate=abc",
            "HttpOnly",
            "Secure",
            "SameSite=Lax",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(text.contains(part), "{text} lacks {part}");
        }
        assert!(!text.contains("Domain"), "{text}");
    }
}
