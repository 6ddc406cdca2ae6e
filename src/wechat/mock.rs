//! A mock of the WeChat server API, faithful to `shared/docs/wechat-protocol.md`, shared by the
//! integration tests, the demo and the benchmarks. It is never on wxgate's own request path.
//!
//! Behaviour, as WeChat's: codes are single use and expire after 5 minutes; every `wx.login()` brings a
//! new session_key, which the client's open data is encrypted with and which exchanging the code
//! reveals to the server, and the previous one dies; unionid only for apps
//! bound to an Open Platform account; business errors are HTTP 200 with `errcode` and an `errmsg` that
//! ends in a changing `rid`; `sns/*` is served as `text/plain`; at most 100 logins per user per minute.
//!
//! Also `cgi-bin/stable_token` (the same token while valid, rotated 5 minutes before expiry with both
//! valid meanwhile), `wxa/business/getuserphonenumber` (single-use phone codes, bound to the openid),
//! `wxa/checksession` and `wxa/resetusersessionkey`; `cgi-bin`/`wxa` replies come as
//! `application/json; encoding=utf-8`.
//!
//! OAuth (mobile app, website, official account): `sns/oauth2/access_token` with codes that live 10
//! minutes (app, web) or 5 minutes (oa), single use, carrying the scope they were granted; unionid only
//! for bound apps and, on official accounts, only with `snsapi_userinfo`; snapshot users
//! (`is_snapshotuser: 1`, a virtual openid, no unionid); `sns/userinfo` and `sns/auth` with the user
//! access token. The browser pages `connect/qrconnect` (website) and `connect/oauth2/authorize`
//! (official account) redirect straight back with a code, for the WeChat user the browser is "signed
//! in" as: the `wx_user` cookie, else the default set with [`MockWechat::set_browser_user`]. A
//! `wx_snapshot=1` cookie makes that visit a snapshot-mode one, `wx_decline=1` declines consent.
//!
//! Control, from Rust ([`MockWechat`]'s methods) or over HTTP under `/__mock/` (for tests in other
//! languages): register apps, play `wx.login()` for a user (mint a code), an OAuth consent of the app
//! or the website, `wx.getUserInfo()` and the phone button, read a user's current session_key, revoke an app's access_token, inject a fault or a
//! delay for the next N calls of an endpoint, count calls, move the clock forward.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::body::{self, Body};

/// How long a `wx.login()` code lives.
pub const CODE_TTL: Duration = Duration::from_secs(5 * 60);
/// The fewest codes the mock keeps before it looks for expired ones to forget.
const PRUNE_CODES_FROM: usize = 4096;
/// WeChat's login rate limit per user.
pub const LOGINS_PER_USER_PER_MINUTE: usize = 100;

/// The path of the login endpoint, as faults and call counts name it.
pub const JSCODE2SESSION: &str = "/sns/jscode2session";
/// The app access_token endpoint (normal mode: the same token while it is valid).
pub const STABLE_TOKEN: &str = "/cgi-bin/stable_token";
/// The phone-number endpoint.
pub const PHONE_NUMBER: &str = "/wxa/business/getuserphonenumber";
pub const CHECK_SESSION: &str = "/wxa/checksession";
pub const RESET_SESSION_KEY: &str = "/wxa/resetusersessionkey";
/// The OAuth code exchange of apps, websites and official accounts.
pub const OAUTH_ACCESS_TOKEN: &str = "/sns/oauth2/access_token";
pub const SNS_USERINFO: &str = "/sns/userinfo";
pub const SNS_AUTH: &str = "/sns/auth";
/// The website QR login page (on open.weixin.qq.com).
pub const QRCONNECT: &str = "/connect/qrconnect";
/// The official-account authorize page (on open.weixin.qq.com).
pub const OAUTH_AUTHORIZE: &str = "/connect/oauth2/authorize";
/// How long the OAuth code of a mobile app or website lives.
pub const OAUTH_CODE_TTL: Duration = Duration::from_secs(10 * 60);
/// How long the OAuth code of an official-account page lives.
pub const OA_CODE_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a user access token (OAuth) lives.
pub const USER_TOKEN_TTL: Duration = Duration::from_secs(7200);
/// How long an access_token lives.
pub const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(7200);
/// stable_token rotates this close to expiry, and the old token stays valid this long after.
pub const TOKEN_OVERLAP: Duration = Duration::from_secs(5 * 60);

/// Something to do instead of (or before) answering normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer HTTP 200 with this `errcode` (the request is not processed).
    Errcode(i64),
    /// Answer with this HTTP status and an HTML page.
    Status(u16),
    /// Answer HTTP 200 with an HTML page, as a broken gateway in front of WeChat does.
    Html,
    /// Answer HTTP 200 with a body that is not JSON.
    Garbage,
    /// Wait this long, then answer normally.
    Delay(Duration),
}

/// Where an OAuth code comes from, which decides its lifetime and scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OauthKind {
    /// A mobile app's `SendAuth` (scope `snsapi_userinfo`).
    App,
    /// A website's QR login (scope `snsapi_login`).
    Web,
    /// An official-account page, `snsapi_base` (silent, no unionid) or `snsapi_userinfo`.
    Oa { userinfo: bool },
    /// An official-account page opened in snapshot mode: a virtual user.
    OaSnapshot,
}

impl OauthKind {
    fn ttl(self) -> Duration {
        match self {
            OauthKind::App | OauthKind::Web => OAUTH_CODE_TTL,
            OauthKind::Oa { .. } | OauthKind::OaSnapshot => OA_CODE_TTL,
        }
    }

    fn scope(self) -> &'static str {
        match self {
            OauthKind::App | OauthKind::Oa { userinfo: true } => "snsapi_userinfo",
            OauthKind::Web => "snsapi_login",
            OauthKind::Oa { userinfo: false } | OauthKind::OaSnapshot => "snsapi_base",
        }
    }
}

