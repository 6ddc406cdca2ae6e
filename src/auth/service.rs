//! The login service: wxgate's endpoints under the auth prefix, and the authenticator that turns a bearer
//! token into an [`Identity`] on every proxied request.
//!
//! | endpoint | body | answer |
//! | --- | --- | --- |
//! | `POST /login` | `{"code", "app"?}` | a token pair ([`login`](super::login)) |
//! | `POST /refresh` | `{"refresh_token"}` | a new pair; the old refresh token is dead |
//! | `POST /logout` | bearer | 204; the session and its access tokens stop working at once |
//! | `GET /session` | bearer | the session's user and WeChat ids |
//! | `POST /phone` | bearer + `{"code"}` or `{"encryptedData", "iv"}` | the verified phone number ([`phone`](super::phone)) |
//! | `POST /userinfo` | bearer + `{"encryptedData", "iv", "rawData"?, "signature"?}` | user id, unionid, profile ([`open_data`](super::open_data)) |
//! | `POST /oauth/login` | `{"app"?, "code"}` | a token pair for an app, website or official account ([`oauth`](super::oauth)) |
//! | `GET /oauth/{app}/start`, `/callback` | `?return_to=` | the browser login of a website or official account, ending with the session cookie |
//!
//! `/logout` and `/session` accept the session cookie of a browser login as well as the bearer token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::login::CodeExchanges;
use super::oauth::{
    OAUTH_LOGIN_EXPECTED, OauthLoginRequest, OauthState, SESSION_COOKIE, cookie_value, set_cookie,
};
use super::open_data::OpenData;
use super::phone::{PHONE_EXPECTED, PhoneRequest};
use super::{AuthFuture, Authenticator, Identity, bearer_token};
use crate::body::{self, Body};
use crate::config::{AppConfig, AppKind, Config, Secret, SessionStoreConfig};
use crate::error::Error;
use crate::identity::{Identities, IdentityError, LoginIds, Resolved};
use crate::metrics::{Metrics, Verification};
use crate::session::memory::MemoryStore;
use crate::session::redis::RedisStore;
use crate::session::token::{TokenError, Tokens, new_refresh_token, parse_refresh_token};
use crate::session::{Rotation, Session, SessionApp, SessionIds, SessionStore, UserChange};
use crate::shared::SharedRedis;
use crate::wechat::access_token::{AccessTokens, LocalAccessTokens, RedisAccessTokens};
use crate::wechat::client::{CodeSession, WechatClient};

/// Largest body accepted by wxgate's own endpoints; the biggest legitimate one is a login carrying
/// encrypted user info, a few KiB.
pub const MAX_AUTH_BODY: usize = 64 * 1024;