#[derive(Debug)]
struct OauthCode {
    appid: String,
    user: String,
    kind: OauthKind,
    issued_at: Instant,
    used: bool,
}

#[derive(Debug)]
struct UserToken {
    appid: String,
    openid: String,
    user: String,
    scope: &'static str,
    expires_at: Instant,
}

#[derive(Debug, Clone)]
struct App {
    secret: String,
    /// Bound to an Open Platform account: replies carry unionid.
    bound: bool,
}

#[derive(Debug)]
struct IssuedCode {
    appid: String,
    user: String,
    issued_at: Instant,
    used: bool,
    /// The exchange leaves unionid out even for a bound app, as it did for users of older accounts.
    hide_unionid: bool,
    /// Made up by benchmark mode: not counted against the user's per-minute quota.
    unlimited: bool,
    /// `wx.login()` is what rotates the session_key: the client's data is encrypted with this key
    /// from the moment the code exists, and exchanging the code reveals it to the server.
    session_key: String,
}

#[derive(Debug)]
struct AppToken {
    current: String,
    expires_at: Instant,
    /// The token before a rotation, valid until the given time.
    previous: Option<(String, Instant)>,
}

#[derive(Debug)]
struct PhoneCode {
    appid: String,
    user: String,
    phone: String,
    issued_at: Instant,
    used: bool,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, AppToken>,
    phone_codes: HashMap<String, PhoneCode>,
    apps: HashMap<String, App>,
    codes: HashMap<String, IssuedCode>,
    /// (appid, openid) -> the one valid session_key, as the server learned it by exchanging a code.
    session_keys: HashMap<(String, String), String>,
    /// (appid, user) -> the session_key of the user's latest `wx.login()`, the one their client holds.
    client_keys: HashMap<(String, String), String>,
    /// endpoint -> faults for the next calls, first first.
    faults: HashMap<String, Vec<Fault>>,
    calls: HashMap<String, u64>,
    /// (appid, user) -> times of recent successful logins.
    recent_logins: HashMap<(String, String), Vec<Instant>>,
    /// Added to the real clock, to expire codes without waiting.
    skew: Duration,
    /// Accept codes nobody minted (benchmarks post random codes); see [`MockWechat::accept_any_code`].
    any_code: bool,
    /// `codes` is pruned of expired ones when it reaches this size.
    prune_codes_at: usize,
    oauth_codes: HashMap<String, OauthCode>,
    user_tokens: HashMap<String, UserToken>,
    /// The WeChat user a browser without a `wx_user` cookie is signed in as.
    browser_user: Option<String>,
}

impl State {
    fn now(&self) -> Instant {
        Instant::now() + self.skew
    }

    /// Plays `wx.login()`: a fresh code for `user` in `appid`.
    fn mint_code(&mut self, appid: &str, user: &str) -> String {
        let code = new_code();
        self.issue(code.clone(), appid, user);
        code
    }

    fn issue(&mut self, code: String, appid: &str, user: &str) {
        let session_key = new_session_key();
        self.client_keys
            .insert((appid.to_owned(), user.to_owned()), session_key.clone());
        let issued_at = self.now();
        self.codes.insert(
            code,
            IssuedCode {
                appid: appid.to_owned(),
                user: user.to_owned(),
                issued_at,
                used: false,
                hide_unionid: false,
                unlimited: false,
                session_key,
            },
        );
        // Expired codes answer 40029 whether they are kept or not: past a size, forget them, so a
        // mock serving a benchmark or a long demo does not grow without bound.
        if self.codes.len() >= self.prune_codes_at {
            let now = self.now();
            self.codes
                .retain(|_, c| now.duration_since(c.issued_at) <= CODE_TTL);
            self.prune_codes_at = (self.codes.len() * 2).max(PRUNE_CODES_FROM);
        }
    }

    /// Plays an OAuth consent of `user` in `appid`: a fresh code of that kind.
    fn mint_oauth_code(&mut self, appid: &str, user: &str, kind: OauthKind) -> String {
        let code = new_code();
        let issued_at = self.now();
        self.oauth_codes.insert(
            code.clone(),
            OauthCode {
                appid: appid.to_owned(),
                user: user.to_owned(),
                kind,
                issued_at,
                used: false,
            },
        );
        code
    }

    /// The appid an access_token belongs to, while it is valid.
    fn app_of_token(&self, token: &str) -> Option<String> {
        let now = self.now();
        self.tokens.iter().find_map(|(appid, t)| {
            let current = t.current == token && now < t.expires_at;
            let previous = t
                .previous
                .as_ref()
                .is_some_and(|(p, until)| p == token && now < *until);
            (current || previous).then(|| appid.clone())
        })
    }

    /// The app whose valid access_token the request's `access_token` parameter is, or WeChat's 40001.
    fn authorize(&self, query: &HashMap<String, String>) -> Result<String, Value> {
        query
            .get("access_token")
            .and_then(|t| self.app_of_token(t))
            .ok_or_else(|| {
                errcode(
                    40001,
                    "invalid credential, access_token is invalid or not latest",
                )
            })
    }

    /// Encrypts `plain` with the session_key `user`'s client holds in `appid`.
    fn seal_for_client(&self, appid: &str, user: &str, plain: &Value) -> Option<(String, String)> {
        let key = self.client_keys.get(&(appid.to_owned(), user.to_owned()))?;
        let iv: [u8; 16] = random_bytes();
        let encrypted =
            crate::wechat::crypto::encrypt(key, &iv, plain.to_string().as_bytes()).ok()?;
        Some((encrypted, STANDARD.encode(iv)))
    }

    /// Unix seconds on the mock's clock.
    fn unix_now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + self.skew.as_secs()
    }

    /// Plays `wx.getUserInfo()` for `user` in `appid`: the anonymised profile (as WeChat gives it
    /// since 2021) with openId, unionId and a watermark, encrypted with the current session_key.
    /// `None` when the user never called `wx.login()` in that app.
    fn user_info(&self, appid: &str, user: &str) -> Option<UserInfo> {
        let openid = openid_of(appid, user);
        let key = self.client_keys.get(&(appid.to_owned(), user.to_owned()))?;
        let profile = json!({
            "nickName": "微信用户",
            "gender": 0,
            "language": "",
            "city": "",
            "province": "",
            "country": "",
            "avatarUrl": "https://thirdwx.qlogo.cn/mmopen/vi_32/POgEwh4mIHO4nibH0KlMECNjjGxQUq24ZEaGT4poC6icRiccVGKSyXwibcPq4BWmiaIGuG1icwxaQX6grC9VemZoJ8rg/132",
        });
        let raw_data = profile.to_string();
        let mut full = profile;
        full["openId"] = json!(openid);
        full["unionId"] = json!(unionid_of(user));
        full["watermark"] = json!({ "timestamp": self.unix_now(), "appid": appid });
        let (encrypted_data, iv) = self.seal_for_client(appid, user, &full)?;
        Some(UserInfo {
            encrypted_data,
            iv,
            signature: crate::wechat::crypto::raw_data_signature(&raw_data, key),
            raw_data,
        })
    }

    /// A phone-button code (64 hex digits, single use, 5 minutes) for `user`'s number `phone`.
    fn mint_phone_code(&mut self, appid: &str, user: &str, phone: &str) -> String {
        let code = hex::encode(random_bytes::<32>());
        let issued_at = self.now();
        self.phone_codes.insert(
            code.clone(),
            PhoneCode {
                appid: appid.to_owned(),
                user: user.to_owned(),
                phone: phone.to_owned(),
                issued_at,
                used: false,
            },
        );
        code
    }

    fn phone_info(&self, appid: &str, phone: &str) -> Value {
        json!({
            "phoneNumber": phone,
            "purePhoneNumber": phone,
            "countryCode": "86",
            "watermark": { "timestamp": self.unix_now(), "appid": appid },
        })
    }

    fn add_fault(&mut self, endpoint: &str, fault: Fault, times: usize) {
        self.faults
            .entry(endpoint.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    fn next_fault(&mut self, endpoint: &str) -> Option<Fault> {
        let queue = self.faults.get_mut(endpoint)?;
        (!queue.is_empty()).then(|| queue.remove(0))
    }
}

/// What `wx.getUserInfo()` hands a mini program: encrypted with the user's current session_key.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    pub encrypted_data: String,
    pub iv: String,
    pub raw_data: String,
    pub signature: String,
}