/// Why the login service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Identity(#[from] crate::identity::StoreError),
    #[error("{0}")]
    Wechat(#[from] crate::wechat::client::WechatError),
    #[error("{0}")]
    Sessions(#[from] crate::session::StoreError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Everything the auth endpoints and the authenticator share.
pub struct AuthService {
    pub(super) apps: Vec<App>,
    pub(super) wechat: WechatClient,
    pub(super) identities: Identities,
    pub(super) sessions: Arc<dyn SessionStore>,
    pub(super) tokens: Tokens,
    pub(super) refresh_ttl: u64,
    pub(super) exchanges: CodeExchanges<CodeSession>,
    pub(super) watermark_max_age: u64,
    pub(super) metrics: Arc<Metrics>,
    pub(super) access_tokens: Arc<dyn AccessTokens>,
    /// Set when the instances share state through Redis.
    redis: Option<SharedRedis>,
    pub(super) oauth: OauthState,
    /// `server.auth_prefix`, for the OAuth callback URL.
    pub(super) auth_prefix: String,
    /// `wechat.open_base`, where browsers log in.
    pub(super) open_base: String,
}

/// What to tell a client whose login names no usable app.
pub(super) struct AppChoice {
    /// The name matches no app of the kinds served.
    pub unknown: &'static str,
    /// No app of those kinds is configured.
    pub none: &'static str,
    /// Several are, and the client named none.
    pub several: &'static str,
}

/// Where a request's credentials came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Bearer,
    Cookie,
}

/// The request's credential: the bearer token, else the session cookie of a browser login.
pub fn credential(headers: &HeaderMap) -> Option<(&str, Via)> {
    match bearer_token(headers) {
        Some(token) => Some((token, Via::Bearer)),
        None => cookie_value(headers, SESSION_COOKIE).map(|t| (t, Via::Cookie)),
    }
}

/// A configured app, with its name and appid shared by every session of it.
pub(super) struct App {
    pub name: Arc<str>,
    pub ids: Arc<SessionApp>,
    pub config: AppConfig,
}

impl App {
    fn new(config: &AppConfig) -> App {
        let ids = SessionApp::new(&config.name, &config.appid);
        App {
            name: ids.name.clone(),
            ids,
            config: config.clone(),
        }
    }
}

/// What a login knows about the user it starts a session for.
pub(super) struct NewSession {
    pub user_id: String,
    pub openid: String,
    pub unionid: Option<String>,
    pub phone: Option<String>,
    /// Decrypted user info sent with the login, returned to the client.
    pub profile: Option<serde_json::Value>,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state logins and sessions keep: in this process for one instance, in Redis (with a local
/// cache) when several instances share the work.
struct NodeState {
    sessions: Arc<dyn SessionStore>,
    access_tokens: Arc<dyn AccessTokens>,
    exchanges: CodeExchanges<CodeSession>,
    oauth: OauthState,
    redis: Option<SharedRedis>,
}

impl NodeState {
    async fn open(
        config: &Config,
        wechat: &WechatClient,
        apps: &[App],
    ) -> Result<NodeState, StartError> {
        let exchanges = CodeExchanges::new(super::login::CODE_LIFETIME);
        Ok(match &config.session.store {
            SessionStoreConfig::Memory => NodeState {
                sessions: Arc::new(MemoryStore::new(config.session.max_sessions)),
                access_tokens: Arc::new(LocalAccessTokens::new(wechat.clone())),
                exchanges,
                oauth: OauthState::new(),
                redis: None,
            },
            SessionStoreConfig::Redis { url } => {
                let redis = SharedRedis::open(url.expose()).await?;
                let store = RedisStore::open(
                    redis.clone(),
                    config.session.refresh_ttl,
                    apps.iter().map(|app| app.ids.clone()).collect(),
                );
                // Another instance's exchange of the same code takes at most one WeChat call.
                let wait = config.wechat.timeout + Duration::from_secs(1);
                NodeState {
                    sessions: Arc::new(store),
                    access_tokens: Arc::new(RedisAccessTokens::new(
                        wechat.clone(),
                        redis.clone(),
                        config.wechat.timeout,
                    )),
                    exchanges: exchanges.shared(redis.clone(), wait),
                    oauth: OauthState::shared(redis.clone(), wait),
                    redis: Some(redis),
                }
            }
        })
    }
}

impl AuthService {
    /// The login service for `config`, or `None` when no app is configured (then nobody can log in and
    /// `/auth/*` answers 404).
    pub async fn from_config(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Option<AuthService>, StartError> {
        let Some(signing_key) = &config.session.signing_key else {
            return Ok(None);
        };
        if config.apps.is_empty() {
            return Ok(None);
        }
        let wechat = WechatClient::new(&config.wechat)?.with_metrics(metrics.clone());
        let apps: Vec<App> = config.apps.iter().map(App::new).collect();
        let state = NodeState::open(config, &wechat, &apps).await?;
        Ok(Some(AuthService {
            apps,
            wechat: wechat.clone(),
            access_tokens: state.access_tokens,
            redis: state.redis,
            identities: Identities::open(&config.identity).await?,
            sessions: state.sessions,
            tokens: Tokens::new(signing_key, config.session.access_ttl.as_secs()),
            refresh_ttl: config.session.refresh_ttl.as_secs(),
            exchanges: state.exchanges,
            oauth: state.oauth,
            auth_prefix: config.server.auth_prefix.clone(),
            open_base: config.wechat.open_base.clone(),
            watermark_max_age: config.wechat.watermark_max_age.as_secs(),
            metrics,
        }))
    }

    /// Answers `method path` under the auth prefix (`path` has the prefix removed).
    pub async fn endpoint(
        &self,
        path: &str,
        request: Request<Body>,
    ) -> Result<Response<Body>, Error> {
        let (parts, body) = request.into_parts();
        let now = unix_now();
        let headers = &parts.headers;
        let query = parts.uri.query();
        // Each endpoint's future is boxed: they differ in size by tens of kilobytes (the ones that
        // call WeChat are the largest), and inline this one would be as large as the largest,
        // however small the request.
        if let Some(rest) = path.strip_prefix("/oauth/")
            && let Some((app, step)) = rest.split_once('/')
        {
            return match (step, parts.method) {
                ("start", Method::GET) => Box::pin(self.oauth_start(app, query, headers)).await,
                ("callback", Method::GET) => {
                    Box::pin(self.oauth_callback(app, query, headers, now)).await
                }
                ("start" | "callback", _) => Err(Error::MethodNotAllowed("GET")),
                _ => Err(Error::NotFound),
            };
        }
        match (path, parts.method) {
            ("/oauth/login", Method::POST) => {
                let request: OauthLoginRequest = read_json(body, OAUTH_LOGIN_EXPECTED).await?;
                Box::pin(self.oauth_login(request, now)).await
            }
            ("/login", Method::POST) => {
                let request: LoginRequest = read_json(body, LOGIN_EXPECTED).await?;
                Box::pin(self.login(request, now)).await
            }
            ("/refresh", Method::POST) => {
                let request: RefreshRequest = read_json(body, REFRESH_EXPECTED).await?;
                Box::pin(self.refresh(request, now)).await
            }
            ("/logout", Method::POST) => self.logout(headers, now).await,
            ("/session", Method::GET | Method::HEAD) => self.session(headers, now).await,
            ("/userinfo", Method::POST) => {
                let data: OpenData = read_json(body, USERINFO_EXPECTED).await?;
                Box::pin(self.userinfo(headers, data, now)).await
            }
            ("/phone", Method::POST) => {
                let request: PhoneRequest = read_json(body, PHONE_EXPECTED).await?;
                Box::pin(self.phone(headers, request, now)).await
            }
            ("/login" | "/refresh" | "/logout" | "/userinfo" | "/phone" | "/oauth/login", _) => {
                Err(Error::MethodNotAllowed("POST"))
            }
            ("/session", _) => Err(Error::MethodNotAllowed("GET, HEAD")),
            _ => Err(Error::NotFound),
        }
    }

    /// The mini program a login is for: the one named, or the only one configured.
    pub(super) fn mini_program(&self, name: Option<&str>) -> Result<&App, Error> {
        self.select_app(
            name,
            |kind| kind == AppKind::MiniProgram,
            AppChoice {
                unknown: "The \"app\" named is not a configured mini program.",
                none: "No mini program is configured on this gateway.",
                several: "Several mini programs are configured; name one with \"app\".",
            },
        )
    }

    /// The app of a kind that `fits` a login is for: the one `name`d, or the only one that fits.
    pub(super) fn select_app(
        &self,
        name: Option<&str>,
        fits: fn(AppKind) -> bool,
        messages: AppChoice,
    ) -> Result<&App, Error> {
        let mut candidates = self
            .apps
            .iter()
            .filter(|a| fits(a.config.kind) && name.is_none_or(|n| n == &*a.name));
        match (candidates.next(), candidates.next(), name) {
            (Some(app), None, _) => Ok(app),
            (None, _, Some(_)) => Err(Error::BadRequest(messages.unknown)),
            (None, _, None) => Err(Error::BadRequest(messages.none)),
            (Some(_), Some(_), _) => Err(Error::BadRequest(messages.several)),
        }
    }

    /// Counts a login attempt of `app` by its outcome.
    pub(super) fn count_login<T>(&self, app: &App, result: &Result<T, Error>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.metrics.count_login(&app.name, outcome);
    }

    /// Creates a session for a resolved login and answers with its token pair.
    /// `session_key` is the one this login's exchange got from WeChat (mini programs).
    pub(super) async fn start_session(
        &self,
        app: &App,
        mut new: NewSession,
        session_key: Option<&Secret>,
        now: u64,
    ) -> Result<Response<Body>, Error> {
        let profile = new.profile.take();
        let (session, refresh_token) = self.new_session(app, &new, now)?;
        let response = self.token_response(&session, refresh_token, profile, now);
        self.sessions
            .insert(session, session_key)
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        Ok(response)
    }

    /// A session for a resolved login, and its first refresh token.
    pub(super) fn new_session(
        &self,
        app: &App,
        new: &NewSession,
        now: u64,
    ) -> Result<(Session, String), Error> {
        let sid = crate::session::SessionId::random();
        let (refresh_token, refresh) = new_refresh_token(sid);
        let ids = SessionIds {
            user_id: &new.user_id,
            openid: &new.openid,
            unionid: new.unionid.as_deref(),
            phone: new.phone.as_deref(),
        };
        let session = Session::new(
            sid,
            app.ids.clone(),
            ids,
            now,
            now + self.refresh_ttl,
            refresh,
        )
        .map_err(|e| Error::Internal(format!("cannot start a session: {e}")))?;
        Ok((session, refresh_token))
    }

    /// The token pair, plus the profile when the login carried user info.
    fn token_response(
        &self,
        session: &Session,
        refresh_token: String,
        profile: Option<serde_json::Value>,
        now: u64,
    ) -> Response<Body> {
        // Written out by hand: serde went through every character of the tokens to escape
        // nothing, and grew its buffer twice on the way.
        let access_token = self.tokens.mint_access(session.sid, session.user_id(), now);
        let mut out = Vec::with_capacity(
            access_token.len() + refresh_token.len() + session.user_id().len() + 192,
        );
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(b"{\"access_token\":");
        body::push_json_str(&mut out, &access_token);
        out.extend_from_slice(b",\"token_type\":\"Bearer\",\"expires_in\":");
        out.extend_from_slice(number.format(self.tokens.access_ttl()).as_bytes());
        out.extend_from_slice(b",\"refresh_token\":");
        body::push_json_str(&mut out, &refresh_token);
        out.extend_from_slice(b",\"refresh_expires_in\":");
        out.extend_from_slice(
            number
                .format(session.expires_at().saturating_sub(now))
                .as_bytes(),
        );
        out.extend_from_slice(b",\"user_id\":");
        body::push_json_str(&mut out, session.user_id());
        out.extend_from_slice(b",\"unionid_known\":");
        out.extend_from_slice(match session.unionid() {
            Some(_) => b"true",
            None => b"false",
        });
        if let Some(profile) = profile {
            out.extend_from_slice(b",\"profile\":");
            // Writing a Value to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, &profile);
        }
        out.push(b'}');
        no_store(body::json_text(StatusCode::OK, out))
    }

    async fn refresh(&self, request: RefreshRequest, now: u64) -> Result<Response<Body>, Error> {
        let presented = request
            .refresh_token
            .ok_or(Error::BadRequest(REFRESH_EXPECTED))?;
        let (sid, hash) = parse_refresh_token(&presented).ok_or(Error::InvalidToken)?;
        let (next_token, next_hash) = new_refresh_token(sid);
        let rotation = self
            .sessions
            .rotate_refresh(&sid, &hash, next_hash, now, now + self.refresh_ttl)
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        match rotation {
            Rotation::Rotated(session) => Ok(self.token_response(&session, next_token, None, now)),
            Rotation::Replayed { user_id } => {
                tracing::warn!(%user_id, "a used refresh token was presented again; the session is revoked");
                Err(Error::InvalidToken)
            }
            Rotation::Unknown => Err(Error::InvalidToken),
        }
    }

    async fn logout(&self, headers: &HeaderMap, now: u64) -> Result<Response<Body>, Error> {
        let (token, via) = credential(headers).ok_or(Error::LoginRequired)?;
        let claims = self.verify(token, now)?;
        self.sessions
            .revoke(&claims.sid)
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        let mut response = Response::new(body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        if via == Via::Cookie {
            response.headers_mut().append(
                http::header::SET_COOKIE,
                set_cookie(SESSION_COOKIE, String::new(), std::time::Duration::ZERO),
            );
        }
        Ok(no_store(response))
    }

    async fn session(&self, headers: &HeaderMap, now: u64) -> Result<Response<Body>, Error> {
        let (token, _) = credential(headers).ok_or(Error::LoginRequired)?;
        let session = self.live_session(token, now).await?;
        let mut view = json!({
            "user_id": session.user_id(),
            "app": &**session.app(),
            "appid": session.appid(),
            "openid": session.openid(),
            "expires_at": session.expires_at(),
        });
        if let Some(unionid) = session.unionid() {
            view["unionid"] = json!(unionid);
        }
        Ok(no_store(body::json(StatusCode::OK, &view)))
    }

    fn verify(&self, token: &str, now: u64) -> Result<crate::session::token::AccessClaims, Error> {
        self.tokens.verify_access(token, now).map_err(|e| match e {
            TokenError::Expired => Error::TokenExpired,
            TokenError::Invalid => Error::InvalidToken,
        })
    }

    /// The live session an access token names.
    pub(super) async fn live_session(&self, token: &str, now: u64) -> Result<Arc<Session>, Error> {
        let claims = self.verify(token, now).inspect_err(|e| {
            self.metrics.count_verification(match e {
                Error::TokenExpired => Verification::Expired,
                _ => Verification::Invalid,
            });
        })?;
        let session = self
            .sessions
            .get(&claims.sid, now)
            .await
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))?;
        self.metrics.count_verification(match session {
            Some(_) => Verification::Ok,
            None => Verification::UnknownSession,
        });
        session.ok_or(Error::InvalidToken)
    }

    /// Applies the identity rules to one login's ids. When they show that other users are this same
    /// person (rule 4), the merge is counted and logged, and every live session of a merged user
    /// carries the survivor (and the unionid) from its next request on.
    pub(super) async fn resolve_identity(&self, ids: LoginIds<'_>) -> Result<Resolved, Error> {
        let resolved = self.identities.resolve(ids).await.map_err(|e| match e {
            IdentityError::NoUnionid => Error::UnionidUnavailable,
            IdentityError::Store(e) => Error::IdentityUnavailable(Box::new(e)),
        })?;
        if !resolved.merged.is_empty() {
            self.metrics.count_merges(resolved.merged.len());
            tracing::info!(user_id = %resolved.user_id, merged = ?resolved.merged, "users merged: a unionid showed they are one person");
            for from in &resolved.merged {
                self.repoint(from, &resolved.user_id, ids.unionid).await?;
            }
        }
        Ok(resolved)
    }

    /// Points the live sessions of `from` at `into`, recording the unionid when known.
    pub(super) async fn repoint(
        &self,
        from: &str,
        into: &str,
        unionid: Option<&str>,
    ) -> Result<(), Error> {
        let change = UserChange {
            unionid,
            phone: None,
        };
        self.sessions
            .repoint_user(from, into, change)
            .await
            .map(drop)
            .map_err(|e| Error::AuthUnavailable(Box::new(e)))
    }

    /// The live mini-program session of a request's bearer token, and its app: user info and phone
    /// numbers come only from mini programs.
    pub(super) async fn mini_program_session(
        &self,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<(Arc<Session>, &App), Error> {
        let token = bearer_token(headers).ok_or(Error::LoginRequired)?;
        let session = self.live_session(token, now).await?;
        let app = self
            .apps
            .iter()
            .find(|a| Arc::ptr_eq(&a.ids, session.app_ids()))
            .ok_or(Error::InvalidToken)?;
        if app.config.kind != AppKind::MiniProgram {
            return Err(Error::BadRequest(
                "This endpoint serves mini-program sessions only; this session is from an app, website or official account.",
            ));
        }
        Ok((session, app))
    }

    /// Whether each store answers, for `/readyz`: (sessions, identities), checked at once.
    pub async fn ready(
        &self,
    ) -> (
        Result<(), crate::session::StoreError>,
        Result<(), crate::identity::StoreError>,
    ) {
        tokio::join!(self.sessions.ping(), self.identities.ping())
    }

    /// The identity rules and store, for the admin lookup.
    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    /// The Redis connection the instances share state through, when `session.store` is Redis.
    pub fn redis(&self) -> Option<SharedRedis> {
        self.redis.clone()
    }

    /// Live sessions, for metrics.
    pub fn sessions(&self) -> &Arc<dyn SessionStore> {
        &self.sessions
    }
}

impl Authenticator for AuthService {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let session = self.live_session(token, unix_now()).await?;
            Ok(Some(Identity::of(session)))
        })
    }
}

pub(super) const LOGIN_EXPECTED: &str =
    "The body must be JSON like {\"code\": \"<code from wx.login()>\"}.";
const REFRESH_EXPECTED: &str = "The body must be JSON like {\"refresh_token\": \"...\"}.";
const USERINFO_EXPECTED: &str = "The body must be JSON like {\"encryptedData\": \"...\", \"iv\": \"...\"}, from wx.getUserInfo().";

#[derive(Deserialize)]
pub(super) struct LoginRequest {
    pub code: Option<String>,
    pub app: Option<String>,
    /// User info from the same `wx.login()` round, decrypted with this exchange's session_key.
    #[serde(flatten)]
    pub open_data: OpenData,
}

#[derive(Deserialize)]
struct RefreshRequest {
    refresh_token: Option<String>,
}

/// Reads a JSON body of at most [`MAX_AUTH_BODY`] bytes.
async fn read_json<T: DeserializeOwned>(
    mut body: Body,
    expected: &'static str,
) -> Result<T, Error> {
    // Read frame by frame rather than through `Limited`: its error conversion over a boxed body
    // trips the compiler's `Send` inference in the request future.
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Error::BadRequest("The request body could not be read."))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_AUTH_BODY {
                return Err(Error::PayloadTooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    serde_json::from_slice(&bytes).map_err(|_| Error::BadRequest(expected))
}

/// Token responses must never be cached by a browser or an intermediary.
pub(super) fn no_store(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}