/// A running mock WeChat; it stops when dropped.
pub struct MockWechat {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockWechat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The openid WeChat gives `user` in app `appid`: 28 characters of `[A-Za-z0-9_-]` starting with `o`,
/// different in every app.
pub fn openid_of(appid: &str, user: &str) -> String {
    id28(&format!("openid:{appid}:{user}"))
}

/// The unionid of `user`: the same in every app of the Open Platform account.
pub fn unionid_of(user: &str) -> String {
    id28(&format!("unionid:{user}"))
}

fn id28(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let mut id = String::from("o");
    id.push_str(&URL_SAFE_NO_PAD.encode(digest)[..27]);
    id
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    bytes
}

/// A `wx.login()` code: 32 alphanumerics.
fn new_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    random_bytes::<32>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// A session_key: 16 random bytes in standard base64 (24 characters).
fn new_session_key() -> String {
    STANDARD.encode(random_bytes::<16>())
}

fn rid() -> String {
    let b = random_bytes::<12>();
    format!(
        "{}-{}-{}",
        hex::encode(&b[..4]),
        hex::encode(&b[4..8]),
        hex::encode(&b[8..])
    )
}

impl MockWechat {
    /// Serves on `listener` until dropped.
    pub fn start(listener: TcpListener) -> std::io::Result<MockWechat> {
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let task_state = state.clone();
        let task = crate::server::spawn_plain(listener, move |request| {
            let state = task_state.clone();
            async move { handle(request, &state).await }
        });
        Ok(MockWechat { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for `wechat.api_base`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("mock state not poisoned")
    }

    /// Registers an app; `bound` apps return unionid from jscode2session.
    pub fn add_app(&self, appid: &str, secret: &str, bound: bool) {
        self.state().apps.insert(
            appid.to_owned(),
            App {
                secret: secret.to_owned(),
                bound,
            },
        );
    }

    /// Plays `wx.login()` for `user` in `appid`: returns a fresh code.
    pub fn login_code(&self, appid: &str, user: &str) -> String {
        self.state().mint_code(appid, user)
    }

    /// Plays `wx.login()` for a user whose exchange returns no unionid although the app is bound, as
    /// WeChat did for many users of older accounts.
    pub fn login_code_without_unionid(&self, appid: &str, user: &str) -> String {
        let mut state = self.state();
        let code = state.mint_code(appid, user);
        if let Some(issued) = state.codes.get_mut(&code) {
            issued.hide_unionid = true;
        }
        code
    }

    /// Plays an OAuth consent of `user` in `appid` (a mobile app's `SendAuth`, a website QR scan, an
    /// official-account authorize): a fresh code of that kind.
    pub fn oauth_code(&self, appid: &str, user: &str, kind: OauthKind) -> String {
        self.state().mint_oauth_code(appid, user, kind)
    }

    /// Every user access token `sns/oauth2/access_token` has handed out (for tests that check they
    /// never leak).
    pub fn user_access_tokens(&self) -> Vec<String> {
        self.state().user_tokens.keys().cloned().collect()
    }

    /// The WeChat user that browsers without a `wx_user` cookie are signed in as on the authorize
    /// pages.
    pub fn set_browser_user(&self, user: &str) {
        self.state().browser_user = Some(user.to_owned());
    }

    /// The session_key WeChat currently holds for (appid, openid), if any login happened.
    pub fn session_key(&self, appid: &str, openid: &str) -> Option<String> {
        self.state()
            .session_keys
            .get(&(appid.to_owned(), openid.to_owned()))
            .cloned()
    }

    /// Plays `wx.getUserInfo()` for `user` in `appid` (after a login there): encrypted user info with
    /// openId, unionId and a fresh watermark, plus rawData and its signature.
    pub fn user_info(&self, appid: &str, user: &str) -> Option<UserInfo> {
        self.state().user_info(appid, user)
    }

    /// Plays the phone button for `user` with number `phone`: a code for getuserphonenumber.
    pub fn phone_code(&self, appid: &str, user: &str, phone: &str) -> String {
        self.state().mint_phone_code(appid, user, phone)
    }

    /// Plays the legacy phone button: `(encryptedData, iv)` sealed with the client's session_key.
    pub fn legacy_phone_data(
        &self,
        appid: &str,
        user: &str,
        phone: &str,
    ) -> Option<(String, String)> {
        let state = self.state();
        state.seal_for_client(appid, user, &state.phone_info(appid, phone))
    }

    /// Kills every access_token of `appid`, as another server calling `cgi-bin/token` would.
    pub fn revoke_access_token(&self, appid: &str) {
        self.state().tokens.remove(appid);
    }

    /// The access_token `stable_token` would hand out now for `appid`, if one is live.
    pub fn current_access_token(&self, appid: &str) -> Option<String> {
        let state = self.state();
        let token = state.tokens.get(appid)?;
        (state.now() < token.expires_at).then(|| token.current.clone())
    }

    /// Makes the next `times` calls of `endpoint` (e.g. [`JSCODE2SESSION`]) suffer `fault`.
    pub fn fail_next(&self, endpoint: &str, fault: Fault, times: usize) {
        self.state().add_fault(endpoint, fault, times);
    }

    /// How many calls `endpoint` has received (faulted ones included).
    pub fn calls(&self, endpoint: &str) -> u64 {
        self.state().calls.get(endpoint).copied().unwrap_or(0)
    }

    /// Benchmark mode: codes nobody minted are accepted as fresh `wx.login()` codes, so a load
    /// generator can post random codes. Single use and expiry still apply; the per-user quota
    /// (45011) does not for the users these codes name: a benchmark's few thousand people stand for
    /// a real population of millions, none of whom logs in a hundred times a minute.
    pub fn accept_any_code(&self) {
        self.state().any_code = true;
    }

    /// Moves the mock's clock forward, to expire codes without waiting.
    pub fn advance(&self, by: Duration) {
        self.state().skew += by;
    }
}

async fn handle(request: Request<Incoming>, state: &Mutex<State>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if path.starts_with("/__mock/") {
        return control(request, state).await;
    }
    let (parts, incoming) = request.into_parts();
    let body: Value = match incoming.collect().await {
        Ok(collected) => serde_json::from_slice(&collected.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let request = Request::from_parts(parts, ());
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let fault = {
        let mut state = state.lock().expect("not poisoned");
        *state.calls.entry(path.clone()).or_default() += 1;
        state.next_fault(&path)
    };
    if let Some(Fault::Delay(d)) = fault {
        tokio::time::sleep(d).await;
    } else if let Some(fault) = fault {
        return faulted(&path, fault);
    }
    match (request.method(), path.as_str()) {
        (&Method::GET, JSCODE2SESSION) => {
            let reply = jscode2session(&query, &mut state.lock().expect("not poisoned"));
            sns_reply(reply)
        }
        (&Method::POST, STABLE_TOKEN) => cgi_reply(stable_token(
            &body,
            &mut state.lock().expect("not poisoned"),
        )),
        (&Method::POST, PHONE_NUMBER) => {
            let reply = phone_number(&query, &body, &mut state.lock().expect("not poisoned"));
            cgi_reply(reply)
        }
        (&Method::GET, OAUTH_ACCESS_TOKEN) => {
            let reply = oauth_access_token(&query, &mut state.lock().expect("not poisoned"));
            sns_reply(reply)
        }
        (&Method::GET, SNS_USERINFO) => {
            sns_reply(sns_userinfo(&query, &state.lock().expect("not poisoned")))
        }
        (&Method::GET, SNS_AUTH) => {
            let state = state.lock().expect("not poisoned");
            let reply = match user_token(&query, &state) {
                Ok(_) => json!({ "errcode": 0, "errmsg": "ok" }),
                Err(reply) => reply,
            };
            sns_reply(reply)
        }
        (&Method::GET, QRCONNECT | OAUTH_AUTHORIZE) => authorize_page(
            &path,
            &query,
            request.headers(),
            &mut state.lock().expect("not poisoned"),
        ),
        (&Method::GET, CHECK_SESSION | RESET_SESSION_KEY) => {
            let reset = path == RESET_SESSION_KEY;
            cgi_reply(check_session(
                &query,
                reset,
                &mut state.lock().expect("not poisoned"),
            ))
        }
        _ => {
            let mut response = Response::new(body::full("<html><body>404 Not Found</body></html>"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

fn errcode(code: i64, message: &str) -> Value {
    json!({ "errcode": code, "errmsg": format!("{message}, rid: {}", rid()) })
}

/// The checks both code exchanges make before looking at the code: every parameter present, the
/// grant type, the app and its secret. Returns (appid, code, app).
fn code_request<'q>(
    query: &'q HashMap<String, String>,
    code_param: &str,
    state: &State,
) -> Result<(&'q String, &'q String, App), Value> {
    let param = |name: &str| query.get(name).filter(|v| !v.is_empty());
    let appid = param("appid").ok_or_else(|| errcode(41002, "appid missing"))?;
    let secret = param("secret").ok_or_else(|| errcode(41004, "appsecret missing"))?;
    let code = param(code_param).ok_or_else(|| errcode(41008, "missing code"))?;
    if param("grant_type").map(String::as_str) != Some("authorization_code") {
        return Err(errcode(40002, "invalid grant_type"));
    }
    let app = state
        .apps
        .get(appid)
        .cloned()
        .ok_or_else(|| errcode(40013, "invalid appid"))?;
    if app.secret != *secret {
        return Err(errcode(40125, "invalid appsecret"));
    }
    Ok((appid, code, app))
}

fn jscode2session(query: &HashMap<String, String>, state: &mut State) -> Value {
    let (appid, code, app) = match code_request(query, "js_code", state) {
        Ok(checked) => checked,
        Err(reply) => return reply,
    };
    let now = state.now();
    if state.any_code && !state.codes.contains_key(code.as_str()) && code.len() >= 2 {
        // Benchmark mode: an unknown code is a fresh wx.login() of the user named by its first two
        // characters (3,844 users for random alphanumeric codes: a few first logins, then returning
        // users, as in real traffic).
        let user = code[..2].to_owned();
        state.issue(code.clone(), appid, &user);
        if let Some(issued) = state.codes.get_mut(code.as_str()) {
            issued.unlimited = true;
        }
    }
    let Some(issued) = state.codes.get_mut(code.as_str()) else {
        return errcode(40029, "invalid code");
    };
    if issued.appid != *appid || now.duration_since(issued.issued_at) > CODE_TTL {
        return errcode(40029, "invalid code");
    }
    if issued.used {
        return errcode(40163, "code been used");
    }
    issued.used = true;
    let unlimited = issued.unlimited;
    let user = issued.user.clone();
    let hide_unionid = issued.hide_unionid;
    let session_key = issued.session_key.clone();
    let recent = state
        .recent_logins
        .entry((appid.clone(), user.clone()))
        .or_default();
    recent.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
    if recent.len() >= LOGINS_PER_USER_PER_MINUTE && !unlimited {
        return errcode(
            45011,
            "api minute-quota reach limit  mustslower  retry next minute",
        );
    }
    recent.push(now);
    let openid = openid_of(appid, &user);
    state
        .session_keys
        .insert((appid.clone(), openid.clone()), session_key.clone());
    let mut reply = json!({ "session_key": session_key, "openid": openid });
    if app.bound && !hide_unionid {
        reply["unionid"] = Value::String(unionid_of(&user));
    }
    reply
}

fn oauth_access_token(query: &HashMap<String, String>, state: &mut State) -> Value {
    let (appid, code, app) = match code_request(query, "code", state) {
        Ok(checked) => checked,
        Err(reply) => return reply,
    };
    let now = state.now();
    let Some(issued) = state.oauth_codes.get_mut(code.as_str()) else {
        return errcode(40029, "invalid code");
    };
    if issued.appid != *appid {
        return errcode(40029, "invalid code");
    }
    if now.duration_since(issued.issued_at) > issued.kind.ttl() {
        return errcode(42003, "code expired");
    }
    if issued.used {
        return errcode(40163, "code been used");
    }
    issued.used = true;
    let (user, kind) = (issued.user.clone(), issued.kind);
    let snapshot = kind == OauthKind::OaSnapshot;
    // A snapshot-mode visitor is a virtual user: a fresh fake openid each time, never a unionid.
    let openid = if snapshot {
        id28(&format!(
            "snapshot:{appid}:{}",
            hex::encode(random_bytes::<8>())
        ))
    } else {
        openid_of(appid, &user)
    };
    let token = format!("MOCK_UAT_{}", hex::encode(random_bytes::<24>()));
    state.user_tokens.insert(
        token.clone(),
        UserToken {
            appid: appid.clone(),
            openid: openid.clone(),
            user: user.clone(),
            scope: kind.scope(),
            expires_at: now + USER_TOKEN_TTL,
        },
    );
    let mut reply = json!({
        "access_token": token,
        "expires_in": USER_TOKEN_TTL.as_secs(),
        "refresh_token": format!("MOCK_URT_{}", hex::encode(random_bytes::<24>())),
        "openid": openid,
        "scope": kind.scope(),
    });
    if app.bound && kind.scope() != "snsapi_base" {
        reply["unionid"] = Value::String(unionid_of(&user));
    }
    if snapshot {
        reply["is_snapshotuser"] = json!(1);
    }
    reply
}

/// The live user access token of a `sns/*` call, checked against its `openid`.
fn user_token<'a>(
    query: &HashMap<String, String>,
    state: &'a State,
) -> Result<&'a UserToken, Value> {
    let token = query
        .get("access_token")
        .and_then(|t| state.user_tokens.get(t))
        .ok_or_else(|| {
            errcode(
                40001,
                "invalid credential, access_token is invalid or not latest",
            )
        })?;
    if state.now() >= token.expires_at {
        return Err(errcode(42001, "access_token expired"));
    }
    if query.get("openid") != Some(&token.openid) {
        return Err(errcode(40003, "invalid openid"));
    }
    Ok(token)
}

fn sns_userinfo(query: &HashMap<String, String>, state: &State) -> Value {
    let token = match user_token(query, state) {
        Ok(token) => token,
        Err(reply) => return reply,
    };
    if token.scope == "snsapi_base" {
        return errcode(48001, "api unauthorized");
    }
    let mut reply = json!({
        "openid": token.openid,
        "nickname": token.user,
        "sex": 0,
        "language": "",
        "city": "",
        "province": "",
        "country": "",
        "headimgurl": format!("https://thirdwx.qlogo.cn/mmopen/vi_32/{}/132", &token.openid[1..]),
        "privilege": [],
    });
    if state.apps.get(&token.appid).is_some_and(|a| a.bound) {
        reply["unionid"] = Value::String(unionid_of(&token.user));
    }
    reply
}

/// `connect/qrconnect` and `connect/oauth2/authorize`: the user consents at once and the browser is
/// sent back to `redirect_uri` with a code and the state (only the state when consent is declined).
fn authorize_page(
    path: &str,
    query: &HashMap<String, String>,
    headers: &http::HeaderMap,
    state: &mut State,
) -> Response<Body> {
    let page = |status: StatusCode, text: &str| {
        let mut response = Response::new(body::full(format!(
            "<html><body><p>{text}</p></body></html>"
        )));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        response
    };
    let param = |name: &str| query.get(name).filter(|v| !v.is_empty());
    let Some(appid) = param("appid").filter(|a| state.apps.contains_key(*a)) else {
        return page(StatusCode::OK, "appid 参数错误 (invalid appid)");
    };
    let Some(redirect_uri) = param("redirect_uri") else {
        return page(
            StatusCode::OK,
            "redirect_uri 参数错误 (invalid redirect_uri)",
        );
    };
    if param("response_type").map(String::as_str) != Some("code") {
        return page(StatusCode::OK, "response_type 参数错误");
    }
    let scope = param("scope").map(String::as_str).unwrap_or("");
    let cookies: HashMap<String, String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .map(|c| (c.name().to_owned(), c.value().to_owned()))
        .collect();
    let kind = match (path, scope) {
        (QRCONNECT, "snsapi_login") => OauthKind::Web,
        (OAUTH_AUTHORIZE, "snsapi_base" | "snsapi_userinfo")
            if cookies.get("wx_snapshot").map(String::as_str) == Some("1") =>
        {
            OauthKind::OaSnapshot
        }
        (OAUTH_AUTHORIZE, "snsapi_base") => OauthKind::Oa { userinfo: false },
        (OAUTH_AUTHORIZE, "snsapi_userinfo") => OauthKind::Oa { userinfo: true },
        _ => return page(StatusCode::OK, "scope 参数错误 (invalid scope)"),
    };
    let Some(user) = cookies
        .get("wx_user")
        .cloned()
        .or_else(|| state.browser_user.clone())
    else {
        return page(
            StatusCode::FORBIDDEN,
            "No WeChat user is signed in to this browser: set the wx_user cookie or POST /__mock/browser.",
        );
    };
    let mut back = form_urlencoded::Serializer::new(String::new());
    if cookies.get("wx_decline").map(String::as_str) != Some("1") {
        back.append_pair("code", &state.mint_oauth_code(appid, &user, kind));
    }
    back.append_pair("state", param("state").map_or("", String::as_str));
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let location = format!("{redirect_uri}{separator}{}", back.finish());
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::FOUND;
    match HeaderValue::try_from(location) {
        Ok(location) => {
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => page(
            StatusCode::OK,
            "redirect_uri 参数错误 (invalid redirect_uri)",
        ),
    }
}

fn stable_token(body: &Value, state: &mut State) -> Value {
    let field = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    if field("grant_type") != Some("client_credential") {
        return errcode(40002, "invalid grant_type");
    }
    let Some(appid) = field("appid") else {
        return errcode(41002, "appid missing");
    };
    let Some(secret) = field("secret") else {
        return errcode(41004, "appsecret missing");
    };
    if body.get("force_refresh").is_some_and(|f| !f.is_boolean()) {
        return errcode(40097, "invalid args: force_refresh must be a JSON boolean");
    }
    let Some(app) = state.apps.get(appid) else {
        return errcode(40013, "invalid appid");
    };
    if app.secret != secret {
        return errcode(40125, "invalid appsecret");
    }
    let now = state.now();
    let force = body
        .get("force_refresh")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let fresh = state
        .tokens
        .get(appid)
        .is_some_and(|t| now + TOKEN_OVERLAP < t.expires_at);
    if force || !fresh {
        // Rotation: the old token stays valid for the overlap (or until it expires, if sooner).
        let previous = state.tokens.get(appid).and_then(|t| {
            let until = t.expires_at.min(now + TOKEN_OVERLAP);
            (now < until).then(|| (t.current.clone(), until))
        });
        let token = format!("MOCK_AT_{}", hex::encode(random_bytes::<24>()));
        state.tokens.insert(
            appid.to_owned(),
            AppToken {
                current: token,
                expires_at: now + ACCESS_TOKEN_TTL,
                previous,
            },
        );
    }
    let token = &state.tokens[appid];
    json!({
        "access_token": token.current,
        "expires_in": token.expires_at.saturating_duration_since(now).as_secs(),
    })
}

fn phone_number(query: &HashMap<String, String>, body: &Value, state: &mut State) -> Value {
    let appid = match state.authorize(query) {
        Ok(appid) => appid,
        Err(reply) => return reply,
    };
    let Some(code) = body.get("code").and_then(Value::as_str) else {
        return errcode(40097, "invalid args: code missing");
    };
    let now = state.now();
    let Some(issued) = state.phone_codes.get_mut(code) else {
        return errcode(40029, "invalid code");
    };
    let bound_openid = body.get("openid").and_then(Value::as_str);
    if issued.appid != appid
        || issued.used
        || now.duration_since(issued.issued_at) > CODE_TTL
        || bound_openid.is_some_and(|o| o != openid_of(&appid, &issued.user))
    {
        return errcode(40029, "invalid code");
    }
    issued.used = true;
    let phone = issued.phone.clone();
    json!({ "errcode": 0, "errmsg": "ok", "phone_info": state.phone_info(&appid, &phone) })
}

fn check_session(query: &HashMap<String, String>, reset: bool, state: &mut State) -> Value {
    let appid = match state.authorize(query) {
        Ok(appid) => appid,
        Err(reply) => return reply,
    };
    let (Some(openid), Some(signature)) = (query.get("openid"), query.get("signature")) else {
        return errcode(40097, "invalid args");
    };
    if query.get("sig_method").map(String::as_str) != Some("hmac_sha256") {
        return errcode(87010, "invalid sig_method");
    }
    let key = (appid, openid.clone());
    let valid = state
        .session_keys
        .get(&key)
        .is_some_and(|k| crate::wechat::crypto::session_hmac(k, b"") == *signature);
    if !valid {
        return errcode(87009, "invalid signature");
    }
    if !reset {
        return json!({ "errcode": 0, "errmsg": "ok" });
    }
    let fresh = new_session_key();
    state.session_keys.insert(key, fresh.clone());
    json!({ "errcode": 0, "errmsg": "ok", "openid": openid, "session_key": fresh })
}

/// `cgi-bin/*` and `wxa/*` replies: HTTP 200, with WeChat's odd JSON content type.
fn cgi_reply(value: Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; encoding=utf-8"),
    );
    response
}

/// `sns/*` replies: HTTP 200, JSON served as text/plain (as WeChat does).
fn sns_reply(value: Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn faulted(path: &str, fault: Fault) -> Response<Body> {
    let html = |status: u16| {
        let mut response = Response::new(body::full(format!(
            "<html><head><title>{status}</title></head><body><center><h1>{status}</h1></center></body></html>"
        )));
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        response
    };
    match fault {
        Fault::Errcode(code) => {
            let message = match code {
                -1 => "system error",
                40029 => "invalid code",
                40163 => "code been used",
                42003 => "code expired",
                40226 => "high risk user, login blocked",
                45011 => "api minute-quota reach limit  mustslower  retry next minute",
                _ => "injected error",
            };
            let reply = errcode(code, message);
            if path.starts_with("/sns/") {
                sns_reply(reply)
            } else {
                body::json(StatusCode::OK, &reply)
            }
        }
        Fault::Status(status) => html(status),
        Fault::Html => html(200),
        Fault::Garbage => Response::new(body::full("errcode=0&openid=???")),
        Fault::Delay(_) => unreachable!("delays are waited out, not answered"),
    }
}

// -------------------------------------------------------------------------------------------------
// The HTTP control API.
// -------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppRequest {
    appid: String,
    secret: String,
    #[serde(default)]
    bound: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    appid: String,
    user: String,
    /// `false`: the exchange leaves unionid out although the app is bound (older accounts).
    #[serde(default = "yes")]
    unionid: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OauthCodeRequest {
    appid: String,
    user: String,
    /// `app`, `web`, `oa` (with `scope`) or `oa_snapshot`.
    kind: String,
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppUserRequest {
    appid: String,
    user: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BrowserRequest {
    user: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    endpoint: String,
    errcode: Option<i64>,
    status: Option<u16>,
    #[serde(default)]
    html: bool,
    #[serde(default)]
    garbage: bool,
    delay_ms: Option<u64>,
    #[serde(default = "one")]
    times: usize,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneRequest {
    appid: String,
    user: String,
    phone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppidRequest {
    appid: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceRequest {
    seconds: u64,
}

async fn control(request: Request<Incoming>, state: &Mutex<State>) -> Response<Body> {
    let (parts, incoming) = request.into_parts();
    let bytes: Bytes = match incoming.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return control_error("body unreadable"),
    };
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let handle = MockHandle(state);
    match (parts.method, parts.uri.path()) {
        (Method::POST, "/__mock/apps") => match serde_json::from_slice::<AppRequest>(&bytes) {
            Ok(r) => {
                handle.with(|s| {
                    s.apps.insert(
                        r.appid,
                        App {
                            secret: r.secret,
                            bound: r.bound,
                        },
                    )
                });
                body::json(StatusCode::OK, &json!({}))
            }
            Err(e) => control_error(&e.to_string()),
        },
        (Method::POST, "/__mock/login") => match serde_json::from_slice::<LoginRequest>(&bytes) {
            Ok(r) => {
                let (code, bound) = handle.with(|s| {
                    let code = s.mint_code(&r.appid, &r.user);
                    if let Some(issued) = s.codes.get_mut(&code) {
                        issued.hide_unionid = !r.unionid;
                    }
                    (
                        code,
                        s.apps.get(&r.appid).is_some_and(|a| a.bound) && r.unionid,
                    )
                });
                let mut reply = json!({ "code": code, "openid": openid_of(&r.appid, &r.user) });
                if bound {
                    reply["unionid"] = Value::String(unionid_of(&r.user));
                }
                body::json(StatusCode::OK, &reply)
            }
            Err(e) => control_error(&e.to_string()),
        },
        (Method::POST, "/__mock/oauth_code") => {
            match serde_json::from_slice::<OauthCodeRequest>(&bytes) {
                Ok(r) => {
                    let kind = match (r.kind.as_str(), r.scope.as_deref()) {
                        ("app", None) => OauthKind::App,
                        ("web", None) => OauthKind::Web,
                        ("oa", None | Some("snsapi_userinfo")) => OauthKind::Oa { userinfo: true },
                        ("oa", Some("snsapi_base")) => OauthKind::Oa { userinfo: false },
                        ("oa_snapshot", None) => OauthKind::OaSnapshot,
                        _ => {
                            return control_error(
                                "kind is app, web, oa (scope snsapi_userinfo or snsapi_base) or oa_snapshot",
                            );
                        }
                    };
                    let code = handle.with(|s| s.mint_oauth_code(&r.appid, &r.user, kind));
                    body::json(StatusCode::OK, &json!({ "code": code }))
                }
                Err(e) => control_error(&e.to_string()),
            }
        }
        (Method::POST, "/__mock/browser") => {
            match serde_json::from_slice::<BrowserRequest>(&bytes) {
                Ok(r) => {
                    handle.with(|s| s.browser_user = Some(r.user));
                    body::json(StatusCode::OK, &json!({}))
                }
                Err(e) => control_error(&e.to_string()),
            }
        }
        (Method::POST, "/__mock/userinfo") => {
            match serde_json::from_slice::<AppUserRequest>(&bytes) {
                Ok(r) => match handle.with(|s| s.user_info(&r.appid, &r.user)) {
                    Some(info) => body::json(StatusCode::OK, &json!(info)),
                    None => control_error("that user has not logged in to that app yet"),
                },
                Err(e) => control_error(&e.to_string()),
            }
        }
        (Method::POST, "/__mock/phone_code") => {
            match serde_json::from_slice::<PhoneRequest>(&bytes) {
                Ok(r) => {
                    let code = handle.with(|s| s.mint_phone_code(&r.appid, &r.user, &r.phone));
                    body::json(StatusCode::OK, &json!({ "code": code }))
                }
                Err(e) => control_error(&e.to_string()),
            }
        }
        (Method::POST, "/__mock/phone_data") => {
            match serde_json::from_slice::<PhoneRequest>(&bytes) {
                Ok(r) => match handle.with(|s| {
                    s.seal_for_client(&r.appid, &r.user, &s.phone_info(&r.appid, &r.phone))
                }) {
                    Some((encrypted, iv)) => body::json(
                        StatusCode::OK,
                        &json!({ "encryptedData": encrypted, "iv": iv }),
                    ),
                    None => control_error("that user has not called wx.login() in that app yet"),
                },
                Err(e) => control_error(&e.to_string()),
            }
        }
        (Method::POST, "/__mock/revoke_token") => {
            match serde_json::from_slice::<AppidRequest>(&bytes) {
                Ok(r) => {
                    handle.with(|s| s.tokens.remove(&r.appid));
                    body::json(StatusCode::OK, &json!({}))
                }
                Err(e) => control_error(&e.to_string()),
            }
        }
        (Method::GET, "/__mock/session_key") => {
            let (Some(appid), Some(openid)) = (query.get("appid"), query.get("openid")) else {
                return control_error("pass ?appid=...&openid=...");
            };
            let key = handle.with(|s| {
                s.session_keys
                    .get(&(appid.clone(), openid.clone()))
                    .cloned()
            });
            body::json(StatusCode::OK, &json!({ "session_key": key }))
        }
        (Method::POST, "/__mock/faults") => match serde_json::from_slice::<FaultRequest>(&bytes) {
            Ok(r) => {
                let fault = match (r.errcode, r.status, r.html, r.garbage, r.delay_ms) {
                    (Some(code), None, false, false, None) => Fault::Errcode(code),
                    (None, Some(status), false, false, None) => Fault::Status(status),
                    (None, None, true, false, None) => Fault::Html,
                    (None, None, false, true, None) => Fault::Garbage,
                    (None, None, false, false, Some(ms)) => Fault::Delay(Duration::from_millis(ms)),
                    _ => {
                        return control_error(
                            "give exactly one of errcode, status, html, garbage, delay_ms",
                        );
                    }
                };
                handle.with(|s| s.add_fault(&r.endpoint, fault, r.times));
                body::json(StatusCode::OK, &json!({}))
            }
            Err(e) => control_error(&e.to_string()),
        },
        (Method::GET, "/__mock/calls") => {
            let calls = handle.with(|s| s.calls.clone());
            body::json(StatusCode::OK, &json!(calls))
        }
        (Method::POST, "/__mock/advance") => match serde_json::from_slice::<AdvanceRequest>(&bytes)
        {
            Ok(r) => {
                handle.with(|s| s.skew += Duration::from_secs(r.seconds));
                body::json(StatusCode::OK, &json!({}))
            }
            Err(e) => control_error(&e.to_string()),
        },
        _ => {
            let mut response = control_error("unknown control endpoint");
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

struct MockHandle<'a>(&'a Mutex<State>);

impl MockHandle<'_> {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().expect("not poisoned"))
    }
}

fn control_error(message: &str) -> Response<Body> {
    body::json(StatusCode::BAD_REQUEST, &json!({ "error": message }))
}

// -------------------------------------------------------------------------------------------------
// `wxgate mock-wechat`: the mock as a process of its own.
// -------------------------------------------------------------------------------------------------

/// Arguments of `wxgate mock-wechat`.
#[derive(Debug, clap::Args)]
pub struct CliArgs {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// An app, as APPID:SECRET (bound to an Open Platform account: logins carry unionid) or
    /// APPID:SECRET:unbound. Repeatable; more can be added with POST /__mock/apps.
    #[arg(long = "app")]
    pub apps: Vec<String>,
    /// Accept codes nobody minted, as fresh logins (for load generators posting random codes).
    #[arg(long)]
    pub any_code: bool,
}

/// Runs the mock until SIGINT or SIGTERM.
pub fn run_cli(args: CliArgs) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mock = MockWechat::start(TcpListener::bind(args.listen).await?)?;
        for app in &args.apps {
            let mut parts = app.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(appid), Some(secret), bound) if !appid.is_empty() && !secret.is_empty() => {
                    mock.add_app(appid, secret, bound != Some("unbound"));
                }
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("--app {app:?}: write APPID:SECRET or APPID:SECRET:unbound"),
                    ));
                }
            }
        }
        if args.any_code {
            mock.accept_any_code();
        }
        println!("mock WeChat listening on {}", mock.url());
        crate::server::until_signalled().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_codes_are_forgotten_once_there_are_many_and_live_ones_kept() {
        let mut state = State::default();
        for i in 0..PRUNE_CODES_FROM {
            state.issue(format!("old{i}"), "wx1", "ann");
        }
        state.skew += CODE_TTL + Duration::from_secs(1);
        state.issue("fresh".into(), "wx1", "bob");
        for i in 0..PRUNE_CODES_FROM {
            state.issue(format!("new{i}"), "wx1", "ann");
        }
        assert!(state.codes.contains_key("fresh"));
        assert!(
            !state.codes.contains_key("old0"),
            "expired codes are gone after the next prune"
        );
        assert!(state.codes.len() <= 2 * PRUNE_CODES_FROM + 1);
    }
}
